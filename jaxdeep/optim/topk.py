"""Top-k gradient compression with error feedback, as an optax transformation that reduces across replicas.

`topk_compression(...)` runs inside `jax.shard_map` with the replica axes manual. Each replica's gradient goes in;
the mean over replicas comes out, the same on every replica. On the way, each replica

1. (optional) clips its own gradient by norm (DGC local clipping),
2. (hierarchical) reduce-scatters it densely over `fast_axes`, keeping one chunk,
3. adds what it has not sent yet (the residual) and, with momentum correction, the DGC velocity,
4. selects the k entries of largest magnitude (`selection.py`), exchanges (index, value) pairs with every replica
   along `axes` and scatter-adds them into a dense sum (`exchange.py`),
5. keeps everything it did not send as the new residual (error feedback), and
6. (hierarchical) all-gathers the chunks back over `fast_axes`.

With `feedback="ef21"`, steps 3 and 5 change: a replica selects among the differences between its gradient and
its estimate (what the others know of it), sets its estimate to the gradient where it sent, and the output is the
mean of all replicas' estimates rather than the mean of what was sent this step.

With `precondition="rms"`, step 1 clips to `clip_norm` instead, and before step 3 each replica (hierarchical: each
fast group) divides its gradient by its own running RMS, Adam's second moment; the optimizer after the exchange
then applies momentum only (README.md, "Preconditioning before the exchange").

Tensors with fewer than `min_size` entries per device skip all this and go through a dense `psum`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxdeep.optim.exchange import AxisNames, sparse_sum
from jaxdeep.optim.layout import Bucket, ExchangeLayout, Selection, plan_layout, stage_of, stage_ratios
from jaxdeep.optim.selection import Method, select

Feedback = Literal["residual", "ef21"]
Precondition = Literal["none", "rms"]


class TopkState(NamedTuple):
    count: jax.Array  # int32 steps taken: picks the warm-up stage and seeds the sampled selection
    residual: Any  # per replica, what it has not sent yet (feedback "residual"); () otherwise
    velocity: Any  # per replica, DGC momentum-corrected velocity; () without momentum correction
    estimate: Any = ()  # per replica, what the others know of its gradient (feedback "ef21"); () otherwise
    mean_estimate: Any = ()  # the mean of all replicas' estimates, the same on each (feedback "ef21"); () otherwise
    second_moment: Any = ()  # per replica, the moving mean of its squared gradient (precondition "rms"); () otherwise


@dataclass(frozen=True)
class TopkOptions:
    ratio: float = 0.05  # fraction of its entries each replica sends per step
    error_feedback: bool = True  # keep unsent entries and add them to the next step's gradient
    feedback: Feedback = "residual"  # how unsent entries are kept: summed into a residual, or ef21 (see README)
    selection: Selection = "per_tensor"  # top-k within each tensor, or over all tensors at once
    method: Method = "exact"  # exact lax.top_k, or a threshold estimated from a sample
    sample_size: int = 16384  # entries sampled to estimate the threshold (method "sampled")
    min_size: int = 1024  # tensors with fewer entries per device go dense
    warmup_steps: int = 0  # sparsity warm-up length; 0 = start at `ratio`
    warmup_start_ratio: float = 0.25  # density of the first warm-up stage
    warmup_stages: int = 4  # densities during the warm-up (each compiles its own exchange)
    momentum: float = 0.0  # DGC momentum correction factor; 0 = off
    local_clip_norm: float = 0.0  # DGC local clipping: each replica clips to this × sqrt(replicas); 0 = off
    precondition: Precondition = "none"  # "rms": each replica divides its gradient by its own RMS before selecting
    b2: float = 0.95  # decay of the second moment (precondition "rms")
    eps: float = 1e-8  # added to the RMS (precondition "rms")
    clip_norm: float = 0.0  # precondition "rms": each replica clips its gradient to this norm first; 0 = off
    seed: int = 0  # seed of the sampled selection

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.warmup_steps > 0 and not self.ratio <= self.warmup_start_ratio <= 1.0:
            raise ValueError(f"warmup_start_ratio must be in [ratio, 1], got {self.warmup_start_ratio}")
        if self.warmup_stages < 1 or self.sample_size < 1 or self.min_size < 0 or self.warmup_steps < 0:
            raise ValueError("warmup_stages and sample_size must be >= 1, min_size and warmup_steps >= 0")
        if not 0.0 <= self.momentum < 1.0 or self.local_clip_norm < 0:
            raise ValueError("momentum must be in [0, 1) and local_clip_norm >= 0")
        if self.feedback not in ("residual", "ef21"):
            raise ValueError(f"feedback must be 'residual' or 'ef21', got {self.feedback!r}")
        if self.feedback == "ef21" and self.momentum > 0:
            raise ValueError("feedback 'ef21' does not combine with momentum correction; set momentum=0")
        if self.precondition not in ("none", "rms"):
            raise ValueError(f"precondition must be 'none' or 'rms', got {self.precondition!r}")
        if not 0.0 <= self.b2 < 1.0 or self.eps < 0 or self.clip_norm < 0:
            raise ValueError("b2 must be in [0, 1), eps and clip_norm >= 0")

    @property
    def rms(self) -> bool:
        return self.precondition == "rms"

    @property
    def kept_fields(self) -> tuple[bool, ...]:
        """Which of TopkState's fields after `count` these options keep (the others are empty tuples)."""
        return (self.keeps_residual, self.momentum > 0, self.ef21, self.ef21, self.rms)

    @property
    def ef21(self) -> bool:
        return self.error_feedback and self.feedback == "ef21"

    @property
    def keeps_residual(self) -> bool:
        return self.error_feedback and self.feedback == "residual"

    @property
    def ratios(self) -> tuple[float, ...]:
        """Density of each stage: the warm-up stages, then `ratio`."""
        return stage_ratios(self.ratio, self.warmup_steps, self.warmup_start_ratio, self.warmup_stages)

    def stage(self, count: jax.Array) -> jax.Array:
        return stage_of(count, self.warmup_steps, self.warmup_stages)


