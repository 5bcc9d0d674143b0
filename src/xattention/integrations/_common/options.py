"""Checks of the integrations' ``enable`` options, each raising the error that names the option.

Where the core has a check (block parameters, backend, FP8 estimate, bools) these delegate to
:mod:`xattention._validation`, so an option reads the same wherever it is passed.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..._validation import check_block_params

__all__ = ["UNSET", "check_min_prefill_len", "check_non_negative_int",
           "check_optional_block_params", "renamed_option"]

UNSET: Any = object()


def check_non_negative_int(name: str, value: object) -> int:
    """An ``int >= 0`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_optional_block_params(stride: object, block_size: object
                                ) -> tuple[int | None, int | None]:
    """``stride`` / ``block_size`` where None means "from the profile, else the default"; given
    ones go through the core's check (positive ints, stride divides block size)."""
    if stride is not None and block_size is not None:
        return check_block_params(stride, block_size)
    if stride is not None:
        check_block_params(stride, stride)
    if block_size is not None:
        check_block_params(1, block_size)
    return stride, block_size  # type: ignore[return-value]


def check_min_prefill_len(value: object, block_size: int) -> int:
    """Queries shorter than this stay dense; None means ``block_size``."""
    if value is None:
        return block_size
    return check_non_negative_int("min_prefill_len", value)


def renamed_option(new_name: str, new_value: Any, old_name: str, old_value: Any,
                   default: Any = None) -> Any:
    """The value of an option passed under its old name, with a DeprecationWarning.

    ``default`` is what ``new_value`` holds when the caller did not pass the new name; passing
    both names is a TypeError.
    """
    if old_value is UNSET or old_value is default:
        return new_value
    if new_value is not default:
        raise TypeError(f"pass {new_name}= only ({old_name}= is its old name)")
    warnings.warn(f"{old_name}= is now called {new_name}=; the old name will be removed",
                  DeprecationWarning, stacklevel=3)
    return old_value
