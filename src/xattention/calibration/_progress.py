"""Progress bars for the long steps of a calibration (tqdm; a no-op when ``progress`` is off)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def bar(desc: str, progress: bool, total: int) -> Iterator[Callable[[], None]]:
    """A bar of ``total`` steps; the context gives the function that advances it by one."""
    if not progress:
        yield lambda: None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, leave=False) as b:
        yield lambda: b.update(1)


def each(items: Iterable[T], desc: str, progress: bool) -> Iterable[T]:
    """``items``, with a bar over them when ``progress``."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)
