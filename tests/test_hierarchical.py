"""Hierarchical data-parallel reduction: the tier-by-tier mean equals the plain mean, runs as reduce-scatter /
all-reduce / all-gather over the tiers the topology gives, and a train step using it equals one device's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import meshes
from jaxdeep.parallel.hierarchical import hierarchical_mean, make_hierarchical_loss_and_grads, plan_for, reduction_plan
from jaxdeep.sharding import use_rules
from jaxdeep.train.state import build_setup, init_train_state
from jaxdeep.train.step import cross_entropy, make_train_step
from tests.fast_compile import compiled
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
    two_hosts = _two_hosts(tmp_path)
    cfg, mesh = layout(two_hosts, "parallel.grad_reduce=auto", data=4, tensor=2)
    assert plan_for(cfg, mesh).levels == (("host", 2), ("network", 2))
    cfg, mesh = layout("parallel.grad_reduce=auto", data=4, tensor=2)  # auto topology: one process, one tier
    assert plan_for(cfg, mesh) is None
    cfg, mesh = layout(two_hosts, data=4, tensor=2)  # flat by default
    assert plan_for(cfg, mesh) is None


def _two_hosts(tmp_path) -> str:
    topo = tmp_path / "two_hosts.yaml"
    topo.write_text(
        "name: two_hosts\ntiers:\n"
        "  - {name: host, devices_per_group: 4, bandwidth_gbps: 100, latency_us: 1}\n"
        "  - {name: network, devices_per_group: 8, bandwidth_gbps: 10, latency_us: 10}\n"
    )
    return f"mesh.topology={topo}"


def test_gradients_reduced_tier_by_tier_match_one_device(tmp_path):
    overrides = ("model.tie_embeddings=false", "parallel.grad_reduce=hierarchical")
    tokens = np.random.default_rng(5).integers(1, 256, (8, 17)).astype(np.int32)
    cfg, mesh = layout(*overrides)
    one = build_setup(cfg, mesh)
    params = jax.device_get(init_train_state(one)["params"])
    plain = jax.value_and_grad(lambda p, t: cross_entropy(one, p, t))
    want = compiled(plain, params, tokens)(params, tokens)
    cfg, mesh = layout(_two_hosts(tmp_path), *overrides, data=4, fsdp=2)
    setup = build_setup(cfg, mesh)
    plan = plan_for(cfg, mesh)
    assert plan.levels == (("host", 2), ("network", 2))
    tiered = make_hierarchical_loss_and_grads(lambda p, t: cross_entropy(setup, p, t), plan, cfg.sharding.rules)

    def run(params, tokens):
        with use_rules(cfg.sharding.rules, mesh):
            return tiered(params, tokens)

    params = jax.device_put(params, setup.state_shardings["params"])
    got = compiled(run, params, tokens)(params, tokens)
    err = max_rel_error(got, want)
    assert err <= 1e-5, f"loss or gradients differ from one device by {err:.2e}"


def test_train_step_reduces_tier_by_tier_when_asked(tmp_path):
    state = None
    lowered = {}
    for mode in ("hierarchical", "flat"):
        cfg, mesh = layout(_two_hosts(tmp_path), f"parallel.grad_reduce={mode}", data=4, fsdp=2)
        setup = build_setup(cfg, mesh)
        state = state or jax.eval_shape(lambda setup=setup: init_train_state(setup))
        tokens = jax.ShapeDtypeStruct((8, 17), np.int32)
        lowered[mode] = make_train_step(setup).lower(state, tokens).as_text()
    # The explicit reduce-scatter (the partitioner's own appear only after lowering).
    assert "reduce_scatter" in lowered["hierarchical"] and "reduce_scatter" not in lowered["flat"]
