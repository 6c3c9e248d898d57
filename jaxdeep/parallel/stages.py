"""Cutting the layer stack into pipeline stages, and moving stacked parameters between the model's layout
([layers, ...], the layout checkpoints use) and the pipeline's ([devices, virtual stages, slots, ...]).

Virtual stage k (of p·v) holds a contiguous run of layers and lives on device k mod p. Stages may hold different
numbers of layers (set by hand, or balanced so the slowest stage is as fast as possible: the last stage also runs
the output head and the loss, which may be worth a layer or more); every stage's stack is padded to the longest
and the padding slots are skipped at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np

from jaxdeep.config import ModelConfig


@dataclass(frozen=True)
class StagePlan:
    n_devices: int  # p
    n_virtual: int  # v
    layers: tuple[int, ...]  # layers per virtual stage, in pipeline order (p·v entries)

    @property
    def n_layers(self) -> int:
        return sum(self.layers)

    @property
    def slots(self) -> int:
        """Layer slots of every stage's stack (the longest stage)."""
        return max(self.layers)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.cumsum((0, *self.layers[:-1])))

    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """(model layer of each slot [p, v, slots], whether the slot holds a layer [p, v, slots]);
        padding slots point at layer 0."""
        p, v, slots = self.n_devices, self.n_virtual, self.slots
        index = np.zeros((p, v, slots), np.int32)
        valid = np.zeros((p, v, slots), bool)
        for k, (start, n) in enumerate(zip(self.starts, self.layers, strict=True)):
            index[k % p, k // p, :n] = np.arange(start, start + n)
            valid[k % p, k // p, :n] = True
        return index, valid

    @property
    def is_contiguous(self) -> bool:
        """Device d holds exactly layers [d·L/p, (d+1)·L/p): the model's layout split evenly over the devices,
        so moving between the layouts is a reshape with no communication."""
        return self.n_virtual == 1 and len(set(self.layers)) == 1


def balance_layers(layer_cost: Sequence[float], n_stages: int, last_extra: float = 0.0) -> tuple[int, ...]:
    """Contiguous split of the layers into `n_stages` non-empty runs minimising the most expensive run, where
    the last run also pays `last_extra` (the head and loss). Ties prefer putting layers early."""
    costs = [float(c) for c in layer_cost]
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} layers into {n_stages} non-empty stages")
    prefix = np.concatenate([[0.0], np.cumsum(costs)])

    @cache
    def best(first: int, stages: int) -> tuple[float, tuple[int, ...]]:
        # Layers [first, n) into `stages` runs.
        if stages == 1:
            return prefix[n] - prefix[first] + last_extra, (n - first,)
        options = []
        for end in range(first + 1, n - stages + 2):
            rest_cost, rest = best(end, stages - 1)
            options.append((max(prefix[end] - prefix[first], rest_cost), (-(end - first)), (end - first, *rest)))
        cost, _, split = min(options)
        return cost, split

    return best(0, n_stages)[1]


def dense_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float]:
    """Training FLOPs per token of each block and of the head (the same formula as `flops_per_token`)."""
    d, f, nh = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim
    block = 6.0 * (4 * d * nh + 2 * d * f) + 12.0 * nh * seq_len
    return [block] * cfg.n_layers, 6.0 * d * cfg.vocab_size


def plan_stages(
    cfg: ModelConfig,
    seq_len: int,
    n_devices: int,
    n_virtual: int,
    stage_layers: Sequence[int] = (),
    head_on_last: bool = True,
) -> StagePlan:
    """Layers per virtual stage: `stage_layers` as given, or balanced by the cost estimate. `head_on_last`: only
    the last stage pays for the head (False when every stage computes it and drops it, see `Pipeline`)."""
    if stage_layers:
        return StagePlan(n_devices, n_virtual, tuple(stage_layers))
    costs, head = dense_costs(cfg, seq_len)
    return StagePlan(n_devices, n_virtual, balance_layers(costs, n_devices * n_virtual, head if head_on_last else 0))


# ----------------------------------------------------------------------------- moving between layouts


def to_stage_layout(blocks, plan: StagePlan):
    """Stacked block parameters [layers, ...] -> [p, v, slots, ...] (padding slots hold a copy of layer 0)."""
    p, v, slots = plan.n_devices, plan.n_virtual, plan.slots
    if plan.is_contiguous:
        return jax.tree.map(lambda a: a.reshape(p, v, slots, *a.shape[1:]), blocks)
    index, _ = plan.index()
    return jax.tree.map(lambda a: jnp.take(a, index.reshape(-1), axis=0).reshape(p, v, slots, *a.shape[1:]), blocks)


def from_stage_layout(stage_tree, plan: StagePlan):
    """[p, v, slots, ...] -> [layers, ...], summing what several slots hold for one layer (padding slots carry
    zero gradients, so for gradients this is exact)."""
    if plan.is_contiguous:
        return jax.tree.map(lambda a: a.reshape(plan.n_layers, *a.shape[3:]), stage_tree)
    index, _ = plan.index()
    flat = index.reshape(-1)

    def scatter(a):
        rows = a.reshape(flat.size, *a.shape[3:])
        return jnp.zeros((plan.n_layers, *a.shape[3:]), a.dtype).at[flat].add(rows)

    return jax.tree.map(scatter, stage_tree)
