"""Shared fixtures: backends, reproducible per-test seeds, structured attention inputs."""

import os

# Must happen before anything imports triton (DESIGN.md section 6).
os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from inputs import make_random_qkv, make_structured_qkv  # noqa: E402

BACKENDS = ["torch", "triton"]


def _triton_unavailable_reason():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton not importable: {exc!r}"
    try:
        import xattention.kernels  # noqa: F401
    except Exception as exc:
        return f"xattention.kernels not importable: {exc!r}"
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Backend name; 'triton' runs under the CPU interpreter and is skipped when unavailable."""
    if request.param == "triton":
        reason = _triton_unavailable_reason()
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.fixture(params=BACKENDS)
def select_path(request, monkeypatch):
    """Which select_blocks implementation runs.

    select_blocks has no backend argument (DESIGN.md section 3): 'auto' picks the Triton kernel
    under TRITON_INTERPRET=1 and the PyTorch path otherwise, so the variable is toggled for the
    test. Interpreter runs are slow per row: tests keep them to a few block rows.
    """
    if request.param == "triton":
        reason = _triton_unavailable_reason()
        if reason:
            pytest.skip(reason)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    return request.param


@pytest.fixture
def torch_select(monkeypatch):
    """Run select_blocks on its PyTorch path (see select_path)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A NotImplementedError from the triton backend means 'not there yet': skip, don't fail."""
    try:
        return (yield)
    except NotImplementedError as exc:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "triton" in (params.get("backend"), params.get("select_path")):
            pytest.skip(f"triton backend raised NotImplementedError: {exc}")
        raise
    except ValueError as exc:
        # An explicit backend="triton" may refuse an exotic block size (not a power of two) with
        # a ValueError naming block_size; backend="auto" must still serve it (tested apart).
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (
            params.get("backend") == "triton"
            and item.get_closest_marker("triton_may_refuse_block_size")
            and "block_size" in str(exc)
        ):
            pytest.skip(f"triton backend refuses this block_size: {exc}")
        raise


def pytest_collection_modifyitems(config, items):
    """Run the cheap torch-backend tests before the interpreter ones."""
    items.sort(key=lambda it: "triton" in it.nodeid)


# --------------------------------------------------------------------------------------
# Seeds and inputs
# --------------------------------------------------------------------------------------


@pytest.fixture
def seed(request):
    """Reproducible, different for every test id."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def gen(seed):
    """A torch.Generator seeded from the test id (successive draws differ within a test)."""
    g = torch.Generator().manual_seed(seed)
    return g


@pytest.fixture
def make_qkv(gen):
    """Factory: make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=..., kind='structured'|'random', **kw)."""

    def _make(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, kind="structured", **kw):
        if kind == "structured":
            return make_structured_qkv(gen, B, Hq, Hkv, Lq, Lk, D, dtype=dtype, **kw)
        if kind == "random":
            return make_random_qkv(gen, B, Hq, Hkv, Lq, Lk, D, dtype=dtype, **kw)
        raise ValueError(kind)

    return _make


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "triton_may_refuse_block_size: backend='triton' may raise ValueError naming block_size",
    )
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
