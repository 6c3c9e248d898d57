"""Checkpoints: exact round trip, bitwise-identical resume, restore onto other device counts."""

import jax
import numpy as np
import pytest

from jaxdeep.train.checkpoint import Checkpointer
from jaxdeep.train.loop import mesh_from_config, train
from jaxdeep.train.state import build_setup, init_train_state
from tests.helpers import layout, max_rel_error, tiny_config


def _assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_restores_onto_4_and_1_devices(tmp_path):
    cfg, mesh8 = layout(data=2, fsdp=2, tensor=2)
    state = init_train_state(build_setup(cfg, mesh8))
    data_state = {"position": 7, "note": "anything JSON"}
    ckpt = Checkpointer(tmp_path, async_save=True)
    ckpt.save(5, state, data_state)
    ckpt.close()  # waits for the background write

    for sizes in (dict(data=2, fsdp=2, tensor=2), dict(fsdp=2, tensor=2), {}):
        cfg_n, mesh_n = layout(**sizes)
        setup_n = build_setup(cfg_n, mesh_n)
        reader = Checkpointer(tmp_path, async_save=False)
        restored, restored_data = reader.restore(setup_n.abstract_train_state)
        reader.close()
        assert restored_data == data_state
        _assert_bitwise_equal(restored, state)
        leaf = restored["params"]["blocks"]["attn"]["wq"]
        assert leaf.sharding == setup_n.state_shardings["params"]["blocks"]["attn"]["wq"]
        assert len(leaf.sharding.device_set) == mesh_n.devices.size


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path):
    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    full = train(cfg, tmp_path / "full")
    first = train(cfg, tmp_path / "resumed", stop_after=3)
    assert int(first.state["step"]) == 3
    second = train(cfg, tmp_path / "resumed")
    assert second.resumed_from == 3
    assert int(second.state["step"]) == cfg.train.steps
    _assert_bitwise_equal(second.state, full.state)
    # The run really trained (a resume that silently restarted or froze would still be "equal" to itself).
    initial = init_train_state(build_setup(cfg, mesh_from_config(cfg)[0]))
    assert max_rel_error(full.state["params"], initial["params"]) > 1e-3


def test_restore_can_leave_subtrees_on_disk(tmp_path):
    """A server reads the parameters alone: the skipped subtrees (the optimizer moments, a parameter group) are
    absent from the result, everything else is restored exactly, and the caller's abstract tree is untouched."""
    cfg, mesh = layout(fsdp=2)
    setup = build_setup(cfg, mesh)
    state = init_train_state(setup)
    ckpt = Checkpointer(tmp_path, async_save=False)
    try:
        ckpt.save(2, state, {"position": 3})
        abstract = setup.abstract_train_state
        restored, data = ckpt.restore(abstract, skip=[("opt_state",), ("rng",), ("params", "blocks")])
        assert data == {"position": 3}
        assert set(restored) == set(state) - {"opt_state", "rng"}
        assert set(restored["params"]) == set(state["params"]) - {"blocks"} and restored["params"]
        want = {k: v for k, v in state.items() if k not in ("opt_state", "rng")}
        want["params"] = {k: v for k, v in state["params"].items() if k != "blocks"}
        _assert_bitwise_equal(restored, want)
        assert "opt_state" in abstract and "blocks" in abstract["params"]
        with pytest.raises(KeyError, match="params/nothing"):
            ckpt.restore(abstract, skip=[("params", "nothing")])
        with pytest.raises(ValueError, match="at least one key"):
            ckpt.restore(abstract, skip=[()])
    finally:
        ckpt.close()


def test_checkpoints_written_through_orbax_standard_handler_still_restore(tmp_path):
    """Runs saved before checkpoints went through Orbax's general pytree handler (StandardSave, the same files)
    restore whole and in part."""
    import orbax.checkpoint as ocp

    cfg, mesh = layout(fsdp=2)
    setup = build_setup(cfg, mesh)
    state = init_train_state(setup)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    manager = ocp.CheckpointManager(tmp_path, options=options, item_names=("state", "data"))
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"p": 1})))
    manager.close()
    ckpt = Checkpointer(tmp_path, async_save=False)
    try:
        restored, data = ckpt.restore(setup.abstract_train_state)
        part, _ = ckpt.restore(setup.abstract_train_state, skip=[("opt_state",)])
    finally:
        ckpt.close()
    assert data == {"p": 1} and "opt_state" not in part
    _assert_bitwise_equal(restored, state)
    _assert_bitwise_equal(part["params"], state["params"])
