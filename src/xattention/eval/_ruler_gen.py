"""Run one of ``nvidia-long-context-eval``'s RULER generator scripts in this (sub)process.

``python -m xattention.eval._ruler_gen SCRIPT [generator args...]``

The generators are command-line scripts that parse their arguments and load their tokenizer at
import time, so each runs in its own process. Two things are adjusted first:

* ``nltk.tokenize.sent_tokenize`` needs NLTK's downloadable ``punkt`` data, which cannot be
  fetched offline; ``PunktSentenceTokenizer()`` (untrained parameters, shipped with NLTK)
  splits sentences without it.
* the scripts import siblings (``tokenizer``, ``constants``) by bare name, as when run from
  their folder: that folder and its parent go on ``sys.path``.
"""

from __future__ import annotations

import os
import runpy
import sys


def _patch_sentence_splitter() -> None:
    import nltk
    import nltk.tokenize
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    splitter = PunktSentenceTokenizer()

    def sent_tokenize(text: str, language: str = "english") -> list[str]:
        return splitter.tokenize(text)

    nltk.tokenize.sent_tokenize = sent_tokenize
    nltk.sent_tokenize = sent_tokenize


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m xattention.eval._ruler_gen SCRIPT [args...]")
    script = os.path.abspath(argv[0])
    _patch_sentence_splitter()
    folder = os.path.dirname(script)
    sys.path[:0] = [folder, os.path.dirname(folder)]
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
