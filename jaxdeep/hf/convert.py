"""load: HF directory -> sharded HFModel; save: HFModel -> HF directory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxdeep.config import ConfigError, ModelConfig, default_rules
from jaxdeep.hf.config_map import hf_config_from_model, model_config_from_hf
from jaxdeep.hf.files import ShardedWriter, TensorReader
from jaxdeep.hf.model import HFModel, ModelStructure, single_device_mesh
from jaxdeep.hf.weights import Leaf, hf_leaves, mtp_shared_names
from jaxdeep.sharding import Rules

DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}
TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16"}


def _ranges(index: tuple[slice, ...], shape: tuple[int, ...]) -> list[range]:
    return [range(*s.indices(n)) for s, n in zip(index, shape, strict=True)]


def _read_unit(leaf: Leaf, reader: TensorReader, layer, expert, rest: tuple[slice, ...]) -> np.ndarray:
    names = leaf.hf_names(layer, expert)
    if leaf.layout == "identity":
        return reader.get(names[0], rest)
    if leaf.layout == "transpose":
        return reader.get(names[0], (rest[1], rest[0])).T
    unit = leaf.to_ours([reader.get(name) for name in names])
    return unit[rest]


def _read_block(leaf: Leaf, reader: TensorReader, index: tuple[slice, ...]) -> np.ndarray:
    """Our leaf's block at `index`, read from the HF tensors it overlaps (and only those)."""
    ranges = _ranges(index, leaf.shape)
    n_outer = int(leaf.stacked) + int(leaf.per_expert)
    rest = tuple(slice(r.start, r.stop, r.step) for r in ranges[n_outer:])
    if not leaf.stacked:
        return _read_unit(leaf, reader, None, None, rest)
    layers = []
    for layer in ranges[0]:
        if leaf.per_expert:
            layers.append(np.stack([_read_unit(leaf, reader, layer, e, rest) for e in ranges[1]]))
        else:
            layers.append(_read_unit(leaf, reader, layer, None, rest))
    return np.stack(layers)


def _units(leaf: Leaf):
    """(layer, expert) of every unit of a leaf."""
    layers = range(leaf.shape[0]) if leaf.stacked else [None]
    experts = range(leaf.shape[1]) if leaf.per_expert else [None]
    return [(layer, expert) for layer in layers for expert in experts]


def _check_tensors(leaves: list[Leaf], reader: TensorReader, optional: set[str]) -> None:
    expected: dict[str, tuple[int, ...]] = {}
    for leaf in leaves:
        hf_shapes = [t.shape for t in leaf.to_hf(np.zeros(leaf.unit_shape, np.float32))]
        for layer, expert in _units(leaf):
            expected.update(zip(leaf.hf_names(layer, expert), hf_shapes, strict=True))
    present = reader.names()
    missing = sorted(set(expected) - present)
    if missing:
        raise ConfigError(f"checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing) that config.json implies")
    unexpected = sorted(present - set(expected) - optional)
    if unexpected:
        raise ConfigError(
            f"checkpoint tensor {unexpected[0]!r} ({len(unexpected)} unexpected) has no place in the model: "
            "a config field we do not support may be missing from config.json"
        )
    for name, shape in expected.items():
        if reader.shape(name) != shape:
            raise ConfigError(f"checkpoint tensor {name!r} has shape {reader.shape(name)}, config.json implies {shape}")


def _place(leaves: list[Leaf], shardings: dict, reader: TensorReader, dtype) -> dict:
    tree: dict = {}
    for leaf in leaves:
        sharding = shardings
        for key in leaf.path:
            sharding = sharding[key]
        blocks: dict = {}  # replicated shards of one leaf are read once

        def block(index, leaf=leaf, blocks=blocks):
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in blocks:
                blocks[key] = _read_block(leaf, reader, index).astype(dtype)
            return blocks[key]

        node = tree
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        node[leaf.path[-1]] = jax.make_array_from_callback(leaf.shape, sharding, block)
    return tree