def _axes_size(axes: AxisNames) -> int:
    return math.prod(lax.axis_size(a) for a in axes)


def _concat(leaves: Sequence[jax.Array], positions: Sequence[int]) -> jax.Array:
    return jnp.concatenate([leaves[i].reshape(-1) for i in positions])


def _split_into(out: list, flat: jax.Array, positions: Sequence[int], like: Sequence[jax.Array]) -> None:
    offset = 0
    for i in positions:
        size = like[i].size
        out[i] = flat[offset : offset + size].reshape(like[i].shape).astype(like[i].dtype)
        offset += size


def clip_local(leaves: list[jax.Array], shard_axes: Sequence[AxisNames], max_norm: float) -> list[jax.Array]:
    """Scale one replica's gradient so its global norm is at most `max_norm`.

    `shard_axes[i]`: the mesh axes leaf i is split over, whose partial sums of squares must be added up.
    """
    squares = []
    for x, axes in zip(leaves, shard_axes, strict=True):
        local = jnp.sum(jnp.square(x.astype(jnp.float32)))
        squares.append(lax.psum(local, axes) if axes else local)
    norm = jnp.sqrt(sum(squares))
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return [(x * scale).astype(x.dtype) for x in leaves]


class BucketState(NamedTuple):
    """One bucket's slice of `TopkState` (flat, per replica); None where the options keep no such state."""

    residual: jax.Array | None
    velocity: jax.Array | None
    estimate: jax.Array | None
    mean_estimate: jax.Array | None
    second_moment: jax.Array | None


class BucketResult(NamedTuple):
    mean: jax.Array  # [size] mean over replicas of what they sent, identical on every replica
    residual: jax.Array | None  # [size] this replica's unsent mass (nonzero only on its own chunk)
    velocity: jax.Array | None  # [size] this replica's masked DGC velocity
    estimate: jax.Array | None  # [size] ef21: what the others know of this replica's gradient (its own chunk)
    second_moment: jax.Array | None  # [size] rms: this replica's moving mean of its squared gradient (own chunk)


