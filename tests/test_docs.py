"""The docs agree with the code and the committed results.

* Every number the README quotes next to a link into ``benchmarks/results`` or ``eval/results`` is
  in the linked file (up to the rounding the README uses); a chart links through to the data file
  of the same name.
* docs/design.md §13 lists every ``XATTENTION_*`` environment variable the code reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

_LINK = re.compile(r"\]\(((?:benchmarks|eval)/results/[^)#\s]+)\)")
_QUOTED = re.compile(r"(?<![\w.])(\d+\.\d+)(?![\w.])")  # a decimal number in prose
_ANY = re.compile(r"-?\d+\.\d+(?:e-?\d+)?|-?\d+")


def _blocks() -> list[str]:
    """Paragraphs, list items and table rows of the README: the unit a number belongs to."""
    return [b for b in re.split(r"\n\s*\n|\n(?=- )|\n(?=\| )", README) if _LINK.search(b)]


def _data_files(link: str) -> list[Path]:
    path = ROOT / link
    if path.suffix in (".md", ".json", ".txt"):
        return [path]
    return [p for p in (path.with_suffix(".json"), path.with_suffix(".md")) if p.is_file()]


def test_readme_links_to_results_exist():
    for block in _blocks():
        for link in _LINK.findall(block):
            assert (ROOT / link).exists(), link


@pytest.mark.parametrize("block", _blocks(), ids=lambda b: " ".join(b.split())[:60])
def test_readme_numbers_are_in_the_linked_results(block):
    files = [f for link in _LINK.findall(block) for f in _data_files(link)]
    if not files:
        pytest.skip("links only to a picture without a data file")
    have = {float(x) for f in files for x in _ANY.findall(f.read_text(encoding="utf-8"))}
    missing = []
    for text in _QUOTED.findall(block):
        decimals = len(text.split(".")[1])
        value = float(text)
        if not any(abs(h - value) <= 0.5 * 10 ** -decimals + 1e-12 for h in have):
            missing.append(text)
    assert not missing, f"{missing} are not in {[str(f.relative_to(ROOT)) for f in files]}"


def _section(doc: str, number: int) -> str:
    start = doc.index(f"\n## {number}. ")
    end = doc.find("\n## ", start + 1)
    return doc[start:end if end > 0 else None]


def test_design_lists_every_environment_variable():
    read = set()
    for folder in ("src", "benchmarks", ".ci", "eval/gpu", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh") or path.name == "run":
                read |= set(re.findall(r"XATTENTION_[A-Z0-9_]*[A-Z0-9]",
                                       path.read_text(encoding="utf-8", errors="replace")))
    table = _section((ROOT / "docs" / "design.md").read_text(encoding="utf-8"), 13)
    listed = set(re.findall(r"XATTENTION_[A-Z0-9_]*[A-Z0-9]", table))
    # the vLLM row abbreviates its siblings as `_STRIDE`, `_BLOCK_SIZE`, ...
    listed |= {f"XATTENTION{m}" for m in re.findall(r"`(_[A-Z0-9_]+)`", table)}
    assert read - listed == set()


def test_design_chunk_size_matches_the_estimate():
    from xattention import estimate

    section = _section((ROOT / "docs" / "design.md").read_text(encoding="utf-8"), 6)
    exponent = estimate._CHUNK_ELEMENTS.bit_length() - 1
    assert f"at most `2^{exponent}` float32 elements" in section
