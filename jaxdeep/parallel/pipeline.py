"""The pipeline executor: runs a schedule table over the `pipeline` mesh axis with `jax.shard_map` + `ppermute`.

The shard_map is manual over `pipeline` only; the data, fsdp, expert and tensor axes stay with the partitioner,
so a stage's layers are sharded inside the stage exactly as they are without a pipeline. Each device scans over
the ticks of its column of the table (`schedules.plan_buffers`). A tick is

    F-phase: run one virtual stage forward (input: the embedded tokens on the first stage, else a stash slot)
    send the F output to the next device            <- in flight while the B-phase below computes
    B-phase: recompute one stage forward from its stashed input and run its backward (the last stage adds the
             head and the loss and seeds the gradient with 1/m)
    send the input gradient to the previous device  <- in flight while the next tick's F-phase computes
    store what arrived into the stash slots the table names

so each transfer overlaps the other direction's compute (both phases are busy in the steady state of 1f1b and
interleaved). Gradients are accumulated per device over its virtual stages; the embedding and head (replicated
over `pipeline`, since the first and the last stage use them) get theirs summed over the axis at the end.

A model runs in a pipeline when it provides `embed_tokens(tokens)`, `apply_blocks(x, layer_mask)` and
`output_logits(x)` and keeps its repeated blocks in one stack named `blocks` (see `StageModel`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxdeep.parallel import schedules as sch
from jaxdeep.parallel.stages import StagePlan
from jaxdeep.sharding import Rules, constrain, use_rules

AXIS = "pipeline"
Params = Any


@dataclass(frozen=True)
class StageModel:
    """Builds the model for one virtual stage from the parameters outside the block stack (embedding, final
    norm, head) and the stage's own stack of blocks [slots, ...]."""

    build: Callable[[Params, Params], Any]

    def embed(self, outer: Params, blocks: Params, tokens_bt: jax.Array) -> jax.Array:
        return self.build(outer, blocks).embed_tokens(tokens_bt)

    def blocks(
        self, outer: Params, blocks: Params, mask: jax.Array | None, x_btd: jax.Array, skip_masked: bool = True
    ) -> jax.Array:
        return self.build(outer, blocks).apply_blocks(x_btd, mask, skip_masked)

    def loss(self, outer: Params, blocks: Params, x_btd: jax.Array, targets_bt: jax.Array) -> jax.Array:
        logits_btv = self.build(outer, blocks).output_logits(x_btd)
        # The label's logit by a one-hot sum rather than a gather: a gather from logits split over two auto axes
        # inside the pipeline's shard_map trips an XLA partitioner check.
        labels_btv = jax.nn.one_hot(targets_bt, logits_btv.shape[-1], dtype=logits_btv.dtype)
        label_logit_bt = jnp.sum(logits_btv * labels_btv, axis=-1)
        return jnp.mean(jax.nn.logsumexp(logits_btv, axis=-1) - label_logit_bt)


@dataclass(frozen=True)
class Pipeline:
    """Everything static about one pipelined computation."""

    model: StageModel
    plan: StagePlan
    schedule: sch.Schedule
    buffers: sch.BufferPlan
    mesh: Mesh
    rules: Rules  # logical axis names -> mesh axes, for the activations inside the stages
    # Stage-specific work (embedding on the first stage, head and loss on the last, padding layers) is skipped by
    # a branch where False; where True every device computes it and keeps what it needs. Branches that only some
    # devices take, with collectives inside, hang XLA's CPU runtime, so CPU meshes always run branch free.
    branch_free: bool = True


def make_pipeline(
    model: StageModel, plan: StagePlan, schedule: sch.Schedule, mesh: Mesh, rules: Rules, branches: bool = False
) -> Pipeline:
    """`branches`: skip stage-specific work by branches (see `Pipeline.branch_free`; ignored on CPU)."""
    if (plan.n_devices, plan.n_virtual) != (schedule.n_devices, schedule.n_virtual):
        raise ValueError("the stage plan and the schedule disagree on devices or virtual stages")
    if mesh.shape[AXIS] != plan.n_devices:
        raise ValueError(f"mesh axis {AXIS!r} has {mesh.shape[AXIS]} devices, the plan {plan.n_devices}")
    branch_free = not branches or mesh.devices.flat[0].platform == "cpu"
    return Pipeline(model, plan, schedule, sch.plan_buffers(schedule), mesh, rules, branch_free)


def _messages(p: int, v: int) -> tuple[list, list]:
    # With one stage per device nothing goes round the ring from the last device to the first.
    if v == 1:
        return [(d, d + 1) for d in range(p - 1)], [(d + 1, d) for d in range(p - 1)]
    return [(d, (d + 1) % p) for d in range(p)], [(d, (d - 1) % p) for d in range(p)]


