"""Numerics of kernels.norms on CPU: references and kernels against a float64 numpy oracle.

- The oracle's own gradients are checked against central differences in float64.
- The pure-JAX reference is checked against the oracle for outputs and every gradient.
- The Triton kernels themselves run through Triton's interpreter (impl="interpret"): same source, same
  launch parameters and argument order as on GPU, outputs pre-filled with NaN so unwritten elements
  fail. The interpreter rounds float32 -> bfloat16 toward zero (the GPU rounds to nearest), so its
  bf16 error is about twice the reference's; still well inside the bf16 tolerance.
- The kernels hold scale/bias in registers or re-read them per tile (`use_variant` picks one); with
  few SMs simulated, every persistent program walks several row tiles.
- The dispatcher: "auto" takes the reference without a GPU, "fused" says why it cannot run.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import norms
from kernels.norms import launch
from tests.helpers import needs_triton_interpreter, run_after_triton_import

BF16 = jnp.bfloat16
F32 = jnp.float32
TOL = {jnp.dtype(F32): 1e-5, jnp.dtype(BF16): 1e-2}
# With |mean| = 1e3 and std = 1, the float32 rounding of the mean alone moves every normalised value by
# about N * eps32 * |mean| / std / N ~ 1e-5..1e-4; the naive E[x^2] - E[x]^2 is off by tens of percent.
LARGE_MEAN_TOL_F32 = 3e-4
OPS = ("layer_norm", "layer_norm_gelu", "layer_norm_gelu_tanh", "rms_norm", "add_rms_norm")
EPS = {"layer_norm": 1e-5, "layer_norm_gelu": 1e-5, "layer_norm_gelu_tanh": 1e-5}
ARGS = {"rms_norm": ("x", "scale"), "add_rms_norm": ("x", "residual", "scale")}  # default: x, scale, bias

_erf = np.vectorize(math.erf, otypes=[np.float64])


# Kernel variants: scale/bias held in registers for a program's life (the default), or re-read per tile.
VARIANTS = ("hold-params", "reload-params")
KERNELS = {"layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd"}


def use_variant(monkeypatch, variant: str = "hold-params", num_sms: int | None = 2) -> list[tuple[str, dict]]:
    """Select `variant` for both kernel families (launch.TUNING) for this test; returns the list that records
    (name, meta-parameters) of every kernel launched from then on. With `num_sms`, the launchers see that many
    SMs (the interpreter's, or the GPU's) and give them one persistent program each, so that programs take
    several row tiles even in small tests."""
    assert variant in VARIANTS, variant
    hold = variant == "hold-params"
    for kind, tuning in launch.TUNING.items():
        tuning = dataclasses.replace(tuning, fwd_hold_params=hold, bwd_hold_params=hold)
        if num_sms is not None:
            tuning = dataclasses.replace(tuning, fwd_warps_per_sm=1, bwd_programs_per_sm=1)
        monkeypatch.setitem(launch.TUNING, kind, tuning)
    if num_sms is not None:
        monkeypatch.setattr(launch, "DEFAULT_NUM_SMS", num_sms)
        monkeypatch.setattr(launch, "num_sms", lambda: num_sms)
    launched = []
    run = launch._run

    def recording_run(runner, name, inputs, out_shapes, cfg, meta, poison):
        launched.append((name, meta))
        return run(runner, name, inputs, out_shapes, cfg, meta, poison)

    monkeypatch.setattr(launch, "_run", recording_run)
    jax.clear_caches()  # traces made under another variant must not be reused
    return launched


def assert_launched(launched: list[tuple[str, dict]], variant: str = "hold-params") -> None:
    names = [name for name, _ in launched]
    assert len(launched) >= 2, f"forward and backward kernels should have run: {names}"
    assert {name.rsplit("_", 1)[1] for name in names} == {"fwd", "bwd"} and set(names) <= KERNELS, names
    hold = variant == "hold-params"
    assert all(meta["HOLD_PARAMS"] == hold for _, meta in launched), [(n, m["HOLD_PARAMS"]) for n, m in launched]


def op_args(op: str) -> tuple[str, ...]:
    return ARGS.get(op, ("x", "scale", "bias"))


def op_eps(op: str) -> float:
    return EPS.get(op, 1e-6)


# ----------------------------------------------------------------------------------------------------
# float64 oracle: forward and hand-derived backward
# ----------------------------------------------------------------------------------------------------
def _act(op: str, z):
    if op == "layer_norm_gelu":
        cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
        return z * cdf, cdf + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    if op == "layer_norm_gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        t = np.tanh(k * (z + 0.044715 * z**3))
        grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * z * z)
        return 0.5 * z * (1.0 + t), grad
    return z, np.ones_like(z)


def oracle(op: str, args: dict, cotangents: tuple, round_to=None):
    """float64 outputs and gradients {name: grad} of `op` at `args` for output cotangents."""
    a = {k: np.asarray(v, np.float64) for k, v in args.items()}
    cts = [np.asarray(c, np.float64) for c in cotangents]
    eps = op_eps(op)
    x, w = a["x"], a["scale"]
    n = x.shape[-1]
    if op.startswith("layer_norm"):
        xc = x - x.mean(-1, keepdims=True)
        rstd = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
        xhat = xc * rstd
        y, dact = _act(op, xhat * w + a["bias"])
        dz = cts[0] * dact
        lead = tuple(range(x.ndim - 1))
        dxhat = dz * w
        dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True))
        return (y,), {"x": dx, "scale": (dz * xhat).sum(lead), "bias": dz.sum(lead)}
    h = x
    if op == "add_rms_norm":
        h = x + a["residual"]
        if round_to is not None:  # the op rounds the new residual to the input dtype
            h = np.asarray(h.astype(round_to), np.float64)
    rstd = 1.0 / np.sqrt((h * h).mean(-1, keepdims=True) + eps)
    xhat = h * rstd
    dy = cts[0]
    dxhat = dy * w
    dh = rstd * (dxhat - xhat * (dxhat * xhat).sum(-1, keepdims=True) / n)
    dw = (dy * xhat).sum(tuple(range(x.ndim - 1)))
    if op == "add_rms_norm":
        dh = dh + cts[1]
        return (xhat * w, h), {"x": dh, "residual": dh, "scale": dw}
    return (xhat * w,), {"x": dh, "scale": dw}


def call(op: str, impl: str):
    """The public op as f(*args in op_args order) -> tuple of outputs."""
    eps = op_eps(op)
    if op == "layer_norm":
        return lambda x, s, b: (norms.layer_norm(x, s, b, eps=eps, impl=impl),)
    if op == "layer_norm_gelu":
        return lambda x, s, b: (norms.layer_norm_gelu(x, s, b, eps=eps, impl=impl),)
    if op == "layer_norm_gelu_tanh":
        return lambda x, s, b: (norms.layer_norm_gelu(x, s, b, eps=eps, approximate=True, impl=impl),)
    if op == "rms_norm":
        return lambda x, s: (norms.rms_norm(x, s, eps=eps, impl=impl),)
    return lambda x, r, s: norms.add_rms_norm(x, r, s, eps=eps, impl=impl)


def make_inputs(op, shape, dtype, rng, *, mean=0.0, std=1.0, param_dtype=F32):
    """Fresh random inputs (as jax arrays) and output cotangents for `op`."""
    n = shape[-1]
    args = {
        "x": jnp.asarray(rng.normal(mean, std, shape), dtype),
        "residual": jnp.asarray(rng.normal(0.0, 1.0, shape), dtype),
        "scale": jnp.asarray(rng.normal(1.0, 0.5, (n,)), param_dtype),
        "bias": jnp.asarray(rng.normal(0.0, 0.5, (n,)), param_dtype),
    }
    args = {k: args[k] for k in op_args(op)}
    n_out = 2 if op == "add_rms_norm" else 1
    cts = tuple(jnp.asarray(rng.normal(0.0, 1.0, shape), dtype) for _ in range(n_out))
    return args, cts


def rel_err(got, want) -> float:
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got)), "non-finite values (NaN: an unwritten or poisoned element)"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def check_against_oracle(op, impl, args, cts, tol, *, jit=False):
    fn = call(op, impl)
    names = op_args(op)
    values = [args[k] for k in names]

    def fwd_bwd(*vals):
        outs, vjp = jax.vjp(fn, *vals)
        return outs, vjp(cts)

    outs, grads = (jax.jit(fwd_bwd) if jit else fwd_bwd)(*values)
    want_outs, want_grads = oracle(op, args, cts, round_to=args["x"].dtype)
    for i, (got, want) in enumerate(zip(outs, want_outs, strict=True)):
        assert got.dtype == args["x"].dtype and got.shape == args["x"].shape
        assert rel_err(got, want) < tol, f"{op} output {i}: {rel_err(got, want):.2e} >= {tol}"
    for name, got in zip(names, grads, strict=True):
        assert got.dtype == args[name].dtype and got.shape == args[name].shape
        err = rel_err(got, want_grads[name])
        assert err < tol, f"{op} grad {name}: {err:.2e} >= {tol}"


# ----------------------------------------------------------------------------------------------------
# The oracle itself
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_oracle_gradients_match_central_differences(op):
    rng = np.random.default_rng(1)
    args, cts = make_inputs(op, (3, 8), F32, rng)
    args = {k: np.asarray(v, np.float64) for k, v in args.items()}
    cts = tuple(np.asarray(c, np.float64) for c in cts)

    def objective(a):
        outs, _ = oracle(op, a, cts)
        return sum(float((o * c).sum()) for o, c in zip(outs, cts, strict=True))

    _, grads = oracle(op, args, cts)
    step = 1e-6
    for name, value in args.items():
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            plus, minus = dict(args), dict(args)
            plus[name] = value.copy()
            minus[name] = value.copy()
            plus[name][idx] += step
            minus[name][idx] -= step
            numeric[idx] = (objective(plus) - objective(minus)) / (2 * step)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-7, err_msg=f"{op} d{name}")


# ----------------------------------------------------------------------------------------------------
# Reference vs oracle
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(4, 7, 512), (33, 1000), (5, 7168)], ids=str)
def test_reference_matches_float64(op, dtype, shape):
    rng = np.random.default_rng(abs(hash((op, str(dtype), shape))) % 2**32)
    args, cts = make_inputs(op, shape, dtype, rng, mean=0.5)
    check_against_oracle(op, "reference", args, cts, TOL[jnp.dtype(dtype)], jit=True)


@pytest.mark.parametrize("op", ["layer_norm", "layer_norm_gelu"])
def test_reference_large_mean_rows(op):
    rng = np.random.default_rng(7)
    args, cts = make_inputs(op, (16, 1024), F32, rng, mean=1e3, std=1.0)
    check_against_oracle(op, "reference", args, cts, LARGE_MEAN_TOL_F32, jit=True)


def test_large_mean_tolerance_rejects_naive_variance():
    """The large-mean tolerance has teeth: E[x^2] - E[x]^2 in float32 misses it by far."""
    rng = np.random.default_rng(7)
    x = rng.normal(1e3, 1.0, (16, 1024)).astype(np.float32)
    naive_var = np.mean(x * x, -1, dtype=np.float32) - np.mean(x, -1, dtype=np.float32) ** 2
    true_var = np.var(x.astype(np.float64), -1)
    assert rel_err(np.abs(naive_var), true_var) > 100 * LARGE_MEAN_TOL_F32


def test_reference_bf16_large_mean():
    rng = np.random.default_rng(8)
    args, cts = make_inputs("layer_norm_gelu", (8, 2048), BF16, rng, mean=1e3, std=16.0)
    check_against_oracle("layer_norm_gelu", "reference", args, cts, TOL[jnp.dtype(BF16)])


# ----------------------------------------------------------------------------------------------------
# Triton kernels in the interpreter (the fused custom_vjp path, end to end, on CPU)
# ----------------------------------------------------------------------------------------------------
INTERPRET_CASES = [
    # (op, dtype, shape): rows not a multiple of the row tile, odd and masked hidden sizes, leading dims
    ("layer_norm_gelu", F32, (37, 512)),
    ("layer_norm_gelu", BF16, (2, 5, 1000)),
    ("layer_norm_gelu_tanh", F32, (9, 1000)),
    ("layer_norm_gelu_tanh", BF16, (3, 7168)),
    ("layer_norm", F32, (6, 2048)),
    ("layer_norm", BF16, (11, 1001)),
    ("rms_norm", F32, (13, 768)),
    ("rms_norm", BF16, (3, 7168)),
    ("add_rms_norm", F32, (21, 512)),
    ("add_rms_norm", BF16, (4, 3, 1000)),
]


@needs_triton_interpreter
@pytest.mark.parametrize("op,dtype,shape", INTERPRET_CASES, ids=lambda v: str(v))
def test_interpreted_kernels_match_float64(op, dtype, shape, monkeypatch):
    launched = use_variant(monkeypatch)
    rng = np.random.default_rng(abs(hash((op, str(dtype), shape, "interp"))) % 2**32)
    args, cts = make_inputs(op, shape, dtype, rng, mean=0.3)
    check_against_oracle(op, "interpret", args, cts, TOL[jnp.dtype(dtype)])
    assert_launched(launched)


# Scale/bias re-read per tile: the same code but for where the parameters are loaded; a few cases suffice.
RELOAD_CASES = [INTERPRET_CASES[i] for i in (1, 2, 5, 8, 9)]


@needs_triton_interpreter
@pytest.mark.parametrize("op,dtype,shape", RELOAD_CASES, ids=lambda v: str(v))
def test_interpreted_kernels_reloading_params_match_float64(op, dtype, shape, monkeypatch):
    launched = use_variant(monkeypatch, "reload-params", num_sms=1)
    rng = np.random.default_rng(abs(hash((op, str(dtype), shape, "reload"))) % 2**32)
    args, cts = make_inputs(op, shape, dtype, rng, mean=-0.4)
    check_against_oracle(op, "interpret", args, cts, TOL[jnp.dtype(dtype)])
    assert_launched(launched, "reload-params")


@needs_triton_interpreter
@pytest.mark.parametrize("op", ["layer_norm_gelu", "rms_norm"])
def test_interpreted_kernels_under_jit_with_large_mean(op, monkeypatch):
    launched = use_variant(monkeypatch)
    rng = np.random.default_rng(11)
    args, cts = make_inputs(op, (10, 1024), F32, rng, mean=1e3, std=1.0)
    check_against_oracle(op, "interpret", args, cts, LARGE_MEAN_TOL_F32, jit=True)
    assert_launched(launched)


@needs_triton_interpreter
def test_interpreted_bf16_large_mean_uses_one_pass_statistics(monkeypatch):
    launched = use_variant(monkeypatch)
    rng = np.random.default_rng(12)
    args, cts = make_inputs("layer_norm_gelu", (8, 2048), BF16, rng, mean=1e3, std=16.0)
    check_against_oracle("layer_norm_gelu", "interpret", args, cts, TOL[jnp.dtype(BF16)])
    assert_launched(launched)
    assert [meta["ONE_PASS"] for name, meta in launched if name == "layer_norm_fwd"] == [True], launched


def _ln_stats_errors(x, one_pass: bool, runner: str = "interpret") -> tuple[float, float, float]:
    """Relative errors of (mean, rstd, y) of the LayerNorm forward kernel against float64."""
    m, n = x.shape
    w, b = jnp.ones(n, F32), jnp.zeros(n, F32)
    cfg = launch.forward_config(n, rows=m, num_sms=1, programs_per_sm=1, one_pass=one_pass)
    y, mean, rstd = launch.layer_norm_fwd(x, w, b, eps=1e-5, activation=None, runner=runner, config=cfg, poison=True)
    x64 = np.asarray(x, np.float64)
    want_mean = x64.mean(-1)
    want_rstd = 1.0 / np.sqrt(x64.var(-1) + 1e-5)
    want_y = (x64 - want_mean[:, None]) * want_rstd[:, None]
    return rel_err(mean, want_mean), rel_err(rstd, want_rstd), rel_err(y, want_y)


@needs_triton_interpreter
def test_one_pass_statistics_keep_large_mean_rows_exact():
    """Shifted sums (shift = the row's first element) in float32: a large mean costs no accuracy."""
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(1e3, 1.0, (6, 1000)), F32)
    for one_pass in (True, False):
        errors = _ln_stats_errors(x, one_pass)
        assert max(errors) < LARGE_MEAN_TOL_F32, (one_pass, errors)


