"""The ``xattention demo`` command: table, picture, and the pieces it is built from."""

from __future__ import annotations

import sys

import pytest
import torch

from xattention import demo, stats
from xattention.cli import main
from xattention.stats import block_attention_mass
from xattention.synthetic import structured_qkv

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Small enough to keep each run around a second; --backend torch keeps the Triton interpreter
# (TRITON_INTERPRET=1 in CI) out of it.
SMALL = ["--seq-len", "512", "--heads", "4", "--kv-heads", "2", "--backend", "torch",
         "--no-progress"]


def parse_table(text: str) -> dict[str, dict[str, float]]:
    """Rows of the printed table, keyed by 'dense' or the threshold as printed."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["method", "threshold"])
    header = lines[start].split()
    assert header == ["method", "threshold", "density", "rel_error", "recall", "time_ms"]
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        if cells[0] == "dense":
            key, values = "dense", cells[3:]  # "dense (SDPA)" is two words
            assert cells[2] == "-"
        else:
            assert cells[0] == "xattention"
            key, values = cells[1], cells[2:]
        rows[key] = dict(zip(header[2:], map(float, values), strict=True))
    return rows


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["demo", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prints_table_and_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "pics" / "demo.png"
    code, stdout, _ = run_cli(capsys, *SMALL, "--thresholds", "0.9", "0.99", "1.0",
                              "--out", str(out))
    assert code == 0
    rows = parse_table(stdout)
    assert set(rows) == {"dense", "0.9", "0.99", "1"}

    for row in rows.values():
        assert 0 < row["density"] <= 1
        assert 0 <= row["recall"] <= 1 + 1e-6
        assert row["rel_error"] >= 0
        assert row["time_ms"] > 0
    dense = rows["dense"]
    assert dense["density"] == 1 and dense["recall"] == 1 and dense["rel_error"] == 0

    # Threshold 1 keeps every causal block: dense attention up to float32 rounding.
    assert rows["1"]["density"] == 1
    assert rows["1"]["recall"] >= 0.9999
    assert rows["1"]["rel_error"] < 1e-4
    # Near 1, little is lost; a higher threshold never keeps fewer blocks or less mass.
    assert rows["0.99"]["rel_error"] < 0.1
    assert rows["0.99"]["recall"] > 0.99
    assert rows["0.9"]["density"] <= rows["0.99"]["density"] <= rows["1"]["density"]
    assert rows["0.9"]["recall"] <= rows["0.99"]["recall"] + 1e-6
    assert rows["0.9"]["density"] < 1  # the structured inputs do let XAttention skip blocks

    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert f"wrote {out}" in stdout
    import matplotlib.image

    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    # The three kinds of block have clearly different colours, all present in the picture.
    from matplotlib.colors import to_rgb

    from xattention.demo import plot

    colours = [torch.tensor(to_rgb(c)) for c in (plot.KEPT, plot.DROPPED, plot.CAUSAL)]
    pixels = torch.from_numpy(image[..., :3].copy()).reshape(-1, 3)
    for c in colours:
        assert ((pixels - c).abs().max(-1).values < 0.02).sum() > 100
    for a in colours:
        for b in colours:
            assert a is b or (a - b).abs().max() > 0.25


def test_without_matplotlib_prints_table_and_install_hint(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    out = tmp_path / "demo.png"
    code, stdout, _ = run_cli(capsys, *SMALL, "--thresholds", "0.9", "--out", str(out))
    assert code == 0
    assert set(parse_table(stdout)) == {"dense", "0.9"}
    assert 'pip install -e ".[demo]"' in stdout
    assert not out.exists()


def test_bad_arguments_exit_with_message(capsys):
    code, _, stderr = run_cli(capsys, *SMALL, "--plot-head", "4", "--out", "")
    assert code == 2
    assert "plot_head" in stderr
    with pytest.raises(SystemExit):
        main(["demo", "--thresholds", "0"])
    assert "thresholds" in capsys.readouterr().err


def test_inputs_are_seeded_and_shaped():
    a = structured_qkv(1, 4, 2, 300, head_dim=32, seed=3)
    b = structured_qkv(1, 4, 2, 300, head_dim=32, seed=3)
    c = structured_qkv(1, 4, 2, 300, head_dim=32, seed=4)
    q, k, v, profiles = a
    assert q.shape == (1, 4, 300, 32) and k.shape == v.shape == (1, 2, 300, 32)
    assert q.dtype == k.dtype == v.dtype == torch.float32
    assert len(profiles) == 4
    for x, y in zip(a[:3], b[:3], strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="head_dim"):
        structured_qkv(1, 8, 2, 64, head_dim=4)
    with pytest.raises(ValueError, match="q_len"):
        structured_qkv(1, 8, 2, 64, 32)
    with pytest.raises(ValueError, match="kv_heads"):
        structured_qkv(1, 8, 3, 64)


def test_chunked_prefill_inputs_are_the_tail_of_the_full_sequence():
    """Lq < Lk: the queries are the last Lq positions, so their logits against the keys follow
    the same patterns (local window peaks near the query's own absolute position)."""
    q, k, _, _ = structured_qkv(1, 4, 2, 200, 1000, head_dim=64, seed=1)
    mass = block_attention_mass(q, k, block_size=100, causal=True)[0]  # [H, 2, 10]
    assert mass.shape == (4, 2, 10)
    # The query blocks sit at key blocks 8 and 9: next to the sink (block 0), their own block
    # holds far more mass than the blocks in between.
    middle = mass[:, :, 1:7].median()
    assert mass[:, 0, 8].min() > 10 * middle and mass[:, 1, 9].min() > 10 * middle
    assert mass[:, :, 0].min() > 10 * middle


def test_inputs_have_sinks_and_local_windows():
    q, k, v, _ = structured_qkv(1, 4, 2, 1024, head_dim=64, seed=0)
    mass = block_attention_mass(q, k, block_size=64)[0]  # [H, nQB, nKB]
    sink = mass[:, 8:, 0].mean()  # query blocks well past the start
    diagonal = torch.diagonal(mass, dim1=-2, dim2=-1)[:, 8:].mean()
    # A typical block between the sink and the local window.
    idx = torch.arange(mass.shape[-1])
    middle = (idx[None, :] >= 1) & (idx[None, :] <= idx[:, None] - 2) & (idx[:, None] >= 8)
    typical = mass[:, middle].median()
    assert sink > 20 * typical and diagonal > 20 * typical
    assert diagonal > 0.3  # most of a head's attention stays local


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("q_len,block_size", [(200, 64), (256, 64), (100, 128)])
def test_block_attention_mass_matches_dense_softmax(monkeypatch, q_len, block_size, causal):
    gen = torch.Generator().manual_seed(q_len)
    k_len = 256
    q = torch.randn(1, 4, q_len, 16, generator=gen)
    k = torch.randn(1, 2, k_len, 16, generator=gen)
    # Tiny chunks so that several chunks (and a short last block) are exercised.
    monkeypatch.setattr(stats, "_MASS_CHUNK_ELEMENTS", 1)
    mass = block_attention_mass(q, k, block_size, causal=causal)
    per_row = block_attention_mass(q, k, block_size, causal=causal, per_row=True)

    kr = k.double().repeat_interleave(2, dim=1)
    logits = q.double() @ kr.transpose(-1, -2) / 4.0
    if causal:
        pos = torch.arange(k_len - q_len, k_len)[:, None]
        logits = logits.masked_fill(torch.arange(k_len)[None, :] > pos, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    n_qb, n_kb = -(-q_len // block_size), -(-k_len // block_size)
    expected = torch.zeros(1, 4, n_qb, n_kb, dtype=torch.float64)
    expected_rows = torch.zeros(1, 4, q_len, n_kb, dtype=torch.float64)
    for j in range(n_kb):
        expected_rows[..., j] = probs[..., j * block_size : (j + 1) * block_size].sum(-1)
    for i in range(n_qb):
        expected[:, :, i] = expected_rows[:, :, i * block_size : (i + 1) * block_size].mean(-2)
    torch.testing.assert_close(mass.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(per_row.double(), expected_rows, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 4, n_qb), atol=1e-5, rtol=0)


def test_block_attention_mass_rejects_bad_input():
    q = torch.randn(1, 3, 10, 8)
    with pytest.raises(ValueError, match="multiple"):
        block_attention_mass(q, torch.randn(1, 2, 10, 8))
    with pytest.raises(ValueError, match="block_size"):
        block_attention_mass(q, q, block_size=0)


def test_run_demo_returns_masks_and_metrics():
    threads = torch.get_num_threads()
    result = demo.run_demo(seq_len=300, heads=2, kv_heads=1, head_dim=32, thresholds=(0.95,),
                           block_size=64, device="cpu", backend="torch", out=None,
                           progress=False, threads=1)
    assert result.config["threads"] == 1 and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="threads"):
        demo.run_demo(seq_len=300, threads=0, out=None)
    assert [r.method for r in result.rows] == ["dense (SDPA)", "xattention"]
    row = result.rows[1]
    assert row.mask.shape == (1, 2, 5, 5) and row.mask.dtype == torch.bool
    recall = (result.mass * row.mask).sum(-1).mean().item()
    assert row.recall == pytest.approx(recall)
    assert result.png is None and result.png_skipped_reason is None
    assert "xattention" in result.table()
