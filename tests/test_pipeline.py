"""The pipeline computes what the plain model computes: loss and gradients for every schedule, pipeline sizes 2 and
4 and microbatch counts p, 2p, 4p; and whole train and eval steps on meshes that mix pipeline with data, fsdp and
tensor parallelism, with stages of unequal length."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxdeep.config import ConfigError, load_config
from jaxdeep.parallel import pipeline
from jaxdeep.parallel.schedules import build_schedule, pad_buffers, plan_buffers
from jaxdeep.parallel.stages import from_stage_layout, plan_stages, to_stage_layout
from jaxdeep.sharding import use_rules
from jaxdeep.train.pipeline_step import dense_stage_model
from jaxdeep.train.state import build_setup, init_train_state
from jaxdeep.train.step import cross_entropy, make_eval_step, make_train_step
from tests.fast_compile import compiled
from tests.helpers import layout, max_rel_error

SMALL = (
    "model.n_layers=8",
    "model.d_model=16",
    "model.n_heads=2",
    "model.head_dim=8",
    "model.d_ff=32",
    "model.vocab_size=64",
    "data.seq_len=8",
    "data.global_batch_size=16",
)
# Schedules that share one compiled program (same virtual stages; tables padded to one shape).
FAMILIES = {"v1": (("gpipe", "1f1b"), 1), "v2": (("circular", "interleaved"), 2)}
GRID = [(p, family, m) for p in (2, 4) for family in FAMILIES for m in (p, 2 * p, 4 * p)]


def _tokens(rows: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(7).integers(1, vocab, (rows, 9)).astype(np.int32)


@pytest.fixture(scope="module")
def reference():
    """Initial parameters, a batch, and the plain model's loss and gradients on one device."""
    cfg, mesh = layout(*SMALL)
    setup = build_setup(cfg, mesh)
    params = jax.device_get(init_train_state(setup)["params"])
    tokens = _tokens(16, 64)
    loss, grads = compiled(jax.value_and_grad(lambda p, t: cross_entropy(setup, p, t)), params, tokens)(params, tokens)
    return params, tokens, float(loss), jax.device_get(grads)


@pytest.mark.parametrize("p, family, m", GRID, ids=[f"p{p}-{f}-m{m}" for p, f, m in GRID])
def test_every_schedule_matches_the_plain_model(p, family, m, reference):
    params, tokens, want_loss, want_grads = reference
    names, v = FAMILIES[family]
    cfg, mesh = layout(*SMALL, f"parallel.schedule={names[0]}", f"parallel.virtual_stages={v}", pipeline=p)
    setup = build_setup(cfg, mesh)
    plan = plan_stages(cfg.model, cfg.data.seq_len, p, v)
    schedules = [build_schedule(name, p, v, m) for name in names]
    tables = pad_buffers([plan_buffers(s) for s in schedules])
    pipe = pipeline.make_pipeline(dense_stage_model(setup), plan, schedules[0], mesh, cfg.sharding.rules)
    pipe = dataclasses.replace(pipe, buffers=tables[0])

    def loss_and_grads(params, tokens, table):
        with use_rules(cfg.sharding.rules, mesh):
            outer, blocks = pipeline.split_params(params)
            tokens_mbs = pipeline.microbatches(tokens, m)
            loss, outer_grads, stage_grads = pipeline.run(pipe, outer, to_stage_layout(blocks, plan), tokens_mbs, table)
            return loss, {**outer_grads, "blocks": from_stage_layout(stage_grads, plan)}

    run = compiled(loss_and_grads, params, tokens, tables[0].table)
    for name, buffers in zip(names, tables, strict=True):
        loss, grads = jax.device_get(run(params, tokens, buffers.table))
        assert abs(loss - want_loss) <= 1e-5 * abs(want_loss), (name, loss, want_loss)
        err = max_rel_error(grads, want_grads)
        assert err <= 1e-5, f"{name} p={p} m={m}: gradients differ by {err:.2e}"


