"""optim.freeze_variance_after: AdamW whose second moment stops after N updates (1-bit Adam's frozen variance)."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdeep.config import ConfigError, OptimConfig
from jaxdeep.train.checkpoint import Checkpointer
from jaxdeep.train.optimizer import learning_rate_schedule, make_optimizer
from jaxdeep.train.state import build_setup
from tests.helpers import layout, tiny_config

FREEZE = 4
TOTAL_STEPS = 20
PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(4, 3), "norm": jnp.ones((3,), jnp.float32)}
MASK = {"w": True, "norm": False}


def _grads(step: int):
    key = jax.random.fold_in(jax.random.key(0), step)
    return {name: jax.random.normal(jax.random.fold_in(key, i), p.shape) for i, (name, p) in enumerate(PARAMS.items())}


def _is_adam(x) -> bool:
    return isinstance(x, optax.ScaleByAdamState)


def _frozen_state(opt_state) -> optax.ScaleByAdamState:
    """The Adam moments in the chain (the frozen-variance transform keeps adamw's state type)."""
    (state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_adam) if _is_adam(s)]
    return state


def _run(cfg: OptimConfig, steps: int):
    """Params and optimizer state after each of `steps` updates (jitted, as the train step runs it)."""
    opt = make_optimizer(cfg, total_steps=TOTAL_STEPS, decay_mask=MASK)

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state, out = PARAMS, opt.init(PARAMS), []
    for i in range(steps):
        params, state = step(params, state, _grads(i))
        out.append((params, state))
    return out


def test_matches_adamw_until_the_freeze_then_keeps_v_and_moves_m():
    base = dict(lr=1e-2, warmup_steps=2, weight_decay=0.1, b1=0.9, b2=0.95, clip_norm=1.0)
    dense = _run(OptimConfig(**base), FREEZE + 3)
    frozen = _run(OptimConfig(**base, freeze_variance_after=FREEZE), FREEZE + 3)

    for i in range(FREEZE):  # updates 1..FREEZE: AdamW exactly (up to float32 rounding)
        for x, y in zip(jax.tree.leaves(frozen[i][0]), jax.tree.leaves(dense[i][0]), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        adam = dense[i][1][1][0]  # chain(clip, adamw) -> adamw's chain -> ScaleByAdamState
        ours = _frozen_state(frozen[i][1])
        for x, y in zip(jax.tree.leaves((ours.mu, ours.nu)), jax.tree.leaves((adam.mu, adam.nu)), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)

    at_freeze = _frozen_state(frozen[FREEZE - 1][1])
    for i in range(FREEZE, FREEZE + 3):  # afterwards: nu bit-for-bit constant, mu still moving, params differ
        state = _frozen_state(frozen[i][1])
        assert int(state.count) == i + 1
        for x, y in zip(jax.tree.leaves(state.nu), jax.tree.leaves(at_freeze.nu), strict=True):
            np.testing.assert_array_equal(x, y)
        assert np.max(np.abs(state.mu["w"] - _frozen_state(frozen[i - 1][1]).mu["w"])) > 1e-3
    assert np.max(np.abs(frozen[-1][0]["w"] - dense[-1][0]["w"])) > 1e-5


def test_step_after_the_freeze_uses_the_frozen_v_and_its_bias_correction():
    b1, b2, eps = 0.9, 0.95, 1e-8
    cfg = OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.0, b1=b1, b2=b2, eps=eps, clip_norm=0.0)
    runs = _run(dataclasses.replace(cfg, freeze_variance_after=FREEZE), FREEZE + 2)
    before, after = _frozen_state(runs[FREEZE][1]), _frozen_state(runs[FREEZE + 1][1])
    t = FREEZE + 2
    expected_update = -(after.mu["w"] / (1 - b1**t)) / (np.sqrt(before.nu["w"] / (1 - b2**FREEZE)) + eps)
    lr = float(learning_rate_schedule(cfg, TOTAL_STEPS)(t - 1))  # the schedule's argument is the update index
    np.testing.assert_allclose(runs[FREEZE + 1][0]["w"] - runs[FREEZE][0]["w"], lr * expected_update, rtol=2e-5)


def test_frozen_and_plain_adamw_states_are_the_same_tree():
    # so a checkpoint written with one setting resumes with the other
    plain = make_optimizer(OptimConfig(), total_steps=10, decay_mask=MASK).init(PARAMS)
    frozen = make_optimizer(OptimConfig(freeze_variance_after=3), total_steps=10, decay_mask=MASK).init(PARAMS)
    assert jax.tree.structure(plain) == jax.tree.structure(frozen)
    assert isinstance(frozen[1][0], optax.ScaleByAdamState)


def test_state_round_trips_through_the_checkpointer(tmp_path):
    cfg, mesh = layout(f"optim.freeze_variance_after={FREEZE - 2}", fsdp=2)
    setup = build_setup(cfg, mesh)  # optimizer-state shardings come from optax.tree_map_params over the new state
    abstract = {k: setup.abstract_train_state[k] for k in ("params", "opt_state")}
    shardings = {k: setup.state_shardings[k] for k in ("params", "opt_state")}

    @partial(jax.jit, out_shardings=shardings["params"])
    def make_params():
        return jax.tree.map(lambda s: jnp.cos(jnp.arange(s.size, dtype=s.dtype)).reshape(s.shape), abstract["params"])

    @partial(jax.jit, out_shardings=shardings["opt_state"])
    def advance(opt_state, params):
        _, opt_state = setup.optimizer.update(jax.tree.map(lambda p: jnp.sin(7.0 * p), params), opt_state, params)
        return opt_state

    params = make_params()
    opt_state = jax.jit(setup.optimizer.init, out_shardings=shardings["opt_state"])(params)
    for _ in range(FREEZE):  # past the freeze, so nu is non-zero and frozen
        opt_state = advance(opt_state, params)
    state = {"params": params, "opt_state": opt_state}
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state, {})
    restored, _ = ckpt.restore(abstract)
    ckpt.close()
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    frozen = _frozen_state(restored["opt_state"])
    assert int(frozen.count) == FREEZE
    assert float(jnp.max(jnp.abs(frozen.nu["blocks"]["attn"]["wq"]))) > 0
    for x, y in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(jax.device_get(state)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    leaf = frozen.nu["blocks"]["attn"]["wq"]
    assert leaf.sharding == _frozen_state(shardings["opt_state"]).nu["blocks"]["attn"]["wq"]


@pytest.mark.parametrize("value", ["-1", "-60"])
def test_negative_values_are_a_config_error(value):
    with pytest.raises(ConfigError, match=r"optim\.freeze_variance_after: must be >= 0"):
        tiny_config(f"optim.freeze_variance_after={value}")
