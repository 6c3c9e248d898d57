"""Top-k compression with error feedback, on random gradients over 8 simulated devices (no model).

Mesh data=4 × fsdp=2 on a two-tier topology (groups of 4 devices, then all 8): flat mode exchanges over all four
data replicas; hierarchical mode reduces pairs densely inside the fast tier and exchanges across the slow one.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

import meshes
from jaxdeep.optim import TopkOptions, compressed_reduction, make_plan
from jaxdeep.optim.exchange import sparse_sum
from jaxdeep.optim.selection import select_exact, select_sampled

TWO_TIER = meshes.topology_from_dict(
    {
        "name": "two_tier",
        "tiers": [
            {"name": "socket", "devices_per_group": 4, "bandwidth_gbps": 100.0, "latency_us": 1.0},
            {"name": "network", "devices_per_group": 8, "bandwidth_gbps": 1.0, "latency_us": 50.0},
        ],
    }
)
R = 4  # data replicas
# w is split over fsdp, r is replicated, b is small enough (under min_size) to go dense.
SHAPES = {"w": (64, 100), "r": (3000,), "b": (10,)}
SPECS = {"w": PartitionSpec("fsdp", None), "r": PartitionSpec(), "b": PartitionSpec()}


def _setup(mode: str, **options):
    mesh = meshes.build_mesh({"data": R, "fsdp": 2}, TWO_TIER)
    plan = make_plan(mode, mesh, TWO_TIER, ("data",))
    abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}
    shardings = {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
    reduction = compressed_reduction(plan, TopkOptions(**{"min_size": 100, **options}), abstract, shardings)
    state = jax.jit(reduction.transform.init, out_shardings=reduction.state_shardings)(abstract)
    return reduction, jax.jit(reduction.transform.update), state


def _grads(reduction, seed: int, masks=None):
    rng = np.random.default_rng(seed)
    grads = {k: rng.standard_normal((R, *s)).astype(np.float32) for k, s in SHAPES.items()}
    if masks is not None:
        grads = {k: g * masks[k] for k, g in grads.items()}
    return {k: jax.device_put(g, reduction.grad_shardings[k]) for k, g in grads.items()}, grads


def _two_level_psum_mean(reduction, grads):
    """The dense reference: psum inside the fast tier, then across the slow one (flat: one psum)."""
    plan = reduction.plan
    lead = plan.replica_spec if len(plan.replica_spec) > 1 else plan.replica_spec[0]

    def body(g):
        def reduce(x):
            x = x[0]
            if plan.fast_axes:
                x = lax.psum(x, plan.fast_axes)
            return lax.psum(x, plan.slow_axes) / plan.n_replicas

        return jax.tree.map(reduce, g)

    in_specs = {k: PartitionSpec(lead, *s) for k, s in SPECS.items()}
    return jax.jit(jax.shard_map(body, mesh=plan.exchange_mesh, in_specs=(in_specs,), out_specs=SPECS))(grads)


@pytest.mark.parametrize("selection", ["per_tensor", "global"])
@pytest.mark.parametrize("mode", ["topk", "topk_hierarchical"])
def test_ratio_one_equals_the_dense_psum_exactly(mode, selection):
    reduction, update, state = _setup(mode, ratio=1.0, selection=selection)
    grads, _ = _grads(reduction, 0)
    mean, new_state = update(grads, state)
    want = _two_level_psum_mean(reduction, grads)
    for name in SHAPES:
        np.testing.assert_array_equal(np.asarray(mean[name]), np.asarray(want[name]), err_msg=name)
        laid_out = NamedSharding(reduction.plan.mesh, SPECS[name])
        assert mean[name].sharding.is_equivalent_to(laid_out, len(SHAPES[name])), "laid out like the parameter"
        assert not np.any(np.asarray(new_state.residual[name])), f"{name}: ratio 1 sends everything"
    assert int(new_state.count) == 1


def test_sparse_exchange_equals_a_dense_reference():
    """Random (index, value) pairs per replica, with repeated indices and padding slots, summed everywhere."""
    mesh = meshes.build_mesh({"data": 8})
    n, k = 1000, 300
    rng = np.random.default_rng(1)
    idx = rng.integers(0, n + 1, (8, k)).astype(np.int32)  # n = padding, must be dropped
    idx[:, :10] = 7  # the same index many times on every replica
    for dtype, rtol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        val = rng.standard_normal((8, k)).astype(np.float32)
        exchange = jax.jit(
            jax.shard_map(
                lambda i, v: sparse_sum(i[0], v[0], n, ("data",))[None],
                mesh=mesh,
                in_specs=(PartitionSpec("data"), PartitionSpec("data")),
                out_specs=PartitionSpec("data"),
            )
        )
        got = np.asarray(exchange(idx, jnp.asarray(val, dtype)), np.float64)
        want = np.zeros(n + 1)
        np.add.at(want, idx.reshape(-1), np.asarray(jnp.asarray(val, dtype), np.float64).reshape(-1))
        for replica in range(8):
            np.testing.assert_allclose(got[replica], want[:n], rtol=rtol, atol=rtol * 10, err_msg=str(dtype))
        assert np.all(got == got[0]), "every replica must hold the same sum"


def _support_masks(groups: int, seed: int = 5):
    """Disjoint supports: entry e of every tensor belongs to exactly one of `groups` groups (random)."""
    rng = np.random.default_rng(seed)
    owner = {k: rng.integers(0, groups, s) for k, s in SHAPES.items()}
    return owner


@pytest.mark.parametrize("mode", ["topk", "topk_hierarchical"])
def test_error_feedback_conserves_mass_per_replica(mode):
    """sent + residual = accumulated gradient. Each replica (hierarchical: each fast-tier pair, which compresses
    its summed gradient together) owns a disjoint support, so the mean output on that support is exactly what it
    sent, divided by the replica count."""
    reduction, update, state = _setup(mode, ratio=0.05)
    plan = reduction.plan
    group_size = plan.fast_size  # replicas that compress one summed gradient together
    n_groups = R // group_size
    owner = _support_masks(n_groups)
    masks = {k: np.stack([owner[k] == r // group_size for r in range(R)]).astype(np.float32) for k in SHAPES}
    total_in = {k: np.zeros((R, *s)) for k, s in SHAPES.items()}
    total_out = {k: np.zeros(s) for k, s in SHAPES.items()}
    for step in range(4):
        grads, raw = _grads(reduction, 10 + step, masks)
        mean, state = update(grads, state)
        for k in SHAPES:
            total_in[k] += raw[k]
            total_out[k] += np.asarray(mean[k], np.float64)
    for k in ("w", "r"):  # compressed tensors
        residual = np.asarray(state.residual[k], np.float64)
        assert np.abs(residual).sum() > 0.1 * np.abs(total_in[k]).sum(), f"{k}: nothing was held back at 5%"
        for g in range(n_groups):
            members = slice(g * group_size, (g + 1) * group_size)
            on = owner[k] == g
            accumulated = total_in[k][members].sum(0)
            sent = R * total_out[k] * on
            kept = residual[members].sum(0)
            np.testing.assert_allclose(sent + kept, accumulated * on, rtol=1e-5, atol=1e-5, err_msg=f"{k} group {g}")
            assert not np.any(kept[~on]), f"{k}: residual outside the group's own support"
    # The small tensor went dense: its mean is exact and nothing is kept.
    np.testing.assert_allclose(total_out["b"], total_in["b"].sum(0) / R, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(state.residual["b"]))


def test_without_error_feedback_mass_is_lost():
    """The check above can fail: with error feedback off, what a step does not send is gone."""
    reduction, update, state = _setup("topk", ratio=0.05, error_feedback=False)
    assert state.residual == ()
    grads, raw = _grads(reduction, 3)
    mean, _ = update(grads, state)
    sent = R * np.asarray(mean["r"], np.float64)
    assert np.abs(sent - raw["r"].sum(0)).sum() > 0.5 * np.abs(raw["r"].sum(0)).sum()


def _dgc_reference(raw_steps, ratio, momentum, clip, fsdp=2):
    """NumPy DGC, flat, per replica: local clip, momentum correction, error feedback, per-shard exact top-k."""
    velocity = {k: np.zeros((R, *s)) for k, s in SHAPES.items()}
    residual = {k: np.zeros((R, *s)) for k, s in SHAPES.items()}
    outputs = []
    for raw in raw_steps:
        out = {}
        norms = np.sqrt(sum((raw[k].reshape(R, -1).astype(np.float64) ** 2).sum(1) for k in SHAPES))
        scale = np.minimum(1.0, clip * math.sqrt(R) / norms)
        for k in SHAPES:
            g = raw[k] * scale.reshape((R,) + (1,) * len(SHAPES[k]))
            if k == "b":  # dense
                out[k] = g.sum(0) / R
                continue
            velocity[k] = momentum * velocity[k] + g
            acc = residual[k] + velocity[k]
            shards = np.split(acc, fsdp, axis=1) if k == "w" else [acc]
            sent_mask = []
            for shard in shards:
                flat = shard.reshape(R, -1)
                kk = math.ceil(ratio * flat.shape[1])
                top = np.argsort(-np.abs(flat), axis=1)[:, :kk]
                mask = np.zeros_like(flat, bool)
                np.put_along_axis(mask, top, True, axis=1)
                sent_mask.append(mask.reshape(shard.shape))
            mask = np.concatenate(sent_mask, axis=1) if k == "w" else sent_mask[0]
            out[k] = np.where(mask, acc, 0).sum(0) / R
            residual[k] = np.where(mask, 0, acc)
            velocity[k] = np.where(mask, 0, velocity[k])
        outputs.append(out)
    return outputs, residual, velocity


def test_momentum_correction_and_local_clipping_match_a_numpy_reference():
    ratio, momentum, clip = 0.1, 0.9, 0.5
    reduction, update, state = _setup("topk", ratio=ratio, momentum=momentum, local_clip_norm=clip)
    raw_steps, outputs = [], []
    for step in range(3):
        grads, raw = _grads(reduction, 20 + step)
        raw["r"][1] *= 50.0  # one replica's gradient is far larger: clipping must bite there
        grads["r"] = jax.device_put(raw["r"], reduction.grad_shardings["r"])
        raw_steps.append(raw)
        mean, state = update(grads, state)
        outputs.append(jax.device_get(mean))
    want, residual, velocity = _dgc_reference(raw_steps, ratio, momentum, clip)
    for got_step, want_step in zip(outputs, want, strict=True):
        for k in SHAPES:
            np.testing.assert_allclose(got_step[k], want_step[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for k in ("w", "r"):
        np.testing.assert_allclose(np.asarray(state.residual[k]), residual[k], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.velocity[k]), velocity[k], rtol=1e-4, atol=1e-6)


def test_sparsity_warmup_sends_fewer_entries_stage_by_stage():
    opts = dict(ratio=0.02, warmup_steps=4, warmup_stages=2, warmup_start_ratio=0.2)
    reduction, update, state = _setup("topk", **opts)
    ratios = TopkOptions(**opts).ratios
    assert ratios == pytest.approx((0.2, 0.2 * (0.1**0.5), 0.02))
    owner = _support_masks(R)
    masks = {k: np.stack([owner[k] == r for r in range(R)]).astype(np.float32) for k in SHAPES}
    expected_stage = [0, 0, 1, 1, 2, 2]
    for step, stage in enumerate(expected_stage):
        grads, _ = _grads(reduction, 30 + step, masks)
        metrics = reduction.metrics(state.count)
        mean, state = update(grads, state)
        assert float(metrics["comm_density"]) == pytest.approx(ratios[stage], rel=1e-6)
        # Disjoint supports: the mean's nonzeros are exactly the pairs all replicas sent.
        sent = int(np.count_nonzero(np.asarray(mean["r"])))
        assert sent == R * math.ceil(ratios[stage] * SHAPES["r"][0]), (step, sent)


def test_byte_accounting_by_hand():
    flat, _, _ = _setup("topk", ratio=0.05)
    # Per device: w is 32x100 = 3200 entries, r 3000; k = 160 and 150 pairs of 8 bytes, all-gathered over 4
    # replicas (3 sends each); b (10 entries) all-reduced: 2 * 3/4 * 10 * 4 bytes.
    m = flat.stage_metrics[0]
    assert m["comm_bytes_network"] == pytest.approx(3 * (160 + 150) * 8 + 2 * 0.75 * 40)
    assert m["comm_dense_bytes_network"] == pytest.approx(2 * 0.75 * (3200 + 3000 + 10) * 4)
    hier, _, _ = _setup("topk_hierarchical", ratio=0.05)
    m = hier.stage_metrics[0]
    # Fast pairs: reduce-scatter + all-gather of each padded tensor (2 * 1/2 * n * 4) and the dense b psum.
    assert m["comm_bytes_socket"] == pytest.approx((3200 + 3000) * 4 + 2 * 0.5 * 40)
    # Slow pairs: half-length chunks, k = 80 and 75 pairs, one send each; b across the slow tier too.
    assert m["comm_bytes_network"] == pytest.approx((80 + 75) * 8 + 2 * 0.5 * 40)
    assert m["comm_compression_ratio"] == pytest.approx(m["comm_dense_bytes_network"] / m["comm_bytes_network"])


def test_selection_exact_and_sampled():
    x = jax.random.normal(jax.random.key(0), (200_000,))
    k = 2000
    idx, val = select_exact(x, k)
    magnitude = np.abs(np.asarray(x))
    assert set(np.asarray(idx).tolist()) == set(np.argsort(-magnitude)[:k].tolist())
    np.testing.assert_array_equal(np.asarray(val), np.asarray(x)[np.asarray(idx)])
    idx, val = select_sampled(x, k, jax.random.key(1), sample_size=1024)
    idx, val = np.asarray(idx), np.asarray(val)
    valid = idx < x.shape[0]
    assert np.all(val[~valid] == 0), "padding slots carry nothing"
    assert len(set(idx[valid].tolist())) == valid.sum(), "no entry is sent twice"
    np.testing.assert_array_equal(val[valid], np.asarray(x)[idx[valid]])
    assert valid.sum() >= 0.8 * k
    exact_mass = np.sort(magnitude)[-k:].sum()
    assert np.abs(val).sum() >= 0.9 * exact_mass
