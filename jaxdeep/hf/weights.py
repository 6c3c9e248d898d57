"""Our parameter tree <-> Hugging Face DeepSeek tensor names and layouts.

HF linear weights are [out, in]; ours are [in..., out...] with heads split out (e.g. `o_proj` is
[heads, v_head_dim, embed]), so a linear is `ours.reshape(in, out) == W.T`. Routed experts are one tensor
per expert in HF (`mlp.experts.{e}.gate_proj.weight`, ...) and one stacked tensor per layer here
(`gate_up_proj` [E, embed, 2, F]). Decoder layers are HF `model.layers.{i}`: the dense stack first, then
the MoE stack, then the MTP modules (i = num_hidden_layers + k), as in DeepSeek's checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jaxdeep.config import ModelConfig

Unit = np.ndarray  # one layer's (and one expert's) slice of a leaf


@dataclass(frozen=True)
class Leaf:
    """One leaf of our tree and the HF tensors it is made of."""

    path: tuple[str, ...]  # keys in our pure-dict tree
    shape: tuple[int, ...]  # full shape, stacked axes included
    stacked: bool  # leading axis = layers of a stack
    per_expert: bool  # next axis = routed experts (one HF tensor set per expert)
    hf_names: Callable[[int | None, int | None], list[str]]  # (layer, expert) -> HF names
    to_ours: Callable[[list[np.ndarray]], Unit]  # HF tensors (in `hf_names` order) -> our unit
    to_hf: Callable[[Unit], list[np.ndarray]]  # our unit -> HF tensors
    layout: str  # "identity" or "transpose" (a slice of ours is a slice of the one HF tensor), else "other"

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return self.shape[int(self.stacked) + int(self.per_expert) :]


def hf_layer_index(cfg: ModelConfig, stack: str, layer: int) -> int:
    first_k = cfg.deepseek.first_k_dense_replace
    return {"dense_blocks": layer, "moe_blocks": first_k + layer, "mtp": cfg.n_layers + layer}[stack]


def _identity() -> tuple[Callable, Callable, str]:
    return (lambda ts: ts[0]), (lambda u: [u]), "identity"


def _linear(unit_shape: tuple[int, ...], in_dims: int) -> tuple[Callable, Callable, str]:
    n_in = math.prod(unit_shape[:in_dims])
    layout = "transpose" if len(unit_shape) == 2 and in_dims == 1 else "other"
    to_ours = lambda ts: ts[0].T.reshape(unit_shape)
    return to_ours, (lambda u: [np.ascontiguousarray(u.reshape(n_in, -1).T)]), layout


def _gate_up() -> tuple[Callable, Callable, str]:
    # ours [embed, 2, F] <- gate_proj [F, embed], up_proj [F, embed]
    to_ours = lambda ts: np.stack([ts[0].T, ts[1].T], axis=1)
    to_hf = lambda u: [np.ascontiguousarray(u[:, 0].T), np.ascontiguousarray(u[:, 1].T)]
    return to_ours, to_hf, "other"


def _block_leaf(cfg: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...]) -> Leaf:
    stack, rest = path[0], path[1:]
    if stack == "mtp":
        if rest[0] == "block":
            rest = rest[1:]
        elif rest == ("norm", "scale"):
            rest = ("shared_head", "norm", "scale")
    per_expert = rest[:2] == ("mlp", "experts")
    unit_shape = shape[1 + int(per_expert) :]
    if rest[-1] == "scale":
        suffixes, convert = [".".join(rest[:-1]) + ".weight"], _identity()
    elif rest[-1] == "e_score_correction_bias":
        suffixes, convert = [".".join(rest)], _identity()
    elif per_expert and rest[-1] == "gate_up_proj":
        suffixes, convert = ["mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"], _gate_up()
    elif per_expert:
        suffixes, convert = ["mlp.experts.{e}." + rest[-1] + ".weight"], _linear(unit_shape, 1)
    else:
        name = ".".join(rest) + ("" if rest[-1] == "weight" else ".weight")
        suffixes, convert = [name], _linear(unit_shape, 2 if rest[-1] == "o_proj" else 1)

    def hf_names(layer: int | None, expert: int | None) -> list[str]:
        prefix = f"model.layers.{hf_layer_index(cfg, stack, layer)}."
        return [prefix + s.format(e=expert) for s in suffixes]

    return Leaf(path, shape, True, per_expert, hf_names, *convert)


def hf_leaves(cfg: ModelConfig, shapes: dict) -> list[Leaf]:
    """Leaves of our (params and model-state) tree of shapes, each with its HF mapping."""
    leaves = []
    for path, shape in _flatten(shapes):
        if path == ("embed",):
            leaves.append(Leaf(path, shape, False, False, lambda *_: ["model.embed_tokens.weight"], *_identity()))
        elif path == ("head",):
            leaves.append(Leaf(path, shape, False, False, lambda *_: ["lm_head.weight"], *_linear(shape, 1)))
        elif path == ("final_norm", "scale"):
            leaves.append(Leaf(path, shape, False, False, lambda *_: ["model.norm.weight"], *_identity()))
        elif path[0] in ("dense_blocks", "moe_blocks", "mtp"):
            leaves.append(_block_leaf(cfg, path, shape))
        else:
            raise ValueError(f"no Hugging Face name for parameter {'.'.join(path)}")
    return leaves


def mtp_shared_names(cfg: ModelConfig) -> list[str]:
    """MTP layers' copies of the embedding and output head: in DeepSeek checkpoints, unused here."""
    names = []
    for k in range(cfg.deepseek.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.n_layers + k}."
        names += [prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"]
    return names


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _flatten(value, (*prefix, key))
        else:
            out.append(((*prefix, key), tuple(value.shape)))
    return out
