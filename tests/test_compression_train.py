"""Compression wired into the train step: equivalence with the dense step, fsdp + data together, per-replica
gradients, checkpoints of the error-feedback state, hierarchical mode from a topology file, config errors."""

import re

import jax
import numpy as np
import pytest

from jaxdeep.config import ConfigError
from jaxdeep.train.checkpoint import Checkpointer
from jaxdeep.train.state import build_setup, init_train_state
from jaxdeep.train.step import batch_sharding, make_train_step, per_replica_loss_and_grads
from tests.helpers import layout, max_rel_error

OVERRIDES = ("model.tie_embeddings=false", "data.global_batch_size=16", "optim.topk.min_size=100")
DATA_FSDP_TENSOR = dict(data=2, fsdp=2, tensor=2)
SPARSE = ("optim.compression=topk", "optim.topk.ratio=0.05", "optim.topk.momentum=0.9")
TWO_TIER_YAML = """
name: two_tier
tiers:
  - {name: socket, devices_per_group: 4, bandwidth_gbps: 100.0, latency_us: 1.0}
  - {name: network, devices_per_group: 8, bandwidth_gbps: 1.0, latency_us: 50.0}
"""


def _tokens(step: int = 0):
    return np.random.default_rng(100 + step).integers(1, 256, (16, 17)).astype(np.int32)


def _train(*overrides, steps: int = 2, **sizes):
    """(setup, initial params on the host, final state, last metrics, the jitted step)."""
    cfg, mesh = layout(*OVERRIDES, *overrides, **sizes)
    setup = build_setup(cfg, mesh)
    state = init_train_state(setup)
    initial = jax.device_get(state["params"])
    step = make_train_step(setup)
    metrics = None
    for i in range(steps):
        state, metrics = step(state, _tokens(i))
    return setup, initial, state, jax.device_get(metrics), step


@pytest.fixture(scope="module")
def two_tier(tmp_path_factory):
    """Groups of 4 devices on a fast tier, all 8 on a slow one: data=4 outside fsdp=2 straddles both."""
    path = tmp_path_factory.mktemp("topology") / "two_tier.yaml"
    path.write_text(TWO_TIER_YAML)
    return (f"mesh.topology={path}", "optim.grad_accum_steps=2")


@pytest.fixture(scope="module")
def dense_run(two_tier):
    return _train(*two_tier, data=4, fsdp=2)


@pytest.mark.parametrize("mode", ["topk", "topk_hierarchical"])
def test_ratio_one_with_accumulation_trains_like_the_dense_step(mode, two_tier, dense_run):
    _, _, dense, dense_metrics, _ = dense_run
    setup, _, state, metrics, _ = _train(*two_tier, f"optim.compression={mode}", "optim.topk.ratio=1.0", data=4, fsdp=2)
    plan = setup.compression.plan
    assert plan.replica_axes == ("data",)  # fsdp splits parameters: its reduction stays dense
    if mode == "topk_hierarchical":
        assert (plan.slow_axes, plan.fast_axes) == (("data_network",), ("data_socket",))
        assert metrics["comm_bytes_socket"] > 0
    assert metrics["comm_density"] == 1.0 and metrics["comm_bytes_network"] > 0
    assert max_rel_error(state["params"], dense["params"]) <= 1e-5
    assert max_rel_error(state["opt_state"][1], dense["opt_state"]) <= 1e-5
    assert metrics["loss"] == pytest.approx(dense_metrics["loss"], rel=1e-6)
    assert metrics["grad_norm"] == pytest.approx(dense_metrics["grad_norm"], rel=1e-5)


@pytest.fixture(scope="module")
def sparse_run():
    """Two steps at 5% with momentum correction on data × fsdp × tensor."""
    return _train(*SPARSE, **DATA_FSDP_TENSOR)


