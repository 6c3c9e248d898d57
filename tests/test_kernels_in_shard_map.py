"""The Triton grouped matmuls (in Triton's interpreter) inside `jax.shard_map`, as the MoE layer runs them: each
device multiplies its own tokens by expert weights that are the same on every device of the data axis. The `gpu`
tests run the compiled kernels on two GPUs (skipped with fewer).

A kernel call's outputs carry no varying-axes type, and a custom_vjp must return each cotangent with its input's
type; `triton_runtime.varying_like` takes care of both (without it these programs fail to trace)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from kernels.fp8.grouped import fp8_gmm
from kernels.gmm import gmm
from tests.helpers import layout, needs_triton_interpreter

E, T, K, N = 3, 40, 160, 24
SIZES = [[20, 0, 12], [5, 30, 0]]  # per device; rows past the sum are padding


def _grads(matmul, impl: str):
    """Gradients of sum(y * dy) over both devices w.r.t. the per-device tokens and the shared weights."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    if len(mesh.devices.flat) < 2:
        pytest.skip("needs two devices")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2 * T, K)), jnp.float32)
    w = jnp.asarray(0.05 * rng.standard_normal((E, K, N)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((2 * T, N)), jnp.float32)
    sizes = jnp.asarray(np.concatenate(SIZES), jnp.int32)

    def loss(x, w):
        def per_device(x, w, sizes, dy):
            y = matmul(x, w, sizes, impl=impl)
            return jax.lax.psum(jnp.sum(y.astype(jnp.float32) * dy), "data")

        spec = (P("data"), P(), P("data"), P("data"))
        return jax.shard_map(per_device, mesh=mesh, in_specs=spec, out_specs=P())(x, w, sizes, dy)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "matmul,dw_tol",
    [(gmm, 1e-5), (fp8_gmm, 5e-3)],  # fp8: the kernels' expert weight gradient runs in bf16 (kernels/fp8/README.md)
    ids=["gmm", "fp8_gmm"],
)
@needs_triton_interpreter
def test_grouped_kernels_in_shard_map_match_the_reference(matmul, dw_tol):
    (dx, dw), (dx_ref, dw_ref) = _grads(matmul, "interpret"), _grads(matmul, "reference")
    assert _rel(dx, dx_ref) < 1e-5
    assert _rel(dw, dw_ref) < dw_tol  # summed over both devices' tokens, as autodiff of a plain matmul would
    assert np.any(np.asarray(dw)) and not np.any(np.asarray(dx)[sum(SIZES[0]) : T]), "padding rows get no gradient"


@pytest.mark.parametrize("overrides", [("kernels.gmm=interpret",), ("precision.matmul=fp8", "kernels.fp8=interpret")])
@needs_triton_interpreter
def test_deepseek_train_step_with_interpreted_kernels_lowers_on_two_data_shards(overrides):
    from jaxdeep.train.state import build_setup, init_train_state
    from jaxdeep.train.step import make_train_step

    cfg, mesh = layout("model.kind=deepseek", "model.deepseek.num_nextn_predict_layers=0", *overrides, data=2)
    setup = build_setup(cfg, mesh)
    state = init_train_state(setup)
    tokens = jnp.zeros((cfg.data.global_batch_size, cfg.data.seq_len + 1), jnp.int32)
    make_train_step(setup).lower(state, tokens)  # tracing is where the varying-axes types must agree


def _need_two_gpus():
    if sum(d.platform == "gpu" for d in jax.devices()) < 2:
        pytest.skip("needs two GPUs")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "matmul,dx_tol,dw_tol",
    # float32 gmm runs IEEE float32 products; fp8_gmm's FP8 tensor cores accumulate one 128-element chunk ~2.5e-4
    # off the exact product (tests/test_fp8_triton.py), and its weight gradient runs in bf16.
    [(gmm, 1e-5, 1e-5), (fp8_gmm, 1e-3, 5e-3)],
    ids=["gmm", "fp8_gmm"],
)
def test_gpu_grouped_kernels_in_shard_map_match_the_reference(matmul, dx_tol, dw_tol):
    _need_two_gpus()
    (dx, dw), (dx_ref, dw_ref) = _grads(matmul, "triton"), _grads(matmul, "reference")
    assert _rel(dx, dx_ref) < dx_tol
    assert _rel(dw, dw_ref) < dw_tol
    assert np.any(np.asarray(dw)) and not np.any(np.asarray(dx)[sum(SIZES[0]) : T]), "padding rows get no gradient"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kernels,reference,tol",
    [
        (("kernels.gmm=triton",), ("kernels.gmm=reference",), 1e-5),
        # the projections stay on the reference on a mesh of two devices ("auto"); the experts run FP8 kernels
        (("precision.matmul=fp8", "kernels.fp8=auto"), ("precision.matmul=fp8", "kernels.fp8=reference"), 2e-3),
    ],
    ids=["gmm", "fp8"],
)
def test_gpu_deepseek_train_steps_on_two_data_shards_match_the_reference(kernels, reference, tol):
    """Three DeepSeek training steps on two GPUs (mesh.data=2): the routed experts on the kernels give the losses
    of the reference."""
    from jaxdeep.train.state import build_setup, init_train_state
    from jaxdeep.train.step import make_train_step

    _need_two_gpus()
    losses = []
    for overrides in (kernels, reference):
        cfg, mesh = layout("model.kind=deepseek", "model.deepseek.num_nextn_predict_layers=0", *overrides, data=2)
        setup = build_setup(cfg, mesh)
        state, step = init_train_state(setup), make_train_step(setup)
        shape = (cfg.data.global_batch_size, cfg.data.seq_len + 1)
        tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, shape), jnp.int32)
        run = []
        for _ in range(3):  # the same batch each step, so the loss must fall
            state, metrics = step(state, tokens)
            run.append(float(metrics["loss"]))
        losses.append(run)
    got, want = np.asarray(losses[0]), np.asarray(losses[1])
    assert np.all(np.isfinite(got)) and want[-1] < want[0]  # the reference learns
    np.testing.assert_allclose(got, want, rtol=tol)
