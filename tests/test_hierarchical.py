"""Hierarchical data-parallel reduction: the tier-by-tier mean equals the plain mean, runs as reduce-scatter /
all-reduce / all-gather over the tiers the topology gives, and a train step using it equals one device's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import meshes
from jaxdeep.parallel.hierarchical import hierarchical_mean, plan_for, reduction_plan
from jaxdeep.train.state import build_setup, init_train_state
from jaxdeep.train.step import make_train_step
from tests.fast_compile import FAST, compiled
from tests.helpers import layout, max_rel_error


def _topology(*groups: int) -> meshes.Topology:
    """Tiers of the given group sizes over 8 devices, fastest first (names t0, t1, ...)."""
    tiers = [meshes.Tier(f"t{i}", g, 100.0 / (i + 1), 1.0 + i) for i, g in enumerate(groups)]
    return meshes.Topology("test", tuple(tiers))


@pytest.mark.parametrize(
    "groups, sizes, levels",
    [
        ((2, 4, 8), dict(data=8), (("t0", 2), ("t1", 2), ("t2", 2))),  # three tiers
        ((4, 8), dict(data=4, tensor=2), (("t0", 2), ("t1", 2))),  # tensor inside the host, data across
        ((8,), dict(data=4, tensor=2), (("t0", 4),)),  # one tier: nothing to stage
    ],
)
def test_tier_by_tier_mean_equals_the_mean(groups, sizes, levels):
    mesh = meshes.build_mesh(sizes, devices=jax.devices()[:8])
    plan = reduction_plan(mesh, _topology(*groups))
    assert plan.levels == levels
    n = sizes["data"]
    grads = {"w": jax.random.normal(jax.random.key(0), (n, 8, 6)), "b": jax.random.normal(jax.random.key(1), (n, 3))}
    spec = lambda a: NamedSharding(mesh, PartitionSpec("data", *[None] * (a.ndim - 1)))
    grads = jax.tree.map(lambda a: jax.device_put(a, spec(a)), grads)
    run = compiled(lambda g: hierarchical_mean(g, plan), grads)
    got = run(grads)
    want = jax.tree.map(lambda a: jnp.mean(a, axis=0), grads)
    assert max_rel_error(got, want) <= 1e-6
    hlo = run.as_text()
    if len(levels) > 1:
        # One reduce-scatter and one all-gather per faster tier; the slowest tier all-reduces the shard.
        assert hlo.count("reduce-scatter(") >= len(levels) - 1 and hlo.count("all-gather(") >= len(levels) - 1
        assert "all-reduce(" in hlo


def test_plan_follows_the_config(tmp_path):
    topo = tmp_path / "two_hosts.yaml"
    topo.write_text(
        "name: two_hosts\ntiers:\n"
        "  - {name: host, devices_per_group: 4, bandwidth_gbps: 100, latency_us: 1}\n"
        "  - {name: network, devices_per_group: 8, bandwidth_gbps: 10, latency_us: 10}\n"
    )
    cfg, mesh = layout(f"mesh.topology={topo}", "parallel.grad_reduce=auto", data=4, tensor=2)
    assert plan_for(cfg, mesh).levels == (("host", 2), ("network", 2))
    cfg, mesh = layout("parallel.grad_reduce=auto", data=4, tensor=2)  # auto topology: one process, one tier
    assert plan_for(cfg, mesh) is None
    cfg, mesh = layout(f"mesh.topology={topo}", data=4, tensor=2)  # flat by default
    assert plan_for(cfg, mesh) is None


def test_train_step_with_hierarchical_reduction_matches_one_device(tmp_path):
    topo = tmp_path / "two_hosts.yaml"
    topo.write_text(
        "name: two_hosts\ntiers:\n"
        "  - {name: host, devices_per_group: 4, bandwidth_gbps: 100, latency_us: 1}\n"
        "  - {name: network, devices_per_group: 8, bandwidth_gbps: 10, latency_us: 10}\n"
    )
    overrides = ("model.tie_embeddings=false", "parallel.grad_reduce=hierarchical")
    tokens = np.random.default_rng(5).integers(1, 256, (8, 17)).astype(np.int32)
    cfg, mesh = layout(*overrides)
    one = build_setup(cfg, mesh)
    state = jax.device_get(init_train_state(one))
    want = jax.device_get(compiled(make_train_step(one), state, tokens)(state, tokens))
    cfg, mesh = layout(f"mesh.topology={topo}", *overrides, data=4, fsdp=2)
    setup = build_setup(cfg, mesh)
    assert plan_for(cfg, mesh).levels == (("host", 2), ("network", 2))
    sharded = jax.device_put(state, setup.state_shardings)
    lowered = make_train_step(setup).lower(sharded, tokens)
    assert "reduce_scatter" in lowered.as_text()  # the explicit one: the partitioner's come after lowering
    flat_cfg, _ = layout(f"mesh.topology={topo}", "model.tie_embeddings=false", data=4, fsdp=2)
    assert "reduce_scatter" not in make_train_step(build_setup(flat_cfg, mesh)).lower(sharded, tokens).as_text()
    step = lowered.compile(FAST)
    got = jax.device_get(step(sharded, tokens))
    # The reduction's output, as the optimizer saw it: Adam's first moment is (1 - b1) × the mean gradient.
    # (Parameters after Adam's first step are not compared: it divides by |g|, so gradients near zero make
    # their updates differ beyond rounding with any reduction order, the partitioner's own too.)
    mu = lambda state: state["opt_state"][1][0].mu
    pairs = [("loss", got[1]["loss"], want[1]["loss"]), ("gradient norm", got[1]["grad_norm"], want[1]["grad_norm"])]
    for label, a, b in [*pairs, ("gradients", mu(got[0]), mu(want[0]))]:
        err = max_rel_error(a, b)
        assert err <= 1e-5, f"{label} differ from one device by {err:.2e}"
    assert max_rel_error(got[0]["params"], state["params"]) > 1e-4