def test_sparse_step_on_data_fsdp_tensor_keeps_replicas_identical(sparse_run):
    setup, initial, state, metrics, _ = sparse_run
    comp_state = state["opt_state"][0]
    residual = np.asarray(comp_state.residual["blocks"]["attn"]["wq"])  # [replicas, layers, embed, heads, head_dim]
    assert residual.shape[0] == 2 and np.abs(residual).sum() > 0, "error feedback holds the unsent entries"
    sharding = setup.state_shardings["opt_state"][0].residual["blocks"]["attn"]["wq"]
    assert tuple(sharding.spec)[:4] == ("data", None, "fsdp", "tensor")
    assert int(comp_state.count) == 2
    assert metrics["comm_compression_ratio"] > 1 and metrics["comm_density"] == pytest.approx(0.05)
    assert max_rel_error(state["params"], initial) > 1e-4, "the parameters moved"
    # The parameters are replicated over data: every data replica's shard must be bitwise the same.
    by_index = {}
    for shard in state["params"]["blocks"]["attn"]["wq"].addressable_shards:
        by_index.setdefault(str(shard.index), []).append(np.asarray(shard.data))
    assert by_index and all(len(copies) == 2 for copies in by_index.values())
    for copies in by_index.values():
        np.testing.assert_array_equal(copies[0], copies[1])


def _replica_groups(hlo: str) -> list[list[int]]:
    """Device groups of every collective in compiled HLO text (explicit and iota forms)."""
    groups = []
    for text in re.findall(r"replica_groups=(\{\{[0-9,{} ]*\}\}|\[[0-9,]+\]<=\[[0-9,]+\](?:T\([0-9,]+\))?)", hlo):
        if text.startswith("{"):
            groups += [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([0-9,]*)\}", text[1:-1])]
            continue
        shape, source, perm = re.match(r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", text).groups()
        ids = np.arange(np.prod([int(x) for x in source.split(",")])).reshape([int(x) for x in source.split(",")])
        if perm:
            ids = ids.transpose([int(x) for x in perm.split(",")])
        groups += ids.reshape([int(x) for x in shape.split(",")]).tolist()
    return groups


def test_per_replica_gradients_are_not_reduced_across_replicas(sparse_run):
    setup = sparse_run[0]
    mesh = setup.mesh
    params_sharding = setup.state_shardings["params"]
    grads_fn = jax.jit(
        lambda p, t: per_replica_loss_and_grads(setup, p, t), in_shardings=(params_sharding, batch_sharding(setup))
    )
    abstract = setup.abstract_train_state["params"]
    hlo = grads_fn.lower(abstract, jax.ShapeDtypeStruct((16, 17), np.int32)).compile().as_text()
    position = {device.id: i for i, device in enumerate(mesh.devices.flat)}
    data_of = {device.id: idx[0] for idx, device in np.ndenumerate(mesh.devices)}
    groups = _replica_groups(hlo)
    assert groups, "expected fsdp/tensor collectives in the gradient computation"
    for group in groups:
        ids = [d for d in group if d in position]
        assert len({data_of[d] for d in ids}) == 1, f"collective across data replicas: {group}"


RMS = ("optim.compression=topk", "optim.topk.ratio=0.05", "optim.topk.precondition=rms", "optim.b1=0.0")


@pytest.mark.parametrize("run", ["momentum", "rms"])
def test_error_feedback_state_survives_a_checkpoint_round_trip(run, sparse_run, tmp_path):
    """The residual with DGC's velocity, or with the per-replica second moment of `precondition: rms`."""
    setup, _, state, _, step = sparse_run if run == "momentum" else _train(*RMS, **DATA_FSDP_TENSOR)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(2, state, {"position": 0})
    restored, _ = ckpt.restore(setup.abstract_train_state)
    ckpt.close()
    comp = restored["opt_state"][0]
    extra = comp.velocity if run == "momentum" else comp.second_moment
    assert np.abs(np.asarray(comp.residual["embed"])).sum() > 0 and np.abs(np.asarray(extra["embed"])).sum() > 0
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    # Training on from the restored state is bitwise what training on without the checkpoint gives.
    after_restore, _ = step(restored, _tokens(2))
    after_live, _ = step(jax.tree.map(lambda x: x.copy(), state), _tokens(2))
    for got, want in zip(jax.tree.leaves(after_restore), jax.tree.leaves(after_live), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_compression_needs_a_replica_axis():
    cfg, mesh = layout("optim.compression=topk", fsdp=2, tensor=2)
    with pytest.raises(ConfigError, match="optim.compression=topk"):
        build_setup(cfg, mesh)
