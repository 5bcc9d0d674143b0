"""Command-line entry point: ``xattention demo | eval | calibrate``.

Each subcommand lives in its own module, which exposes ``register_cli(subparsers)``; it adds
its parser and sets ``func`` to a callable taking the parsed ``argparse.Namespace``. Modules are
imported only when their subcommand exists on this install (``eval`` needs the ``[eval]``
extra), so a light install still gets a working ``xattention demo``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it needs) in the order the subcommands are listed by --help.
_SUBCOMMAND_MODULES = (
    "xattention.demo",
    "xattention.eval.cli",
    "xattention.calibration",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xattention",
        description="XAttention: block-sparse attention chosen by antidiagonal scoring.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only a missing optional dependency is tolerated; a bug inside our module is not.
            if exc.name and exc.name.startswith("xattention"):
                if exc.name == name or name.startswith(exc.name + "."):
                    continue
                raise
            continue
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
