"""Routed-expert dispatch: the gathered path for few token copies equals the sorted grouped-matmul path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdeep.model.deepseek import dispatch
from jaxdeep.model.deepseek.blocks import DecoderBlock
from jaxdeep.model.deepseek.dispatch import gathered_experts, gathers_experts, local_experts
from jaxdeep.model.deepseek.rope import rope_tables
from jaxdeep.model.kernel_choice import KernelChoice
from tests.helpers import needs_triton_interpreter, tiny_config
from tests.test_deepseek_train import DEEPSEEK


def _problem(tokens: int, k: int, experts: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    d, f = 6, 5
    x = rng.normal(size=(tokens, d)).astype(np.float32)
    chosen = np.stack([rng.choice(experts, size=k, replace=False) for _ in range(tokens)]).astype(np.int32)
    chosen[-1] = chosen[0]  # two tokens on the same experts: gathered rows must not interfere
    weights = rng.uniform(size=(tokens, k)).astype(np.float32)
    gate_up = rng.normal(size=(experts, d, 2, f)).astype(np.float32)
    down = rng.normal(size=(experts, f, d)).astype(np.float32)
    return tuple(map(jnp.asarray, (x, chosen, weights, gate_up, down)))


def test_gathered_experts_equal_the_grouped_matmuls_forward_and_gradients():
    x, chosen, weights, gate_up, down = _problem(tokens=3, k=2, experts=8)

    def loss(fn, x, w, gu, dn):
        y, _ = fn(x, chosen, w, gu, dn)
        return jnp.sum(jnp.sin(y))

    grouped = lambda *a: local_experts(*a, kernels=KernelChoice(gmm="reference"))
    y_want, n_want = grouped(x, chosen, weights, gate_up, down)
    y_got, n_got = gathered_experts(x, chosen, weights, gate_up, down)
    np.testing.assert_allclose(y_got, y_want, rtol=1e-5, atol=1e-5)
    assert int(n_got) == int(n_want) == 6
    g_want = jax.grad(lambda *a: loss(grouped, *a), argnums=(0, 1, 2, 3))(x, weights, gate_up, down)
    g_got = jax.grad(lambda *a: loss(gathered_experts, *a), argnums=(0, 1, 2, 3))(x, weights, gate_up, down)
    for got, want in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_one_token_in_the_serving_layout_equals_the_grouped_matmuls(monkeypatch):
    """One token's experts in the serving layout (the weights re-laid with their input axis minor, as the serving
    runner stores them) gather each chosen expert's rows: the output must match the grouped reference, for every
    token of a problem whose experts differ from token to token (a wrong row offset picks another expert)."""
    from jax.experimental.layout import Format, Layout

    from jaxdeep.model.matmul import serving_layout
    from jaxdeep.serve.layout import inputs_minor

    x, chosen, weights, gate_up, down = _problem(tokens=4, k=3, experts=8, seed=1)
    relaid = lambda a, order: jax.device_put(a, Format(Layout(major_to_minor=order), a.sharding))  # noqa: E731
    gate_up_r, down_r = relaid(gate_up, inputs_minor(4, 3, 1)), relaid(down, inputs_minor(3, 2, 1))
    grouped = lambda *a: local_experts(*a, kernels=KernelChoice(gmm="reference"))[0]  # noqa: E731

    def one_token(x, chosen, weights, gu, dn):
        with serving_layout(["experts"]):
            return gathered_experts(x, chosen, weights, gu, dn)

    products = []  # the gathered rows' products run, once for gate/up and once for down
    chosen_products = dispatch._chosen_expert_products
    monkeypatch.setattr(dispatch, "_chosen_expert_products", lambda *a: products.append(1) or chosen_products(*a))
    step = jax.jit(one_token, in_shardings=(None, None, None, gate_up_r.format, down_r.format))
    for i in range(4):
        rows = slice(i, i + 1)
        want = grouped(x[rows], chosen[rows], weights[rows], gate_up, down)
        got, n = step(x[rows], chosen[rows], weights[rows], gate_up_r, down_r)
        assert int(n) == 3
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert len(products) == 2  # traced once: gate/up and down


def test_few_copies_gather_only_one_token_or_without_a_grouped_kernel(monkeypatch):
    """One token's copies, or a few tokens' where no grouped kernel runs, are gathered; a few tokens' copies go to
    the grouped kernel where it runs (it reads only the experts chosen), and both paths give the same output."""
    x, chosen, weights, gate_up, down = _problem(tokens=3, k=2, experts=8)
    auto, bf16 = KernelChoice(gmm="auto"), jnp.bfloat16
    monkeypatch.setattr(dispatch, "auto_impl", lambda dtype: "reference")
    assert gathers_experts(chosen, 8, bf16, auto) and gathers_experts(chosen[:1], 8, bf16, auto)
    assert not gathers_experts(chosen, 4, bf16, auto)  # as many copies as experts: grouped
    assert not gathers_experts(chosen, 8, bf16, KernelChoice(gmm="reference"))  # a grouped impl asked for by name
    assert not gathers_experts(chosen, 8, bf16, KernelChoice(gmm="auto", matmul="fp8"))
    y_gathered, _ = local_experts(x, chosen, weights, gate_up, down, kernels=auto)

    monkeypatch.setattr(dispatch, "auto_impl", lambda dtype: "triton")  # as on a GPU with jax-triton
    assert gathers_experts(chosen[:1], 8, bf16, auto)
    assert not gathers_experts(chosen, 8, bf16, auto)
    calls = []
    monkeypatch.setattr(dispatch, "gathered_experts", lambda *a: calls.append(a))
    y_grouped, n = local_experts(x, chosen, weights, gate_up, down, kernels=auto)  # `gmm` picks what runs here
    assert calls == [] and int(n) == 6
    np.testing.assert_allclose(y_grouped, y_gathered, rtol=1e-5, atol=1e-5)


def test_grouped_experts_keep_no_outputs_for_the_combine(capsys):
    # The routing weights scale the SwiGLU before the down projection, so the combine is a sum that needs nothing
    # from the forward: no [copies, d] array of the experts' outputs is kept, in either precision.
    from jax.ad_checkpoint import print_saved_residuals

    x, chosen, weights, gate_up, down = _problem(tokens=64, k=2, experts=4)
    d = x.shape[-1]
    x, gate_up, down = (a.astype(jnp.bfloat16) for a in (x, gate_up, down))
    for matmul in ("bf16", "fp8"):
        choice = KernelChoice(matmul=matmul, gmm="reference", fp8="reference")
        print_saved_residuals(
            lambda x, w, gu, dn, c=choice: local_experts(x, chosen, w, gu, dn, kernels=c)[0], x, weights, gate_up, down
        )
        saved = [line for line in capsys.readouterr().out.strip().splitlines() if "from the argument" not in line]
        # Of the [copies, d] arrays only the first grouped matmul's input remains: the dispatched rows (in FP8 under
        # fp8). Weighting after the down projection kept the experts' outputs as well.
        rows = [line for line in saved if line.split(" ")[0].endswith(f"[128,{d}]")]
        assert len(rows) == 1, (matmul, saved)
        assert any(line.startswith("f32[128]") for line in saved), (matmul, saved)  # the sorted weights


def test_moe_block_runs_inside_plain_jax_transforms():
    # The router's input, norm(x), is recomputed from x in the backward. The modules are only read inside that
    # recompute, so a block closed over by plain jax.jit / jax.grad runs (nnx.remat there wrote their state back,
    # which fails from inside another trace).
    cfg = tiny_config(*DEEPSEEK, "model.dtype=bfloat16").model
    block = DecoderBlock(cfg, nnx.Rngs(0), moe=True)
    b, t, d = 2, 12, cfg.d_model
    cos, sin = rope_tables(t, cfg.deepseek.qk_rope_head_dim, cfg.rope_theta, cfg.deepseek.rope_scaling)
    x = jax.random.normal(jax.random.key(0), (b, t, d), jnp.bfloat16)
    eager = np.asarray(block(x, cos, sin)[0], np.float32)
    jitted = np.asarray(jax.jit(lambda x: block(x, cos, sin)[0])(x), np.float32)
    np.testing.assert_allclose(jitted, eager, rtol=2**-7, atol=1e-4)  # bf16: fusion may move a rounding
    dx = jax.grad(lambda x: block(x, cos, sin)[0].astype(jnp.float32).sum())(x)
    dx_nnx = nnx.grad(lambda m, x: m(x, cos, sin)[0].astype(jnp.float32).sum(), argnums=1)(block, x)
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_nnx, np.float32))


def test_auto_gathers_only_below_the_expert_count(monkeypatch):
    monkeypatch.setattr(dispatch, "auto_impl", lambda dtype: "reference")  # where no grouped kernel runs
    few = _problem(tokens=3, k=2, experts=8)  # 6 copies < 8 experts: gathered
    many = _problem(tokens=5, k=2, experts=8)  # 10 copies: grouped matmuls
    for args in (few, many):
        y_auto, _ = local_experts(*args, kernels=KernelChoice(gmm="auto"))
        y_ref, _ = local_experts(*args, kernels=KernelChoice(gmm="reference"))
        np.testing.assert_allclose(y_auto, y_ref, rtol=1e-5, atol=1e-5)
    hlo_few = jax.jit(lambda *a: local_experts(*a, kernels=KernelChoice(gmm="auto"))).lower(*few).as_text()
    hlo_many = jax.jit(lambda *a: local_experts(*a, kernels=KernelChoice(gmm="auto"))).lower(*many).as_text()
    assert "stablehlo.sort" not in hlo_few and "stablehlo.sort" in hlo_many  # only the grouped path sorts copies


@needs_triton_interpreter
def test_experts_through_the_triton_kernels_match_the_reference():
    # kernels.gmm=interpret: the Triton grouped GEMM (in the interpreter) behind the dispatcher, gradients included.
    # The kernel and `ragged_dot` sum in different orders, and the loss's sin turns outputs near 17 into gradients
    # whose float32 noise reaches ~1e-4 (how much depends on the CPU's BLAS): so each is held to the reference run
    # in float64 (whose sum of a token's copies stays float32: a few ulps), within 128 float32 ulps of the array's
    # largest entry.
    x, chosen, weights, gate_up, down = _problem(tokens=7, k=2, experts=4, seed=3)

    def outputs(impl, x, gu, dn):
        choice = KernelChoice(gmm=impl)
        w = weights.astype(x.dtype)
        loss = lambda x, gu, dn: jnp.sum(jnp.sin(local_experts(x, chosen, w, gu, dn, kernels=choice)[0]))
        return (local_experts(x, chosen, w, gu, dn, kernels=choice)[0], *jax.grad(loss, argnums=(0, 1, 2))(x, gu, dn))

    with jax.enable_x64(True):
        wide = (a.astype(jnp.float64) for a in (x, gate_up, down))
        truth = [np.asarray(a, np.float64) for a in outputs("reference", *wide)]
    for impl in ("interpret", "reference"):
        for got, want in zip(outputs(impl, x, gate_up, down), truth, strict=True):
            bound = 128 * np.finfo(np.float32).eps * np.abs(want).max()
            np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=bound, err_msg=impl)