def run(pipe: Pipeline, outer: Params, stage_params: Params, tokens_mbs: jax.Array, table: jax.Array | None = None):
    """Loss (mean over microbatches) and, in training, its gradients.

    outer: parameters outside the block stack; stage_params: stacks in the stage layout [p, v, slots, ...];
    tokens_mbs: [microbatches, batch, seq + 1]. Returns `loss` for a forward-only schedule, else
    `(loss, outer grads, stage grads)`. `table` replaces `pipe.buffers.table` (same shape and stash sizes, e.g.
    from `schedules.pad_buffers`), so one compiled program can run several schedules.
    """
    schedule, plan, model = pipe.schedule, pipe.plan, pipe.model
    p, v, m = plan.n_devices, plan.n_virtual, schedule.n_microbatches
    if tokens_mbs.shape[0] != m:
        raise ValueError(f"expected {m} microbatches, got tokens of shape {tokens_mbs.shape}")
    _, valid = plan.index()
    masks = None if valid.all() else jnp.asarray(valid)
    col = {name: i for i, name in enumerate(sch.COLUMNS)}
    fwd_perm, bwd_perm = _messages(p, v)

    def pick(predicate, on_true, on_false):
        """`on_true()` where the device's predicate holds, else `on_false()`: a branch that runs one of them, or
        (branch_free) both, keeping the one wanted."""
        if pipe.branch_free:
            return jax.tree.map(lambda a, b: jnp.where(predicate, a, b), on_true(), on_false())
        return jax.lax.cond(predicate, on_true, on_false)

    train = schedule.train

    def per_device(outer, stages, tokens, table):
        # Inside, shardings are relative to the mesh with `pipeline` manual.
        with use_rules(pipe.rules, jax.sharding.get_abstract_mesh()):
            return device_program(outer, stages, tokens, table)

    def device_program(outer, stages, tokens, table):
        stages = jax.tree.map(lambda a: a[0], stages)  # [v, slots, ...]
        device_masks = None if masks is None else take(masks, jax.lax.axis_index(AXIS))
        inputs, targets = tokens[:, :, :-1], tokens[:, :, 1:]

        def chunk(r):
            if v == 1:
                return jax.tree.map(lambda a: a[0], stages), None if masks is None else device_masks[0]
            params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, r, keepdims=False), stages)
            return params, None if masks is None else take(device_masks, r)

        probe = jax.eval_shape(lambda: model.embed(outer, chunk(0)[0], inputs[0]))
        zeros_act = lambda: jnp.zeros(probe.shape, probe.dtype)
        stash_axes = (None, "batch", "act_seq", "act_embed")
        stash = constrain(jnp.zeros((pipe.buffers.n_input_slots + 1, *probe.shape), probe.dtype), stash_axes)
        grad_stash = constrain(jnp.zeros((pipe.buffers.n_grad_slots + 1, *probe.shape), probe.dtype), stash_axes)
        no_loss = jnp.zeros((), jnp.float32)

        def stage(outer, params, mask, x_in, kind, tokens_bt, targets_bt, with_loss):
            """One virtual stage: its input (the embedded tokens on the first stage, else the stashed
            activation), its blocks and, on the last stage, the head and the loss. One copy of the blocks serves
            every kind of stage, which keeps the program small."""
            embed = lambda: model.embed(outer, params, tokens_bt)
            x_0 = pick(kind == sch.KIND_FIRST, embed, lambda: x_in)
            y = model.blocks(outer, params, mask, x_0, not pipe.branch_free)
            if not with_loss:
                return y, no_loss
            loss = lambda: model.loss(outer, params, y, targets_bt).astype(jnp.float32)
            return y, pick(kind == sch.KIND_LAST, loss, lambda: no_loss)

        # A phase runs on every device when any device has work in it (see schedules.COLUMNS): an idle device
        # computes on scratch data and its results are dropped (its seed is zero, nobody stores what it sends).
        # In lock step this costs no time, since the tick waits for the busy devices anyway.

        def forward_phase(row, stash):
            kind, micro = row[col["f_kind"]], row[col["f_mb"]]
            params, mask = chunk(row[col["f_chunk"]])
            x_in = take(stash, row[col["f_slot"]])

            def active():
                return stage(outer, params, mask, x_in, kind, take(inputs, micro), take(targets, micro), not train)

            return jax.lax.cond(row[col["f_phase"]] == 0, lambda: (zeros_act(), no_loss), active)

        def backward_phase(row, stash, grad_stash):
            kind, micro = row[col["b_kind"]], row[col["b_mb"]]
            params, mask = chunk(row[col["b_chunk"]])
            x_in, grad_out = take(stash, row[col["b_slot"]]), take(grad_stash, row[col["b_grad_slot"]])
            zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)

            def active():
                # Recompute the stage forward, then pull back: the last stage seeds with d(mean loss) = 1/m,
                # the others with the gradient that arrived from the next stage, an idle device with zeros.
                tokens_bt, targets_bt = take(inputs, micro), take(targets, micro)
                run_stage = lambda o, c, x: stage(o, c, mask, x, kind, tokens_bt, targets_bt, True)
                (_, loss), pullback = jax.vjp(run_stage, outer, params, x_in)
                is_last, busy = kind == sch.KIND_LAST, kind != sch.KIND_IDLE
                seed_y = jnp.where(busy & ~is_last, grad_out, jnp.zeros_like(grad_out))
                d_outer, d_params, d_x = pullback((seed_y, jnp.where(is_last, 1.0 / m, 0.0)))
                return d_x, d_params, d_outer, loss

            idle = lambda: (zeros_act(), zeros(params), zeros(outer), no_loss)
            return jax.lax.cond(row[col["b_phase"]] == 0, idle, active)

        def tick(carry, row):
            stash, grad_stash, stage_grads, outer_grads, loss_sum = carry
            y, loss = forward_phase(row, stash)
            y_arrived = jax.lax.ppermute(y, AXIS, fwd_perm)
            if train:
                d_x, d_params, d_outer, loss = backward_phase(row, stash, grad_stash)
                d_x_arrived = jax.lax.ppermute(d_x, AXIS, bwd_perm)
                r = row[col["b_chunk"]]
                add = (lambda acc, g: acc + g[None]) if v == 1 else (lambda acc, g: acc.at[r].add(g))
                stage_grads = jax.tree.map(add, stage_grads, d_params)
                outer_grads = jax.tree.map(jnp.add, outer_grads, d_outer)
                grad_stash = grad_stash.at[row[col["recv_b_slot"]]].set(d_x_arrived)
            stash = stash.at[row[col["recv_f_slot"]]].set(y_arrived)
            return (stash, grad_stash, stage_grads, outer_grads, loss_sum + loss), None

        zeros_like = lambda tree: jax.tree.map(jnp.zeros_like, tree)
        carry = (stash, grad_stash, zeros_like(stages), zeros_like(outer), jnp.zeros((), jnp.float32))
        (_, _, stage_grads, outer_grads, loss_sum), _ = jax.lax.scan(tick, carry, table[:, 0])
        loss = jax.lax.psum(loss_sum, AXIS) / m
        if not train:
            return loss
        outer_grads = jax.lax.psum(outer_grads, AXIS)
        return loss, outer_grads, jax.tree.map(lambda a: a[None], stage_grads)

    stage_spec = PartitionSpec(AXIS)
    out_specs = PartitionSpec() if not train else (PartitionSpec(), PartitionSpec(), stage_spec)
    return jax.shard_map(
        per_device,
        mesh=pipe.mesh,
        in_specs=(PartitionSpec(), stage_spec, PartitionSpec(), PartitionSpec(None, AXIS)),
        out_specs=out_specs,
        axis_names={AXIS},
        check_vma=False,
    )(outer, stage_params, tokens_mbs, jnp.asarray(pipe.buffers.table) if table is None else table)


