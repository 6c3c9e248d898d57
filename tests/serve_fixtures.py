"""One serving engine and HTTP server shared by the serving tests of a pytest process (loading and compiling
the engine is the slow part), plus small HTTP helpers."""

from __future__ import annotations

import atexit
import functools
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

from jaxdeep.serve.server import BackgroundServer, OpenAIServer

REPO = Path(__file__).resolve().parents[1]
NUM_SLOTS = 2
MAX_WAITING = 2
MAX_CONTEXT = 256


# The quickstart experiment shrunk to a tiny model on one device.
ONE_DEVICE = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]


@functools.cache
def shared_server() -> BackgroundServer:
    """A server over the real engine (`load_engine`); both live until the test process ends."""
    import jax

    from jaxdeep.serve.loading import load_engine
    from tests.fast_compile import FAST
    from tests.helpers import TINY

    engine = load_engine(
        str(REPO / "experiments" / "quickstart.yaml"),
        [*TINY, *ONE_DEVICE],
        devices=jax.devices()[:1],
        num_slots=NUM_SLOTS,
        max_waiting=MAX_WAITING,
        max_context=MAX_CONTEXT,
        prefill_chunk=16,
        compiler_options=FAST,
    )
    server = BackgroundServer(OpenAIServer(engine, batch_sample_interval=0.005))
    atexit.register(engine.close)
    atexit.register(server.close)
    return server


def post(url: str, body: dict | bytes, timeout: float = 60) -> tuple[int, dict]:
    """POST JSON (or raw bytes); the status and the parsed JSON answer, errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