def load(
    path: str | Path,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    dtype: str | None = None,
    skip: Sequence[str] = (),
) -> tuple[HFModel, ModelConfig]:
    """Read a DeepSeek-V3 (or V2) format directory; returns (model, our ModelConfig).

    dtype: parameter and compute dtype ("float32" or "bfloat16"); default: the checkpoint's dtype.
    skip: top-level groups left unread (e.g. "mtp" to serve, which never runs the MTP modules): the model then has
    neither their weights nor their routing biases, and its forward cannot run them.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist")
    hf_cfg = json.loads(config_file.read_text())
    cfg = model_config_from_hf(hf_cfg)
    if dtype is None:
        dtype = "bfloat16" if hf_cfg.get("torch_dtype", hf_cfg.get("dtype")) == "bfloat16" else "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg.dtype = cfg.param_dtype = dtype
    mesh = mesh or single_device_mesh()
    structure = ModelStructure(cfg, mesh, rules or default_rules())
    param_shapes, state_shapes = structure.shapes()
    param_leaves, state_leaves = hf_leaves(cfg, param_shapes), hf_leaves(cfg, state_shapes)
    if unknown := set(skip) - set(param_shapes):
        raise ValueError(f"skip: no parameter group {sorted(unknown)}; the model has {sorted(param_shapes)}")
    reader = TensorReader(path)
    try:
        _check_tensors(param_leaves + state_leaves, reader, set(mtp_shared_names(cfg)))
        param_leaves = [leaf for leaf in param_leaves if leaf.path[0] not in skip]
        state_leaves = [leaf for leaf in state_leaves if leaf.path[0] not in skip]
        params = _place(param_leaves, structure.param_shardings, reader, DTYPES[dtype])
        # The selection bias stays float32 whatever the parameter dtype (as in the reference).
        model_state = _place(state_leaves, structure.model_state_shardings, reader, np.float32)
    finally:
        reader.close()
    return HFModel(cfg, params, model_state, mesh, structure.rules), cfg


def _host_value(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def save(model: HFModel, path: str | Path, dtype: str | None = None, max_shard_bytes: int = 4 << 30) -> None:
    """Write `model` as config.json + safetensors (sharded above `max_shard_bytes`) in DeepSeek's layout.

    Tensors are fetched one HF tensor at a time, so the host holds at most one file's worth. Every process
    must call this; process 0 writes.
    """
    cfg = model.config
    dtype = dtype or cfg.param_dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dtype = DTYPES[dtype]
    writes = jax.process_index() == 0
    param_shapes, state_shapes = model.structure.shapes()
    writer = ShardedWriter(path, max_shard_bytes) if writes else None
    for tree, leaves, leaf_dtype in (
        (model.params, hf_leaves(cfg, param_shapes), out_dtype),
        (model.model_state, hf_leaves(cfg, state_shapes), np.float32),
    ):
        for leaf in leaves:
            array = _get(tree, leaf.path)
            for layer, expert in _units(leaf):
                index = tuple(i for i in (layer, expert) if i is not None)
                unit = _host_value(array[index] if index else array)
                if writes:
                    for name, tensor in zip(leaf.hf_names(layer, expert), leaf.to_hf(unit), strict=True):
                        writer.add(name, tensor.astype(leaf_dtype))
    if writes:
        # DeepSeek checkpoints repeat the embedding and output head inside each MTP layer.
        names = mtp_shared_names(cfg)
        if names:
            embed = _host_value(model.params["embed"]).astype(out_dtype)
            head = embed if cfg.tie_embeddings else _host_value(model.params["head"]).T.astype(out_dtype)
            for embed_name, head_name in zip(names[0::2], names[1::2], strict=True):
                writer.add(embed_name, embed)
                writer.add(head_name, np.ascontiguousarray(head))
        writer.close()
        hf_cfg = hf_config_from_model(cfg, TORCH_DTYPE_NAMES[dtype])
        (Path(path) / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxdeep.hf.save")


__all__ = ["load", "save", "single_device_mesh"]