def take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[index] along the first axis as a dynamic slice (a gather there trips the partitioner when several other
    mesh axes split x)."""
    return jax.lax.dynamic_index_in_dim(x, index, keepdims=False)


def microbatches(tokens_bs: jax.Array, m: int) -> jax.Array:
    """[batch, seq+1] -> [m, batch/m, seq+1]; microbatch k takes rows k, k+m, ... so that every microbatch stays
    spread over all data shards."""
    micro = tokens_bs.reshape(-1, m, tokens_bs.shape[-1]).swapaxes(0, 1)
    return constrain(micro, (None, "batch", None))


def split_params(params: dict) -> tuple[dict, dict]:
    """(parameters outside the block stack, the block stack)."""
    return {k: v for k, v in params.items() if k != "blocks"}, params["blocks"]


def describe(pipe: Pipeline) -> str:
    """One line on the layout and the schedule's expected bubble."""
    s = pipe.schedule
    bubble = sch.simulated_bubble(s)
    theory = sch.theoretical_bubble(s.n_devices, s.n_microbatches, s.n_virtual)
    return (
        f"pipeline: {s.name}, {s.n_devices} devices × {s.n_virtual} virtual stages, layers per stage "
        f"{list(pipe.plan.layers)}, {s.n_microbatches} microbatches, {s.n_ticks} ticks, stash "
        f"{pipe.buffers.n_input_slots} inputs + {pipe.buffers.n_grad_slots} gradients per device, bubble "
        f"{bubble:.1%} (equal-stage theory {theory:.1%})"
    )