def compress_bucket(
    grad_n: jax.Array,
    state_n: BucketState,
    bucket: Bucket,
    ratio: float,
    opts: TopkOptions,
    key: jax.Array,
    axes: AxisNames,
    fast_axes: AxisNames,
    n_replicas: int,
    v_correction: jax.Array | float = 1.0,
) -> BucketResult:
    """Compress and exchange one flat vector; see the module docstring for the steps.

    `v_correction`: the bias correction of the second moment after this update, 1 - b2**(count + 1) (rms only).
    """
    n, c = bucket.size, bucket.chunk
    fast = _axes_size(fast_axes) if fast_axes else 1
    # This replica's own chunk of the fast-tier group (the whole vector when there is no fast tier).
    offset = lax.axis_index(fast_axes) * c if fast > 1 else 0
    pad = c * fast - n

    def own(v_n: jax.Array | None) -> jax.Array | None:
        if v_n is None or fast == 1:
            return v_n
        return lax.dynamic_slice(jnp.pad(v_n, (0, pad)), (offset,), (c,))

    def spread(v_c: jax.Array | None) -> jax.Array | None:
        if v_c is None or fast == 1:
            return v_c
        return lax.dynamic_update_slice(jnp.zeros((c * fast,), v_c.dtype), v_c, (offset,))[:n]

    if fast > 1:
        grad_c = lax.psum_scatter(jnp.pad(grad_n, (0, pad)), fast_axes, scatter_dimension=0, tiled=True)
    else:
        grad_c = grad_n
    residual_c, velocity_c, estimate_c = own(state_n.residual), own(state_n.velocity), own(state_n.estimate)

    new_moment = None
    if opts.rms:
        grad_c, new_moment = rms_normalize(grad_c / fast, own(state_n.second_moment), opts, v_correction)
        n_replicas //= fast  # what is exchanged is already each fast group's mean
    signal_c = grad_c
    if opts.momentum > 0:
        velocity_c = opts.momentum * velocity_c + grad_c
        signal_c = velocity_c
    if opts.ef21:
        acc_c = signal_c - estimate_c  # what the others do not know yet of this replica's signal
    else:
        acc_c = signal_c if residual_c is None else residual_c + signal_c
    idx_k, val_k = select(acc_c, bucket.sent(ratio), opts.method, key, opts.sample_size)
    mean_c = sparse_sum(idx_k, val_k, c, axes) / n_replicas

    sent_c = jnp.zeros((c,), jnp.bool_).at[idx_k].set(True, mode="drop")
    new_residual = new_estimate = None
    if opts.keeps_residual:
        new_residual = jnp.where(sent_c, 0, acc_c)
    if opts.ef21:
        # Every replica's estimate moves by what it sent, so the mean estimate moves by the mean of what was sent.
        new_estimate = jnp.where(sent_c, signal_c, estimate_c)
        mean_c = own(state_n.mean_estimate) + mean_c
    # DGC momentum factor masking: sent velocity left with the residual, so it must not be sent again.
    new_velocity = jnp.where(sent_c, 0, velocity_c) if opts.momentum > 0 else None
    if fast > 1:
        mean_n = lax.all_gather(mean_c, fast_axes, tiled=True, to="invarying")[:n]
    else:
        mean_n = mean_c
    return BucketResult(mean_n, spread(new_residual), spread(new_velocity), spread(new_estimate), spread(new_moment))


def rms_normalize(
    grad: jax.Array, moment: jax.Array, opts: TopkOptions, v_correction: jax.Array | float
) -> tuple[jax.Array, jax.Array]:
    """(grad / its bias-corrected RMS, the updated moving mean of grad²): RMSprop's step, taken per replica."""
    moment = opts.b2 * moment + (1 - opts.b2) * jnp.square(grad)
    return grad / (jnp.sqrt(moment / v_correction) + opts.eps), moment


