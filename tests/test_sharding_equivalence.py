"""Every supported layout computes what one device computes: logits, loss, gradients, updated params."""

import jax
import numpy as np
import pytest

from jaxdeep.train.state import build_setup, init_train_state
from jaxdeep.train.step import batch_sharding, cross_entropy, make_forward, make_train_step
from tests.helpers import layout, max_rel_error

LAYOUTS = {
    "data": dict(data=8),
    "fsdp": dict(fsdp=8),
    "tensor": dict(tensor=4),
    "data_tensor": dict(data=2, tensor=4),
    "fsdp_tensor": dict(fsdp=2, tensor=4),
    "data_fsdp_tensor": dict(data=2, fsdp=2, tensor=2),
    "expert_as_data": dict(expert=2, tensor=2),
}
OVERRIDES = ("model.tie_embeddings=false", "optim.grad_accum_steps=2", "data.global_batch_size=16")


def _tokens():
    return np.random.default_rng(123).integers(1, 256, (16, 17)).astype(np.int32)


@pytest.fixture(scope="module")
def initial_state():
    cfg, mesh = layout(*OVERRIDES)
    return jax.device_get(init_train_state(build_setup(cfg, mesh)))


def _run(sizes, initial_state):
    cfg, mesh = layout(*OVERRIDES, **sizes)
    setup = build_setup(cfg, mesh)
    # Same starting point everywhere (sharded initialisation is checked on its own below).
    state = jax.device_put(initial_state, setup.state_shardings)
    tokens = _tokens()
    logits = make_forward(setup)(state["params"], tokens[:, :-1])
    grad_fn = jax.jit(
        jax.value_and_grad(lambda p, t: cross_entropy(setup, p, t)),
        in_shardings=(setup.state_shardings["params"], batch_sharding(setup)),
    )
    loss, grads = grad_fn(state["params"], tokens)
    new_state, metrics = make_train_step(setup)(state, tokens)
    return jax.device_get((logits, loss, grads, new_state["params"], metrics["loss"], new_state["opt_state"]))


@pytest.fixture(scope="module")
def single_device(initial_state):
    return _run({}, initial_state)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_device(name, single_device, initial_state):
    sharded = _run(LAYOUTS[name], initial_state)
    labels = ["logits", "loss", "grads", "updated params", "step loss", "optimizer state"]
    for label, got, want in zip(labels, sharded, single_device, strict=True):
        err = max_rel_error(got, want)
        assert err <= 1e-5, f"{name}: {label} differ from one device by {err:.2e}"
    # Guard against a vacuous comparison: the step must have moved the parameters.
    assert max_rel_error(sharded[3], initial_state["params"]) > 1e-4


def test_sharded_initialisation_matches_single_device(initial_state):
    cfg, mesh = layout(*OVERRIDES, data=2, fsdp=2, tensor=2)
    state = jax.device_get(init_train_state(build_setup(cfg, mesh)))
    assert max_rel_error(state, initial_state) == 0.0


def test_parameters_are_actually_sharded():
    cfg, mesh = layout(*OVERRIDES, fsdp=2, tensor=4)
    state = init_train_state(build_setup(cfg, mesh))
    wq = state["params"]["blocks"]["attn"]["wq"]  # [layers, embed, heads, head_dim]
    assert tuple(wq.sharding.spec)[:3] == (None, "fsdp", "tensor")
    assert wq.addressable_shards[0].data.shape == (2, 32 // 2, 4 // 4, 8)
    mu = state["opt_state"][1][0].mu["blocks"]["attn"]["wq"]  # Adam moment follows its parameter
    assert mu.sharding.spec == wq.sharding.spec
