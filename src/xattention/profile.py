"""Versioned per-(layer, head) threshold profiles: written by ``xattention calibrate``, read by
``integrations.transformers.enable(model, thresholds=...)``.

A pure leaf of the core (JSON and torch only), so that calibration, evaluation and the
integrations can all depend on it without depending on each other (docs/design.md).

A profile is a JSON file::

    {
      "format": "xattention-threshold-profile",
      "version": 1,
      "model_id": "smollm2",
      "model_config": {"num_layers": 30, "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64,
                       "hidden_size": 576, "vocab_size": 49152},
      "stride": 8,
      "block_size": 128,
      "thresholds": [[0.81, 0.9, ...], ...],      # [layer][query head]; >= 1 means dense
      "budget": {"min_recall": 0.9, "max_kl": 0.01, ...},
      "measured": {"density": ..., "heldout_kl": ..., ...},
      "metadata": {...}                          # how it was made (grid, texts, seed, ...)
    }

``ThresholdProfile.load`` refuses files of another format or a newer version, and any threshold
that is not a finite number > 0, with a ``ValueError`` naming the offending field. ``check_model``
compares the profile with a model's configuration (layer count, query-head count and, when both
sides know them, KV-head count, head size, hidden and vocabulary size) so that a profile made
for one model is never silently applied to another.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ._validation import check_threshold_value

__all__ = ["PROFILE_FORMAT", "PROFILE_VERSION", "ThresholdProfile", "load_thresholds",
           "model_structure", "text_config"]

PROFILE_FORMAT = "xattention-threshold-profile"
PROFILE_VERSION = 1


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_thresholds(thresholds: Any) -> list[list[float]]:
    """Check ``thresholds`` is a non-empty rectangular ``[layer][head]`` list of numbers > 0."""
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.tolist()
    if not isinstance(thresholds, (list, tuple)) or len(thresholds) == 0:
        raise ValueError("profile 'thresholds' must be a non-empty list of per-layer lists "
                         f"[layer][head], got {type(thresholds).__name__}")
    out: list[list[float]] = []
    n_heads = None
    for li, row in enumerate(thresholds):
        if not isinstance(row, (list, tuple)) or len(row) == 0:
            raise ValueError(f"profile 'thresholds[{li}]' must be a non-empty list of per-head "
                             f"thresholds, got {row!r:.60}")
        if n_heads is None:
            n_heads = len(row)
        elif len(row) != n_heads:
            raise ValueError(f"profile 'thresholds' must have the same number of heads in every "
                             f"layer: layer 0 has {n_heads}, layer {li} has {len(row)}")
        vals = []
        for hi, t in enumerate(row):
            try:
                vals.append(check_threshold_value(f"profile 'thresholds[{li}][{hi}]'", t))
            except TypeError as exc:  # a bad value in a file is a ValueError of that file
                raise ValueError(str(exc)) from None
        out.append(vals)
    return out


def text_config(model_or_config: Any) -> Any:
    """The language model's config of a model or config (multimodal ones hold several).

    The one place this lookup is written: the transformers integration exports it as
    ``xattention.integrations.transformers.model_info.text_config``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def model_structure(model_or_config: Any) -> dict[str, int]:
    """Layer count, query/KV head counts and head size from a model or its (text) config.

    Works with Hugging Face ``transformers`` configs (``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``); multimodal configs are
    reduced to their text config. Keys that the config lacks are left out.
    """
    config = text_config(model_or_config)
    out: dict[str, int] = {}
    for key, names in (
        ("num_layers", ("num_hidden_layers", "n_layer", "num_layers")),
        ("num_q_heads", ("num_attention_heads", "n_head", "num_heads")),
        ("num_kv_heads", ("num_key_value_heads",)),
        ("head_dim", ("head_dim",)),
        ("hidden_size", ("hidden_size", "n_embd")),
        ("vocab_size", ("vocab_size",)),
    ):
        for name in names:
            value = getattr(config, name, None)
            if _is_int(value):
                out[key] = value
                break
    if "head_dim" not in out:
        hidden = getattr(config, "hidden_size", None)
        if _is_int(hidden) and out.get("num_q_heads"):
            out["head_dim"] = hidden // out["num_q_heads"]
    if "num_kv_heads" not in out and "num_q_heads" in out:
        out["num_kv_heads"] = out["num_q_heads"]
    return out


