"""Where the evaluation keeps what it makes once and reads many times: the checked tokenizers,
the assembled Gemma 3 GGUF and the generated RULER samples.

``$XATTENTION_CACHE`` when set, else ``~/.cache/xattention``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The evaluation's cache folder (``$XATTENTION_CACHE`` or ``~/.cache/xattention``)."""
    return Path(os.environ.get("XATTENTION_CACHE", Path.home() / ".cache" / "xattention"))