def _exchange(
    leaves: list[jax.Array],
    states: BucketState,
    layout: ExchangeLayout,
    ratio: float,
    opts: TopkOptions,
    key: jax.Array,
    axes: AxisNames,
    fast_axes: AxisNames,
    v_correction: jax.Array | float = 1.0,
) -> tuple[list, BucketState]:
    """`states`: per-leaf lists (or None) of each state field."""
    all_axes = (*axes, *fast_axes)
    n_replicas = _axes_size(all_axes)
    out: list = [None] * len(leaves)
    new = BucketState(*(None if s is None else list(s) for s in states))
    for group in layout.dense_groups:
        # Small tensors: a dense sum, inside the fast tier first as the compressed ones are.
        dense = _concat(leaves, group)
        if opts.rms:
            fast = _axes_size(fast_axes) if fast_axes else 1
            group_mean = lax.psum(dense, fast_axes) / fast if fast_axes else dense
            dense, moment = rms_normalize(group_mean, _concat(states.second_moment, group), opts, v_correction)
            # Equal within each fast group, so the mean over every replica is the mean over the groups.
            dense = lax.psum(dense, all_axes) / n_replicas
            _split_into(new.second_moment, moment, group, leaves)
        else:
            dense = lax.psum(lax.psum(dense, fast_axes), axes) if fast_axes else lax.psum(dense, axes)
            dense = dense / n_replicas
        _split_into(out, dense, group, leaves)
    for b, bucket in enumerate(layout.buckets):
        result = compress_bucket(
            _concat(leaves, bucket.leaves),
            BucketState(*(None if s is None else _concat(s, bucket.leaves) for s in states)),
            bucket,
            ratio,
            opts,
            jax.random.fold_in(key, b),
            axes,
            fast_axes,
            n_replicas,
            v_correction,
        )
        _split_into(out, result.mean, bucket.leaves, leaves)
        mean_estimate = result.mean if opts.ef21 else None
        flat = BucketState(result.residual, result.velocity, result.estimate, mean_estimate, result.second_moment)
        for store, value in zip(new, flat, strict=True):
            if store is not None:
                _split_into(store, value, bucket.leaves, leaves)
    return out, new


def layout_for(
    leaf_sizes: Sequence[int], opts: TopkOptions, fast_size: int, shard_axes: Sequence[AxisNames] | None
) -> ExchangeLayout:
    groups = None if shard_axes is None else [frozenset(axes) for axes in shard_axes]
    return plan_layout(leaf_sizes, opts.selection, opts.min_size, fast_size, groups)


def topk_compression(
    ratio: float = 0.05,
    *,
    axes: AxisNames,
    fast_axes: AxisNames = (),
    shard_axes: Sequence[AxisNames] | None = None,
    **options: Any,
) -> optax.GradientTransformation:
    """Top-k compressed mean over the replicas along `axes` (after a dense reduction over `fast_axes`).

    Call `update` inside `jax.shard_map` with `axes` and `fast_axes` manual; gradients and state are one
    replica's. `shard_axes`: per flattened leaf, the other manual axes it is split over (for local clipping).
    `options`: the fields of `TopkOptions`.
    """
    opts = TopkOptions(ratio=ratio, **options)
    axes, fast_axes = tuple(axes), tuple(fast_axes)

    def init(params: Any) -> TopkState:
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return TopkState(
            count=jnp.zeros((), jnp.int32),
            residual=zeros() if opts.keeps_residual else (),
            velocity=zeros() if opts.momentum > 0 else (),
            estimate=zeros() if opts.ef21 else (),
            mean_estimate=zeros() if opts.ef21 else (),
            second_moment=zeros() if opts.rms else (),
        )

    def update(grads: Any, state: TopkState, params: Any = None) -> tuple[Any, TopkState]:
        del params
        leaves, treedef = jax.tree.flatten(grads)
        fast = _axes_size(fast_axes) if fast_axes else 1
        layout = layout_for([x.size for x in leaves], opts, fast, shard_axes)
        per_leaf = shard_axes if shard_axes is not None else [()] * len(leaves)
        if opts.local_clip_norm > 0:
            n_replicas = _axes_size((*axes, *fast_axes))
            leaves = clip_local(leaves, per_leaf, opts.local_clip_norm * math.sqrt(n_replicas))
        if opts.rms and opts.clip_norm > 0:
            leaves = clip_local(leaves, per_leaf, opts.clip_norm)
        kept = opts.kept_fields
        fields = (state.residual, state.velocity, state.estimate, state.mean_estimate, state.second_moment)
        states = BucketState(*(jax.tree.leaves(f) if on else None for on, f in zip(kept, fields, strict=True)))
        key = jax.random.fold_in(jax.random.key(opts.seed), state.count)
        v_correction = 1 - opts.b2 ** (state.count + 1).astype(jnp.float32)
        run = partial(
            _exchange, layout=layout, opts=opts, key=key, axes=axes, fast_axes=fast_axes, v_correction=v_correction
        )
        branches = [partial(run, ratio=r) for r in opts.ratios]
        if len(branches) == 1:
            out, new = branches[0](leaves, states)
        else:
            out, new = lax.switch(opts.stage(state.count), branches, leaves, states)
        tree = lambda flat: treedef.unflatten(flat) if flat is not None else ()  # noqa: E731
        new_state = TopkState(state.count + 1, *(tree(f) for f in new))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init, update)
