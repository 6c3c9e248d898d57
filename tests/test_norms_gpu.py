"""kernels.norms on a CUDA GPU: the Triton kernels (through jax-triton) against a float64 oracle.

Every kernel output is checked twice: through the public ops (custom_vjp, jit) and through the launch
functions with poisoned outputs (each output buffer pre-filled with NaN and aliased to the kernel's
output), so an element the kernel never writes fails the test. The kernel variants (see
`test_norms.use_variant`) run: "hold-params" on the GPU's own SMs, and "reload-params" pretending the
GPU has 3 SMs, so that every persistent program walks many row tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_norms import (
    BF16,
    F32,
    LARGE_MEAN_TOL_F32,
    OPS,
    TOL,
    VARIANTS,
    _ln_stats_errors,
    assert_launched,
    check_against_oracle,
    make_inputs,
    op_eps,
    oracle,
    rel_err,
    use_variant,
)

from kernels import norms
from kernels.norms import launch

pytestmark = pytest.mark.gpu

SHAPES = [(1, 512), (33, 512), (37, 1000), (4099, 1024), (130, 2048), (257, 7168), (130, 8192), (64, 16384)]
API_SHAPES = [(33, 512), (130, 2048), (257, 7168)]  # the launch-level test below covers every shape


def _seed(*key) -> int:
    return abs(hash(key)) % 2**32


def _use(monkeypatch, variant: str = "hold-params") -> list[tuple[str, dict]]:
    return use_variant(monkeypatch, variant, num_sms=3 if variant == "reload-params" else None)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", API_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("op", OPS)
def test_fused_ops_match_float64(op, dtype, shape, variant, monkeypatch):
    launched = _use(monkeypatch, variant)
    rng = np.random.default_rng(_seed(op, str(dtype), shape))
    args, cts = make_inputs(op, shape, dtype, rng, mean=0.3)
    check_against_oracle(op, "fused", args, cts, TOL[jnp.dtype(dtype)], jit=True)
    assert_launched(launched, variant)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("op", OPS)
def test_poisoned_kernel_outputs_are_all_written(op, dtype, shape, monkeypatch):
    launched = _use(monkeypatch)
    rng = np.random.default_rng(_seed(op, str(dtype), shape, "poison"))
    args, cts = make_inputs(op, shape, dtype, rng, mean=-0.7)
    want_outs, want = oracle(op, args, cts, round_to=args["x"].dtype)
    tol = TOL[jnp.dtype(dtype)]
    x, w = args["x"], args["scale"]
    eps = op_eps(op)
    if op.startswith("layer_norm"):
        act = {"layer_norm": None, "layer_norm_gelu": "gelu", "layer_norm_gelu_tanh": "gelu_tanh"}[op]
        b = args["bias"]
        y, mean, rstd = launch.layer_norm_fwd(x, w, b, eps=eps, activation=act, poison=True)
        dx, dw, db = launch.layer_norm_bwd(x, w, b, cts[0], mean, rstd, activation=act, poison=True)
        got = {"x": dx, "scale": dw.sum(0), "bias": db.sum(0)}
        assert np.all(np.isfinite(np.asarray(mean))) and np.all(np.isfinite(np.asarray(rstd)))
        outs = (y,)
    else:
        res = args.get("residual")
        y, h, rstd = launch.rms_norm_fwd(x, res, w, eps=eps, poison=True)
        dres = cts[1] if res is not None else None
        dx, dw = launch.rms_norm_bwd(h if res is not None else x, w, cts[0], dres, rstd, poison=True)
        got = {"x": dx, "scale": dw.sum(0)}
        outs = (y, h) if res is not None else (y,)
        assert np.all(np.isfinite(np.asarray(rstd)))
    for i, (o, want_o) in enumerate(zip(outs, want_outs, strict=True)):
        assert rel_err(o, want_o) < tol, f"output {i}"
    for name, g in got.items():
        assert rel_err(g, want[name]) < tol, f"grad {name}: {rel_err(g, want[name]):.2e}"
    assert_launched(launched)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("op", ["layer_norm", "layer_norm_gelu", "rms_norm"])
def test_large_mean_rows(op, variant, monkeypatch):
    launched = _use(monkeypatch, variant)
    rng = np.random.default_rng(_seed(op, "large"))
    args, cts = make_inputs(op, (300, 4096), F32, rng, mean=1e3, std=1.0)
    check_against_oracle(op, "fused", args, cts, LARGE_MEAN_TOL_F32, jit=True)
    assert_launched(launched, variant)


@pytest.mark.parametrize("mean", [0.0, 1e3])
def test_one_pass_statistics_on_gpu(mean):
    """The LayerNorm forward's shifted one-pass statistics (forced on for float32 here) on large-mean rows, and
    their worst case: all of a row's spread in its first element, bounded by ~hidden * float32 rounding (the reason
    they run for 16-bit inputs only)."""
    rng = np.random.default_rng(_seed("one pass", mean))
    x = rng.normal(mean, 1.0, (64, 8192))
    assert max(_ln_stats_errors(jnp.asarray(x, F32), one_pass=True, runner="triton")) < LARGE_MEAN_TOL_F32
    x[:, 0] = mean + 1e4
    assert max(_ln_stats_errors(jnp.asarray(x, F32), one_pass=True, runner="triton")) < 2.0**-9
    assert max(_ln_stats_errors(jnp.asarray(x, F32), one_pass=False, runner="triton")) < LARGE_MEAN_TOL_F32


@pytest.mark.parametrize("hidden", [8192, 16384])
def test_bf16_rows_with_outlier_first_element(hidden, monkeypatch):
    launched = _use(monkeypatch)
    rng = np.random.default_rng(_seed("outlier", hidden))
    args, cts = make_inputs("layer_norm_gelu", (96, hidden), BF16, rng)
    args["x"] = args["x"].at[:, 0].set(1e4)
    check_against_oracle("layer_norm_gelu", "fused", args, cts, TOL[jnp.dtype(BF16)], jit=True)
    assert_launched(launched)


def test_bf16_params_and_leading_dims():
    rng = np.random.default_rng(3)
    args, cts = make_inputs("layer_norm_gelu", (2, 3, 77, 7168), BF16, rng, param_dtype=BF16)
    check_against_oracle("layer_norm_gelu", "fused", args, cts, TOL[jnp.dtype(BF16)], jit=True)


def test_auto_picks_the_kernel_on_gpu():
    x = jnp.ones((4, 512), BF16)
    assert norms._runner("auto", x) == "triton"
    assert norms._runner("auto", x.astype(jnp.float16)) is None


def test_nan_input_row_stays_in_its_row(monkeypatch):
    _use(monkeypatch)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 1024)).astype(np.float32)
    x[5, 17] = np.nan
    s, b = jnp.ones(1024), jnp.zeros(1024)
    y = np.asarray(norms.layer_norm_gelu(jnp.asarray(x), s, b, impl="fused"))
    assert np.all(np.isnan(y[5]))
    rows = np.arange(64) != 5
    want = np.asarray(norms.layer_norm_gelu(jnp.asarray(x[rows]), s, b, impl="fused"))
    np.testing.assert_array_equal(y[rows], want)


def test_jit_vmap_free_grad_through_model_like_use(monkeypatch):
    """Gradients through two stacked fused norms under jit equal the reference's (fp32)."""
    _use(monkeypatch)
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(8, 128, 2048)), F32)
    r = jnp.asarray(rng.normal(size=x.shape), F32)
    s = jnp.asarray(rng.normal(1.0, 0.1, 2048), F32)

    def loss(x, r, s, impl):
        y, h = norms.add_rms_norm(x, r, s, impl=impl)
        z = norms.layer_norm_gelu(y, s, s * 0.1, impl=impl)
        return jnp.sum(z * jnp.cos(h))

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(x, r, s, "fused")
    want = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(x, r, s, "reference")
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, np.asarray(w, np.float64)) < 2e-5
