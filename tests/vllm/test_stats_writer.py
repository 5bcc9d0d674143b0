"""Publishing the vLLM backend's statistics without a host synchronisation in ``forward``: the
writer thread waits for the step's device work, ``read_stats`` waits for a write in flight, and a
step publishes once, after its last XAttention layer (no vLLM needed)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from xattention.integrations._common.stats import AttentionStats
from xattention.integrations.vllm import read_stats, stats


class Gate:
    """Stands for the step's CUDA event: ``synchronize`` returns once the test opens it."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.waited_on = threading.Event()  # the writer thread has reached this snapshot

    def synchronize(self) -> None:
        self.waited_on.set()
        assert self.opened.wait(10), "the test never opened the gate"


def _summary(kept: list[float], calls: int = 1) -> AttentionStats:
    s = AttentionStats()
    for _ in range(calls):
        s.add(0, torch.tensor(kept), total=4.0, sparse=True, q_len=512, k_len=512)
    return s


@pytest.fixture
def writer():
    w = stats.StatsWriter()
    yield w
    w.close()


def test_file_is_written_only_after_the_device_work(tmp_path, writer):
    gate = Gate()
    writer.submit(gate, _summary([3.0, 1.0]), tmp_path, rank=0)
    marker = tmp_path / ".rank0.pending"
    assert marker.exists() and not (tmp_path / "rank0.json").exists()
    # A reader with no time to wait reads what is there (nothing yet) rather than hang.
    start = time.monotonic()
    assert read_stats(tmp_path, wait=0.2) == {}
    assert time.monotonic() - start >= 0.2
    gate.opened.set()
    got = read_stats(tmp_path, wait=10)
    assert got[0]["per_layer"] == {"0": 0.5}
    assert got[0]["pid"] == os.getpid()
    assert not marker.exists()


def test_a_backlog_is_written_once_as_its_newest(tmp_path, writer, monkeypatch):
    writes = []
    real_write = stats.write
    monkeypatch.setattr(stats, "write", lambda s, d, r: (writes.append(s), real_write(s, d, r)))
    first = Gate()
    writer.submit(first, _summary([1.0, 1.0]), tmp_path, rank=1)
    assert first.waited_on.wait(10)  # the thread holds the first snapshot before more arrive
    newer = [Gate(), Gate()]
    writer.submit(newer[0], _summary([2.0, 2.0], calls=2), tmp_path, rank=1)
    writer.submit(newer[1], _summary([4.0, 0.0], calls=3), tmp_path, rank=1)
    for g in (first, *newer):
        g.opened.set()
    got = read_stats(tmp_path, wait=10)[1]
    assert got["sparse_calls"] == {"0": 3}
    assert got["per_head"]["0"] == [pytest.approx(1.0), pytest.approx(0.0)]
    assert len(writes) == 2  # the first, then only the newest of the two queued behind it
    assert not (tmp_path / ".rank1.pending").exists()


def test_close_writes_what_is_queued(tmp_path):
    w = stats.StatsWriter()
    gate = Gate()
    gate.opened.set()
    w.submit(gate, _summary([3.0, 3.0]), tmp_path, rank=0)
    w.close()
    assert read_stats(tmp_path, wait=0)[0]["overall"] == pytest.approx(0.75)


def test_a_dead_writers_marker_is_not_waited_for(tmp_path):
    stats.write(_summary([4.0, 4.0]), tmp_path, 0)
    (tmp_path / ".rank0.pending").write_text("999999999")  # no such process
    start = time.monotonic()
    assert read_stats(tmp_path, wait=30)[0]["overall"] == pytest.approx(1.0)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("wait", [-1, "5", True, float("nan")])
def test_bad_wait_is_named(tmp_path, wait):
    with pytest.raises(ValueError, match="wait"):
        read_stats(tmp_path, wait=wait)


def test_a_step_publishes_after_its_last_layer(tmp_path, monkeypatch):
    monkeypatch.setattr(stats, "_stats", AttentionStats())
    monkeypatch.setattr(stats, "_dirty", False)
    monkeypatch.setattr(stats, "_layers_this_step", 0)
    mask = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    for step in range(2):
        for layer in range(3):
            stats.record(layer, mask, 512, 512, heads=2, block_size=128)
            stats.layer_done(str(tmp_path), 0, layers_per_step=3)
            written = (tmp_path / "rank0.json").exists()
            # CPU counts: written at once, but only at the step's third layer.
            assert written == (step > 0 or layer == 2)
        got = read_stats(tmp_path, wait=0)[0]
        assert got["sparse_calls"] == {str(i): step + 1 for i in range(3)}
    # Nothing recorded since: the next step's end writes nothing new.
    (tmp_path / "rank0.json").unlink()
    for _ in range(3):
        stats.layer_done(str(tmp_path), 0, layers_per_step=3)
    assert not (tmp_path / "rank0.json").exists()


def test_host_copy_is_detached_from_later_counts():
    live = _summary([3.0, 1.0])
    copy = live.host_copy()
    live.add(0, torch.tensor([1.0, 3.0]), total=4.0, sparse=True, q_len=512, k_len=512)
    assert copy.as_dict()["per_head"]["0"] == [0.75, 0.25]
    assert live.as_dict()["per_head"]["0"] == [0.5, 0.5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_counts_publish_through_the_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(stats, "_stats", AttentionStats())
    monkeypatch.setattr(stats, "_dirty", False)
    mask = torch.rand(1, 4, 8, 8, device="cuda") < 0.5
    stats.record(0, mask, 1024, 1024, heads=4, block_size=128)
    expected = stats.worker_stats().as_dict()["per_head"]["0"]  # reads the device (a sync)
    stats.publish(str(tmp_path), 0)
    assert read_stats(tmp_path, wait=10)[0]["per_head"]["0"] == expected
