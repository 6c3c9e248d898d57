"""The Triton grouped matmuls (in Triton's interpreter) inside `jax.shard_map`, as the MoE layer runs them: each
device multiplies its own tokens by expert weights that are the same on every device of the data axis.

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
from tests.helpers import layout

E, T, K, N = 3, 40, 160, 24
SIZES = [[20, 0, 12], [5, 30, 0]]  # per device; rows past the sum are padding


def _grads(matmul, impl: str):
    """Gradients of sum(y * dy) over both devices w.r.t. the per-device tokens and the shared weights."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
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
def test_grouped_kernels_in_shard_map_match_the_reference(matmul, dw_tol):
    (dx, dw), (dx_ref, dw_ref) = _grads(matmul, "interpret"), _grads(matmul, "reference")
    assert _rel(dx, dx_ref) < 1e-5
    assert _rel(dw, dw_ref) < dw_tol  # summed over both devices' tokens, as autodiff of a plain matmul would
    assert np.any(np.asarray(dw)) and not np.any(np.asarray(dx)[sum(SIZES[0]) : T]), "padding rows get no gradient"


@pytest.mark.parametrize("overrides", [("kernels.gmm=interpret",), ("precision.matmul=fp8", "kernels.fp8=interpret")])
def test_deepseek_train_step_with_interpreted_kernels_lowers_on_two_data_shards(overrides):
    from jaxdeep.train.state import build_setup, init_train_state
    from jaxdeep.train.step import make_train_step

    cfg, mesh = layout("model.kind=deepseek", "model.deepseek.num_nextn_predict_layers=0", *overrides, data=2)
    setup = build_setup(cfg, mesh)
    state = init_train_state(setup)
    tokens = jnp.zeros((cfg.data.global_batch_size, cfg.data.seq_len + 1), jnp.int32)
    make_train_step(setup).lower(state, tokens)  # tracing is where the varying-axes types must agree