@needs_triton_interpreter
def test_one_pass_statistics_error_bound_when_the_first_element_is_an_outlier():
    """The worst case for the shift: all of a row's spread in its first element. Since (x[0] - mean)^2 <= N var, the
    float32 rounding of the sums is amplified at most ~N times: fine for 16-bit inputs (rounding 2^-9), too much for
    float32 ones, which keep the two-pass statistics."""
    rng = np.random.default_rng(14)
    n = 1024
    x = rng.normal(0.0, 1.0, (4, n))
    x[:, 0] = 1e4  # var ~ 1e8 / n: the shift sits ~sqrt(n) standard deviations from the mean
    one_pass = _ln_stats_errors(jnp.asarray(x, F32), one_pass=True)
    assert 1e-5 < max(one_pass) < 2.0**-9, one_pass
    assert max(_ln_stats_errors(jnp.asarray(x, F32), one_pass=False)) < 1e-5
    args, cts = make_inputs("layer_norm_gelu", (4, n), BF16, rng)  # bf16 input: one pass by default
    args["x"] = args["x"].at[:, 0].set(1e4)
    with pytest.MonkeyPatch.context() as mp:
        launched = use_variant(mp)
        check_against_oracle("layer_norm_gelu", "interpret", args, cts, TOL[jnp.dtype(BF16)])
    assert_launched(launched)


