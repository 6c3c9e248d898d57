"""Loss and gradients through the pipeline (mesh.pipeline > 1): what `step.py` runs instead of one
`value_and_grad` over the whole model.

Parameters stay in the model's layout ([layers, ...] stacks, split over `pipeline` by `sharding.rules.layers`) so
that checkpoints, the optimizer and every other step see one layout; each step moves the block stacks into the
stage layout (a reshape when every device holds a contiguous, equal run of layers; a gather otherwise) and the
gradients back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxdeep.config import pipeline_microbatches
from jaxdeep.parallel import pipeline
from jaxdeep.parallel.schedules import build_schedule
from jaxdeep.parallel.stages import from_stage_layout, plan_stages, to_stage_layout
from jaxdeep.train.state import ModelSetup

log = logging.getLogger("jaxdeep")


def is_pipelined(setup: ModelSetup) -> bool:
    return setup.mesh.shape[pipeline.AXIS] > 1


def dense_stage_model(setup: ModelSetup) -> pipeline.StageModel:
    """Stages of the dense Transformer: the model rebuilt around one stage's stack of blocks."""

    return pipeline.StageModel(lambda outer, blocks: setup.merge({**outer, "blocks": blocks}))


def build_pipeline(setup: ModelSetup, train: bool = True) -> pipeline.Pipeline:
    cfg, mesh = setup.cfg, setup.mesh
    p, par = mesh.shape[pipeline.AXIS], cfg.parallel
    branches = par.stage_branches and mesh.devices.flat[0].platform != "cpu"
    plan = plan_stages(cfg.model, cfg.data.seq_len, p, par.virtual_stages, par.stage_layers, branches)
    schedule = build_schedule(par.schedule, p, par.virtual_stages, pipeline_microbatches(cfg, p), train)
    return pipeline.make_pipeline(dense_stage_model(setup), plan, schedule, mesh, cfg.sharding.rules, branches)


def _stage_shardings(setup: ModelSetup):
    """Shardings of the stage-layout stacks [p, v, slots, ...]: devices over `pipeline`, the rest as in the
    model's layout."""

    def stage(sharding: NamedSharding) -> NamedSharding:
        rest = tuple(sharding.spec)[1:]
        return NamedSharding(setup.mesh, PartitionSpec(pipeline.AXIS, None, None, *rest))

    return jax.tree.map(stage, setup.state_shardings["params"]["blocks"])


def _stage_params(setup: ModelSetup, pipe: pipeline.Pipeline, params):
    outer, blocks = pipeline.split_params(params)
    stages = to_stage_layout(blocks, pipe.plan)
    return outer, jax.tree.map(jax.lax.with_sharding_constraint, stages, _stage_shardings(setup))


def make_pipeline_loss_and_grads(setup: ModelSetup) -> Callable:
    """(params, tokens [batch, seq+1]) -> (mean loss, gradients in the model's layout); call under jit."""
    pipe = build_pipeline(setup, train=True)
    log.info(pipeline.describe(pipe))
    block_shardings = setup.state_shardings["params"]["blocks"]

    def loss_and_grads(params, tokens_bs):
        outer, stages = _stage_params(setup, pipe, params)
        tokens_mbs = pipeline.microbatches(tokens_bs, pipe.schedule.n_microbatches)
        loss, outer_grads, stage_grads = pipeline.run(pipe, outer, stages, tokens_mbs)
        block_grads = from_stage_layout(stage_grads, pipe.plan)
        block_grads = jax.tree.map(jax.lax.with_sharding_constraint, block_grads, block_shardings)
        return loss, {**outer_grads, "blocks": block_grads}

    return loss_and_grads


def make_pipeline_loss(setup: ModelSetup) -> Callable:
    """(params, tokens [batch, seq+1]) -> mean loss, forward only (evaluation); call under jit."""
    pipe = build_pipeline(setup, train=False)

    def loss(params, tokens_bs):
        outer, stages = _stage_params(setup, pipe, params)
        return pipeline.run(pipe, outer, stages, pipeline.microbatches(tokens_bs, pipe.schedule.n_microbatches))

    return loss
