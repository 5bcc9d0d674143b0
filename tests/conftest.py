"""Shared fixtures: backends, reproducible per-test seeds, structured attention inputs.

The session runs in a temporary home for caches: nothing lands in the user's ``~/.cache``.
"""

import atexit
import os
import shutil
import tempfile

# Must happen before anything imports triton (docs/design.md).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("XATTENTION_POISON_OUTPUTS", "1")  # kernels' unwritten outputs read as NaN

# Caches of this package, matplotlib, Hugging Face (tokenizers, hub) and anything else that follows
# the XDG convention go to a directory of this session, removed at exit. Set before those libraries
# are imported, since some read the variables only then. Installed model packages are read in place.
_CACHE_HOME = tempfile.mkdtemp(prefix="xattention-tests-")
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)
for _var, _sub in [("XATTENTION_CACHE", "xattention"), ("MPLCONFIGDIR", "matplotlib"),
                   ("HF_HOME", "huggingface"), ("XDG_CACHE_HOME", "")]:
    os.environ[_var] = os.path.join(_CACHE_HOME, _sub)

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from inputs import make_random_qkv, make_structured_qkv  # noqa: E402

from xattention._backend import triton_import_error  # noqa: E402

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Backend name; 'triton' runs under the CPU interpreter and is skipped when unavailable."""
    if request.param == "triton":
        reason = triton_import_error()
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """An explicit backend="triton" may refuse an exotic block size (not a power of two) with a
    ValueError naming block_size; backend="auto" must still serve it (tested apart)."""
    try:
        return (yield)
    except ValueError as exc:
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


# --------------------------------------------------------------------------------------
# Real models: loaded once per session
# --------------------------------------------------------------------------------------

_LOADED: dict = {}


@pytest.fixture(autouse=True, scope="session")
def _load_each_model_once():
    """``xattention.eval.models.load_model`` memoised for the session: the transformers, eval and
    calibration tests share one de-quantised SmolLM2 (each load converts the GGUF again, seconds
    on a quiet machine and far more on a loaded one). Every hand-out is disabled first, so a test
    that left XAttention enabled cannot leak into the next."""
    try:
        from xattention.eval import models
    except ModuleNotFoundError:
        yield
        return
    original = models.load_model

    def load_model(name, device="cpu", dtype=None):
        key = (name, str(device), dtype)
        if key not in _LOADED:
            _LOADED[key] = original(name, device=device, dtype=dtype)
        model, tok = _LOADED[key]
        try:
            import xattention.integrations.transformers as xt

            xt.disable(model)
        except ModuleNotFoundError:
            pass
        return model, tok

    models.load_model = load_model
    yield
    models.load_model = original
    _LOADED.clear()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """This test session's evaluation cache (checked tokenizers, RULER samples), shared by the
    evaluation and calibration tests: each tokenizer is converted and each sample set made once."""
    path = tmp_path_factory.getbasetemp() / "xattention-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    from xattention.eval.models import load_tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XATTENTION_CACHE", str(cache_dir))
        return load_tokenizer("smollm2")
