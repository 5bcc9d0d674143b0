"""Results files of the suite: JSONL records (plain or gzipped) and the ``.meta.json`` beside
them, which keeps the machine and settings of every invocation.
"""

from __future__ import annotations

import gzip
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["machine_info", "meta_path", "read_records", "write_meta"]


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where a result was produced (goes into every results file)."""
    import transformers

    import xattention

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "xattention": xattention.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import os

        info["cpu_count"] = os.cpu_count()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total"] = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL results file, plain or gzipped (missing file: empty list)."""
    path = Path(path)
    if not path.exists():
        return []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def meta_path(path: str | Path) -> Path:
    """The ``.meta.json`` beside a results file (``x.jsonl`` or ``x.jsonl.gz``)."""
    path = Path(path)
    if path.suffix == ".gz":
        path = path.with_suffix("")
    return path.with_suffix(".meta.json")


def write_meta(out: Path, model_name: str, settings: dict[str, Any],
                device: torch.device | str) -> None:
    """Record the machine and settings of this invocation next to the results."""
    meta_file = meta_path(out)
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"runs": []}
    meta["runs"].append({"model": model_name, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                         "machine": machine_info(device), "settings": settings})
    meta_file.write_text(json.dumps(meta, indent=1))
