"""Expert-parallel and tensor-parallel DeepSeek layouts on 8 simulated devices compute what one device
computes: logits, and after one train step (loss with MTP and balance terms) the parameters, the AdamW
moments (the gradients), the selection biases and the metrics."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxdeep.train.state import build_setup, init_train_state
from jaxdeep.train.step import make_forward, make_train_step
from tests.helpers import layout, max_rel_error
from tests.test_deepseek_train import DEEPSEEK

LAYOUTS = {
    "expert8": dict(expert=8),
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2),
    "data2_tensor4": dict(data=2, tensor=4),  # no expert parallelism: every device holds all experts' slices
}


def _tokens() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (8, 17)).astype(np.int32)


@pytest.fixture(scope="module")
def initial_state():
    cfg, mesh = layout(*DEEPSEEK)
    return jax.device_get(init_train_state(build_setup(cfg, mesh)))


# Inference logits (no MTP) are compared where every kind of split meets; the train step everywhere.
WITH_FORWARD = {"expert8", "fsdp2_expert2_tensor2", "data2_tensor4"}


def _run(sizes, initial_state, with_forward=True):
    cfg, mesh = layout(*DEEPSEEK, **sizes)
    setup = build_setup(cfg, mesh)
    state = jax.device_put(initial_state, setup.state_shardings)
    tokens = _tokens()
    logits = make_forward(setup)(state["params"], tokens[:, :-1], state["model_state"]) if with_forward else None
    new_state, metrics = make_train_step(setup)(state, tokens)
    # After one AdamW step the first moment is 0.1 × the gradient: comparing it compares the gradients.
    return jax.device_get({"logits": logits, "new_state": new_state, "metrics": metrics})


@pytest.fixture(scope="module")
def single_device(initial_state):
    return _run({}, initial_state)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_device(name, single_device, initial_state):
    sharded = _run(LAYOUTS[name], initial_state, with_forward=name in WITH_FORWARD)
    want = single_device
    if name in WITH_FORWARD:
        assert max_rel_error(sharded["logits"], want["logits"]) <= 1e-5, name
    for part in ("params", "opt_state", "model_state", "step"):
        err = max_rel_error(sharded["new_state"][part], want["new_state"][part])
        assert err <= 1e-5, f"{name}: {part} after one step differs from one device by {err:.2e}"
    for key in want["metrics"]:
        np.testing.assert_allclose(sharded["metrics"][key], want["metrics"][key], rtol=1e-5, err_msg=key)
    assert sharded["metrics"]["moe_dropped_tokens"] == 0.0
    # Not vacuous: the step moved the parameters and the selection biases.
    assert max_rel_error(sharded["new_state"]["params"], initial_state["params"]) > 1e-4
    assert max_rel_error(sharded["new_state"]["model_state"], initial_state["model_state"]) > 0


def test_experts_are_split_over_the_expert_axis(initial_state):
    cfg, mesh = layout(*DEEPSEEK, fsdp=2, expert=2, tensor=2)
    state = jax.device_put(initial_state, build_setup(cfg, mesh).state_shardings)
    gate_up = state["params"]["moe_blocks"]["mlp"]["experts"]["gate_up_proj"]  # [layers, E, d, 2, F]
    assert tuple(gate_up.sharding.spec) == (None, "expert", "fsdp", None, "tensor")
    assert gate_up.addressable_shards[0].data.shape == (1, 4, 16, 2, 8)