@dataclass
class ThresholdProfile:
    """Per-(layer, query head) XAttention thresholds plus how they were obtained.

    Attributes:
        thresholds: ``[layer][query head]`` cumulative-score thresholds; ``>= 1`` keeps every
            candidate block (dense head).
        stride: antidiagonal stride the profile was calibrated with.
        block_size: block edge the profile was calibrated with.
        model_id: name or path of the model (informational; structure is checked separately).
        budget: the accuracy target given to the calibration (min recall, max KL, ...).
        measured: what calibration measured for the chosen thresholds (density, loss, KL, ...).
        version: profile format version.
        model_config: ``num_layers``, ``num_q_heads``, ``num_kv_heads``, ``head_dim``.
        metadata: free-form record of the calibration run (grid, texts, seed, timings).
    """

    thresholds: list[list[float]]
    stride: int = 8
    block_size: int = 128
    model_id: str = ""
    budget: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    version: int = PROFILE_VERSION
    model_config: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.thresholds = _validate_thresholds(self.thresholds)
        for name in ("stride", "block_size", "version"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"profile '{name}' must be a positive integer, got {value!r}")
        if self.block_size % self.stride:
            raise ValueError(f"profile 'stride' ({self.stride}) must divide 'block_size' "
                             f"({self.block_size})")
        if self.version > PROFILE_VERSION:
            raise ValueError(f"profile 'version' {self.version} is newer than this xattention "
                             f"understands ({PROFILE_VERSION}); upgrade xattention")
        if not isinstance(self.model_id, str):
            raise ValueError(f"profile 'model_id' must be a string, got {self.model_id!r}")
        for name in ("budget", "measured", "model_config", "metadata"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"profile '{name}' must be a JSON object (dict), got "
                                 f"{type(getattr(self, name)).__name__}")
        mc = self.model_config
        if "num_layers" in mc and mc["num_layers"] != self.num_layers:
            raise ValueError(f"profile 'thresholds' has {self.num_layers} layers but "
                             f"'model_config.num_layers' says {mc['num_layers']}")
        if "num_q_heads" in mc and mc["num_q_heads"] != self.num_heads:
            raise ValueError(f"profile 'thresholds' has {self.num_heads} heads per layer but "
                             f"'model_config.num_q_heads' says {mc['num_q_heads']}")

    # ----------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Number of layers the profile covers."""
        return len(self.thresholds)

    @property
    def num_heads(self) -> int:
        """Number of query heads per layer."""
        return len(self.thresholds[0])

    def as_tensor(
        self, layer: int, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Thresholds of one layer as a float32 tensor ``[Hq]`` (for ``select_blocks``)."""
        if not _is_int(layer) or not -self.num_layers <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        return torch.tensor(self.thresholds[layer], dtype=torch.float32, device=device)

    def as_nested_list(self) -> list[list[float]]:
        """A copy of ``thresholds`` (``[layer][head]`` floats)."""
        return [list(row) for row in self.thresholds]

    def mean_threshold(self) -> float:
        """Mean threshold over all heads (dense heads count as 1)."""
        vals = [min(t, 1.0) for row in self.thresholds for t in row]
        return sum(vals) / len(vals)

    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dictionary written by ``save``."""
        return {
            "format": PROFILE_FORMAT,
            "version": self.version,
            "model_id": self.model_id,
            "model_config": dict(self.model_config),
            "stride": self.stride,
            "block_size": self.block_size,
            "thresholds": self.as_nested_list(),
            "budget": self.budget,
            "measured": self.measured,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> ThresholdProfile:
        """Build and validate a profile from a dictionary (as read from JSON)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != PROFILE_FORMAT:
            raise ValueError(f"{source}: 'format' must be {PROFILE_FORMAT!r}, got {fmt!r} "
                             "(not an xattention threshold profile?)")
        if "version" not in data:
            raise ValueError(f"{source}: missing 'version'")
        if "thresholds" not in data:
            raise ValueError(f"{source}: missing 'thresholds'")
        known = {"format", "version", "model_id", "model_config", "stride", "block_size",
                 "thresholds", "budget", "measured", "metadata"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}")
        try:
            return cls(
                thresholds=data["thresholds"],
                stride=data.get("stride", 8),
                block_size=data.get("block_size", 128),
                model_id=data.get("model_id", ""),
                budget=data.get("budget", {}),
                measured=data.get("measured", {}),
                version=data["version"],
                model_config=data.get("model_config", {}),
                metadata=data.get("metadata", {}),
            )
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as indented JSON (parent folders are created)."""
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=False, default=_json_default)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ThresholdProfile:
        """Read and validate a profile written by ``save`` (``ValueError`` if it is not one)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=path)

    # ----------------------------------------------------------------------------------------
    def check_model(self, model: Any, *, stride: int | None = None,
                    block_size: int | None = None) -> None:
        """Raise ``ValueError`` if this profile does not fit ``model`` (or its config).

        Compares layer count and query-head count (always), KV-head count and head size (when
        both the profile and the model record them; also hidden and vocabulary size) and, when
        given, the ``stride`` and ``block_size`` the caller intends to run with. ``model_id`` is
        not compared: the same weights load under many names and paths, and a fine-tune of the
        same architecture may reuse a profile on purpose.
        """
        have = model_structure(model)
        problems = []
        if "num_layers" in have and have["num_layers"] != self.num_layers:
            problems.append(f"layer count: profile has {self.num_layers}, model has "
                            f"{have['num_layers']}")
        if "num_q_heads" in have and have["num_q_heads"] != self.num_heads:
            problems.append(f"query-head count: profile has {self.num_heads} per layer, model "
                            f"has {have['num_q_heads']}")
        for key, what in (("num_kv_heads", "KV-head count"), ("head_dim", "head size"),
                          ("hidden_size", "hidden size"), ("vocab_size", "vocabulary size")):
            if key in have and key in self.model_config and have[key] != self.model_config[key]:
                problems.append(f"{what}: profile has {self.model_config[key]}, model has "
                                f"{have[key]}")
        if stride is not None and stride != self.stride:
            problems.append(f"stride: profile was calibrated with {self.stride}, asked for "
                            f"{stride}")
        if block_size is not None and block_size != self.block_size:
            problems.append(f"block_size: profile was calibrated with {self.block_size}, asked "
                            f"for {block_size}")
        if "num_layers" not in have or "num_q_heads" not in have:
            problems.append("model: cannot read num_hidden_layers / num_attention_heads from "
                            "its config")
        if problems:
            name = f" {self.model_id!r}" if self.model_id else ""
            raise ValueError(f"threshold profile{name} does not match the model: "
                             + "; ".join(problems))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to a profile")


def load_thresholds(
    thresholds: ThresholdProfile | str | os.PathLike[str] | list[list[float]],
    model: Any | None = None,
) -> ThresholdProfile:
    """Normalise what a user passes as ``thresholds=``: a profile, a path to one, or a list.

    With ``model`` the result is checked against it (``check_model``).
    """
    if isinstance(thresholds, ThresholdProfile):
        profile = thresholds
    elif isinstance(thresholds, (str, os.PathLike)):
        profile = ThresholdProfile.load(thresholds)
    else:
        profile = ThresholdProfile(thresholds=thresholds)
    if model is not None:
        profile.check_model(model)
    return profile