# Common to every layout below, so that one single-device step serves as the reference for all.
STEP = (*SMALL, "model.tie_embeddings=false", "optim.grad_accum_steps=2")
LAYOUTS = {
    # Unequal stages (5 + 3 layers: a gather into the stage layout, padding skipped), then the eval step too.
    "pipeline2_data2_tensor2": (dict(pipeline=2, data=2, tensor=2), ("parallel.stage_layers=[5, 3]",)),
    # Two virtual stages per device, parameters sharded over fsdp inside each stage.
    "pipeline4_fsdp2": (
        dict(pipeline=4, fsdp=2),
        ("parallel.schedule=interleaved", "parallel.virtual_stages=2", "parallel.microbatches=4"),
    ),
    # Unequal stages with their layers laid out straight and rematerialised (the padding layer skipped by a branch).
    "pipeline2_unrolled_remat": (
        dict(pipeline=2, data=2),
        ("parallel.stage_layers=[5, 3]", "model.scan_layers=false", "model.remat=full"),
    ),
}


def _step(state, with_eval, *overrides, **sizes):
    cfg, mesh = layout(*STEP, *overrides, **sizes)
    setup = build_setup(cfg, mesh)
    state = jax.device_put(state, setup.state_shardings)
    tokens = _tokens(16, 64)
    new_state, metrics = compiled(make_train_step(setup), state, tokens)(state, tokens)
    eval_loss = (
        compiled(make_eval_step(setup), new_state["params"], tokens)(new_state["params"], tokens) if with_eval else 0.0
    )
    return jax.device_get((metrics["loss"], new_state["params"], new_state["opt_state"], eval_loss)), new_state


@pytest.fixture(scope="module")
def single_device_step():
    cfg, mesh = layout(*STEP)
    state = jax.device_get(init_train_state(build_setup(cfg, mesh)))
    return state, _step(state, True)[0]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_train_and_eval_steps_match_one_device(name, single_device_step):
    state, single = single_device_step
    sizes, overrides = LAYOUTS[name]
    with_eval = name == "pipeline2_data2_tensor2"
    piped, new_state = _step(state, with_eval, *overrides, **sizes)
    labels = ["loss", "updated params", "optimizer state", "eval loss"][: 4 if with_eval else 3]
    for label, got, want in zip(labels, piped, single, strict=False):
        err = max_rel_error(got, want)
        assert err <= 1e-5, f"{name}: {label} differ from one device by {err:.2e}"
    assert max_rel_error(piped[1], state["params"]) > 1e-4  # the step moved the parameters
    # Each device stores only its stage's layers (sharding.rules.layers = [pipeline]).
    wq = new_state["params"]["blocks"]["attn"]["wq"]  # [layers, embed, heads, head_dim]
    assert tuple(wq.sharding.spec)[0] == "pipeline"
    assert wq.addressable_shards[0].data.shape[0] == 8 // sizes["pipeline"]


BAD = {
    "virtual stages for gpipe": (
        ["parallel.schedule=gpipe", "parallel.virtual_stages=2"],
        ["parallel.virtual_stages=2", "gpipe"],
    ),
    "one virtual stage for circular": (["parallel.schedule=circular"], ["parallel.virtual_stages=1", "circular"]),
    "stage layers do not sum": (["parallel.stage_layers=[3, 3]"], ["parallel.stage_layers", "sums to 6", "n_layers=8"]),
    "stage layers count": (["parallel.stage_layers=[8]"], ["parallel.stage_layers", "2 positive layer counts"]),
    "more stages than layers": (
        ["model.n_layers=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2"],
        ["model.n_layers=2", "4 pipeline stages"],
    ),
    "microbatches": (["parallel.microbatches=3"], ["parallel.microbatches=3", "must divide"]),
    "microbatch over data": (["parallel.microbatches=16", "mesh.data=2"], ["1 sequences", "2 batch shards"]),
    "layers over pipeline": (
        ["model.n_layers=7", "parallel.stage_layers=[4, 3]"],
        ["model.n_layers=7", "sharding.rules.layers"],
    ),
    "compression": (["optim.compression=topk", "mesh.data=2"], ["optim.compression=topk", "mesh.pipeline=2"]),
}


@pytest.mark.parametrize("overrides, expected", BAD.values(), ids=BAD.keys())
def test_bad_pipeline_config_names_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*SMALL, "mesh.pipeline=2", *overrides])
    missing = [text for text in expected if text not in str(err.value)]
    assert not missing, f"{missing} not in message: {err.value}"
