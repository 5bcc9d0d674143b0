"""``python -m xattention ...``: the same command line as the ``xattention`` script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