@needs_triton_interpreter
@pytest.mark.parametrize("op", ["layer_norm_gelu", "rms_norm"])
def test_interpreted_backward_partials_with_more_tiles_than_programs(op):
    """Persistent backward grid: 3 programs over 37 rows in tiles of 8 (program 0 takes tiles 0 and 3)."""
    rng = np.random.default_rng(5)
    args, cts = make_inputs(op, (37, 512), F32, rng)
    cfg = launch.backward_config(37, 512, num_sms=3)
    assert (cfg.block_m, cfg.programs) == (8, 3)
    _, want = oracle(op, args, cts)
    x, w = args["x"], args["scale"]
    if op == "rms_norm":
        _, _, rstd = launch.rms_norm_fwd(x, None, w, eps=op_eps(op), runner="interpret")
        dx, dw = launch.rms_norm_bwd(x, w, cts[0], None, rstd, runner="interpret", config=cfg)
        partials = {"scale": dw}
    else:
        b = args["bias"]
        _, mean, rstd = launch.layer_norm_fwd(x, w, b, eps=op_eps(op), activation="gelu", runner="interpret")
        dx, dw, db = launch.layer_norm_bwd(
            x, w, b, cts[0], mean, rstd, activation="gelu", runner="interpret", config=cfg
        )
        partials = {"scale": dw, "bias": db}
    assert rel_err(dx, want["x"]) < 1e-5
    for name, p in partials.items():
        assert p.shape == (3, 512)
        assert rel_err(p.sum(0), want[name]) < 1e-5


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", [512, 1000, 1024, 2048, 4096, 7168, 8192, 16384])
def test_launch_configs_cover_the_row(hidden):
    fwd = launch.forward_config(hidden)
    assert fwd.block_n >= hidden and fwd.block_n & (fwd.block_n - 1) == 0 and fwd.block_n < 2 * hidden
    assert 4 <= fwd.num_warps <= 32
    bwd = launch.backward_config(65536, hidden, num_sms=132)
    assert bwd.block_n == fwd.block_n and 1 <= bwd.programs <= 132 * 4
    small = launch.backward_config(3, hidden, num_sms=132)
    assert small.programs == -(-3 // small.block_m)  # never more programs than row tiles
    many = launch.forward_config(hidden, rows=65536, num_sms=132)
    assert (many.block_m, many.block_n, many.num_warps) == (fwd.block_m, fwd.block_n, fwd.num_warps)
    assert 132 <= many.programs <= 132 * 8 and many.programs * many.num_warps <= 132 * 32
    assert launch.forward_config(hidden, rows=3, num_sms=132).programs == small.programs


# ----------------------------------------------------------------------------------------------------
# Dispatcher and input checks
# ----------------------------------------------------------------------------------------------------
def _ln_inputs(shape=(4, 512), dtype=F32):
    rng = np.random.default_rng(0)
    n = shape[-1]
    return (
        jnp.asarray(rng.normal(size=shape), dtype),
        jnp.asarray(rng.normal(size=(n,)), F32),
        jnp.asarray(rng.normal(size=(n,)), F32),
    )


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the behaviour without a GPU")
def test_auto_takes_the_reference_without_gpu():
    x, s, b = _ln_inputs()
    assert norms._runner("auto", x) is None
    want = norms.reference.layer_norm(x, s, b, activation="gelu")
    np.testing.assert_array_equal(norms.layer_norm_gelu(x, s, b), want)
    got, want = norms.add_rms_norm(x, x, s), norms.reference.add_rms_norm(x, x, s)
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("fn", [norms.layer_norm_gelu, norms.layer_norm])
def test_fused_without_gpu_is_a_clear_error(fn):
    x, s, b = _ln_inputs()
    with pytest.raises(ValueError, match=r"impl='fused' cannot run: no GPU.*impl='reference'"):
        fn(x, s, b, impl="fused")
    with pytest.raises(ValueError, match="no GPU"):
        norms.rms_norm(x, s, impl="fused")


def test_unsupported_inputs_fall_back_under_auto_and_fail_under_interpret():
    x16, s, b = _ln_inputs(dtype=jnp.float16)
    np.testing.assert_array_equal(norms.layer_norm(x16, s, b), norms.reference.layer_norm(x16, s, b))
    with pytest.raises(ValueError, match="dtype float16"):
        norms.layer_norm(x16, s, b, impl="interpret")
    wide, ws, wb = _ln_inputs(shape=(2, launch.MAX_HIDDEN + 8))
    with pytest.raises(ValueError, match="hidden size"):
        norms.layer_norm(wide, ws, wb, impl="interpret")
    x, s, _ = _ln_inputs()
    with pytest.raises(ValueError, match="same dtype"):
        norms.add_rms_norm(x, x.astype(BF16), s, impl="interpret")


def test_bad_arguments_name_the_problem():
    x, s, b = _ln_inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        norms.layer_norm(x, s, b, impl="fast")
    with pytest.raises(ValueError, match=r"scale must have shape \(512,\)"):
        norms.rms_norm(x, s[:10])
    with pytest.raises(ValueError, match="bias must have shape"):
        norms.layer_norm_gelu(x, s, b[:-1])
    with pytest.raises(ValueError, match="residual shape"):
        norms.add_rms_norm(x, x[:2], s)


def test_fused_unavailable_reason_is_none_for_supported_shapes_ignoring_backend():
    x, _, _ = _ln_inputs(shape=(3, 7168), dtype=BF16)
    assert norms.fused_unavailable_reason(x, check_backend=False) is None
    assert "no rows" in norms.fused_unavailable_reason(jnp.zeros((0, 512)), check_backend=False)


@needs_triton_interpreter
def test_interpreted_kernels_work_when_triton_was_imported_first():
    # Libraries such as transformers import triton (not in interpreter mode) before any kernel runs; the interpreted
    # copy of the kernels must still run then. A fresh process controls the import order.
    run_after_triton_import(
        """
import jax.numpy as jnp, numpy as np
from kernels import norms
x = jnp.linspace(-3.0, 5.0, 48 * 64, dtype=jnp.float32).reshape(48, 64)
w, b = jnp.linspace(0.5, 1.5, 64), jnp.linspace(-0.1, 0.1, 64)
got = norms.layer_norm_gelu(x, w, b, impl="interpret")
want = norms.layer_norm_gelu(x, w, b, impl="reference")
np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
print("ok")
"""
    )
