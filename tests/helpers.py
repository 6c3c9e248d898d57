"""Shared helpers for tests: tiny configs and meshes over the simulated CPU devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxdeep.config import ExperimentConfig, load_config
from jaxdeep.train.loop import mesh_from_config

# Tests that run the Triton kernels in Triton's interpreter: skipped where it cannot run them (tests/conftest.py).
needs_triton_interpreter = pytest.mark.triton_interpreter

TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.head_dim=8",
    "model.d_ff=64",
    "model.dtype=float32",
    "data.max_bytes=200000",
    "data.seq_len=16",
    "data.global_batch_size=8",
    "optim.warmup_steps=2",
    "train.steps=6",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.checkpoint_every=3",
    "train.progress=false",
    "mesh.topology=auto",
]


def tiny_config(*overrides: str) -> ExperimentConfig:
    return load_config(None, [*TINY, *overrides])


def layout(*overrides: str, **sizes: int):
    """A tiny config with the given mesh axis sizes (others 1), and its mesh over just enough devices."""
    axes = [f"mesh.{a}={sizes.get(a, 1)}" for a in ("data", "fsdp", "expert", "tensor", "pipeline")]
    cfg = load_config(None, [*TINY, *overrides, *axes])
    devices = jax.devices()[: int(np.prod(list(sizes.values()) or [1]))]
    mesh, _ = mesh_from_config(cfg, devices)
    return cfg, mesh


def max_rel_error(a, b) -> float:
    """Largest |a-b| / (|b| + tiny) over all leaves of two pytrees, scaled per leaf by max |b|."""
    errs = []
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        errs.append(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30)))
    return max(errs)


def run_after_triton_import(body: str) -> None:
    """Run `body` in a fresh CPU process that has imported triton as a library would (not in interpreter mode)
    first, as `transformers` does; the body must print "ok"."""
    import os
    import pathlib
    import subprocess
    import sys

    code = "import triton, triton.language\n" + body
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
