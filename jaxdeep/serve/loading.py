"""Build an engine from an experiment YAML, a training run directory, or a Hugging Face DeepSeek directory."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxdeep.config import MESH_AXES, ConfigError, ExperimentConfig, load_config, save_config
from jaxdeep.model import KernelChoice, RoutingBias, build_model
from jaxdeep.serve.api import Tokenizer
from jaxdeep.serve.runner import UNUSED
from jaxdeep.serve.tokenizers import ByteTokens, HFTokens

HF_DEFAULT_CONTEXT = 4096  # default max_context for Hugging Face models (at most their max_position_embeddings)


@dataclass
class LoadedModel:
    cfg: ExperimentConfig
    mesh: jax.sharding.Mesh
    merge: Callable  # (params, model_state) -> nnx model
    params: Any  # pure-dict tree, placed on the mesh
    model_state: Any  # non-trainable model variables (MoE selection biases); {} for the dense model
    tokenizer: Tokenizer
    name: str
    context_limit: int  # the default max_context


def serving_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Training-only options off: collective matmuls split the sequence over `tensor`, which a decode step of
    one token per slot cannot; rematerialisation only matters for a backward pass."""
    cfg.model.collective_matmul = []
    cfg.model.remat = "none"
    return cfg


def _mesh(cfg: ExperimentConfig, devices: Sequence | None):
    import meshes
    from jaxdeep.train.loop import mesh_from_config

    devices = list(meshes.default_devices() if devices is None else devices)
    sizes = [getattr(cfg.mesh, a) for a in MESH_AXES]
    if -1 not in sizes and math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]  # a small layout on a larger host: use the first devices
    if cfg.mesh.topology != "auto" and meshes.load_topology(cfg.mesh.topology).n_devices != len(devices):
        # A training preset describes the whole host; serving on fewer devices orders them by the live topology.
        cfg.mesh.topology = "auto"
    mesh, _ = mesh_from_config(cfg, devices)
    return mesh


def _split_model(cfg: ExperimentConfig):
    abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    if cfg.model.kind == "deepseek":
        graphdef, params, model_state = nnx.split(abstract, nnx.Param, RoutingBias)
    else:
        (graphdef, params), model_state = nnx.split(abstract, nnx.Param), None
    return graphdef, params, model_state


def _merge_fn(graphdef, abstract_params, abstract_model_state) -> Callable:
    def merge(params, model_state):
        state = jax.tree.map(lambda v: v, abstract_params)
        nnx.replace_by_pure_dict(state, params)
        if abstract_model_state is None:
            return nnx.merge(graphdef, state)
        extra = jax.tree.map(lambda v: v, abstract_model_state)
        nnx.replace_by_pure_dict(extra, model_state)
        return nnx.merge(graphdef, state, extra)

    return merge


def _shardings(cfg: ExperimentConfig, mesh, abstract_state):
    from jaxdeep.model import logical_axes_of
    from jaxdeep.sharding import tree_shardings

    if abstract_state is None:
        return {}
    return tree_shardings(logical_axes_of(abstract_state), cfg.sharding.rules, mesh)


def from_config(
    cfg: ExperimentConfig,
    devices: Sequence | None = None,
    name: str | None = None,
    compiler_options: dict | None = None,
) -> LoadedModel:
    """Parameters freshly initialised from `train.seed` (as `jaxdeep train` starts), straight into their layout."""
    cfg = serving_config(cfg)
    mesh = _mesh(cfg, devices)
    graphdef, abstract_params, abstract_model_state = _split_model(cfg)
    shardings = (_shardings(cfg, mesh, abstract_params), _shardings(cfg, mesh, abstract_model_state))

    def init():
        model = build_model(cfg, nnx.Rngs(params=cfg.train.seed))
        params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
        state = nnx.to_pure_dict(nnx.split(model, RoutingBias, ...)[1]) if abstract_model_state is not None else {}
        return params, state

    params, model_state = jax.jit(init, out_shardings=shardings, compiler_options=compiler_options)()
    merge = _merge_fn(graphdef, abstract_params, abstract_model_state)
    return LoadedModel(cfg, mesh, merge, params, model_state, ByteTokens(), name or cfg.name, cfg.data.seq_len)


def from_run_dir(run_dir: Path, overrides: Sequence[str], devices: Sequence | None = None) -> LoadedModel:
    """The latest checkpoint of a `jaxdeep train` run (its config.yaml, then `overrides`, e.g. another mesh)."""
    from jaxdeep.train.checkpoint import TRAINING_ONLY, Checkpointer
    from jaxdeep.train.state import build_setup

    cfg = serving_config(load_config(run_dir / "config.yaml", list(overrides)))
    mesh = _mesh(cfg, devices)
    setup = build_setup(cfg, mesh)
    # Only what serving reads comes off the disk: not the optimizer moments, nor the modules serving never runs.
    abstract = setup.abstract_train_state
    unused = [(tree, k) for k in UNUSED for tree in ("params", "model_state") if k in abstract.get(tree, {})]
    skip = [*TRAINING_ONLY, *unused]
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    try:
        state, _ = ckpt.restore(abstract, skip=skip)
    finally:
        ckpt.close()
    merge = _merge_fn(setup.graphdef, setup.abstract_state, setup.abstract_model_state)
    model_state = state.get("model_state", {})
    name = run_dir.name
    return LoadedModel(cfg, mesh, merge, state["params"], model_state, ByteTokens(), name, cfg.data.seq_len)


def from_hf_dir(hf_dir: Path, overrides: Sequence[str], devices: Sequence | None = None) -> LoadedModel:
    """A Hugging Face DeepSeek directory (config.json + safetensors); `overrides` set the mesh and rules."""
    from jaxdeep import hf
    from jaxdeep.hf.config_map import model_config_from_hf
    from jaxdeep.hf.model import ModelStructure

    hf_config = json.loads((hf_dir / "config.json").read_text())
    base = ExperimentConfig(name=hf_dir.name, model=model_config_from_hf(hf_config))
    with tempfile.TemporaryDirectory() as tmp:
        # Overrides go through the usual typed checks by way of a config file.
        save_config(base, Path(tmp) / "config.yaml")
        cfg = serving_config(load_config(Path(tmp) / "config.yaml", list(overrides)))
    mesh = _mesh(cfg, devices)
    dtype = cfg.model.dtype if any(o.startswith("model.dtype=") for o in overrides) else None
    # Serving never runs the MTP modules (runner.UNUSED): their weights stay unread.
    skip = ["mtp"] if cfg.model.deepseek.num_nextn_predict_layers else []
    model, model_cfg = hf.load(hf_dir, mesh=mesh, rules=cfg.sharding.rules, dtype=dtype, skip=skip)
    cfg.model = serving_config(ExperimentConfig(model=model_cfg)).model
    structure = ModelStructure(cfg.model, mesh, cfg.sharding.rules, KernelChoice.from_config(cfg))
    merge = _merge_fn(structure.graphdef, structure.abstract_params, structure.abstract_model_state)
    if (hf_dir / "tokenizer.json").is_file():
        tokenizer: Tokenizer = HFTokens(hf_dir)
    elif cfg.model.vocab_size == 256:
        tokenizer = ByteTokens()
    else:
        raise FileNotFoundError(f"{hf_dir / 'tokenizer.json'} does not exist; the engine needs the model's tokenizer")
    # The default context stays modest: every slot reserves all of it (DeepSeek-V3 allows 163,840 positions).
    limit = min(int(hf_config.get("max_position_embeddings", HF_DEFAULT_CONTEXT)), HF_DEFAULT_CONTEXT)
    return LoadedModel(cfg, mesh, merge, model.params, model.model_state, tokenizer, hf_dir.name, limit)


def load_model(target: str | Path, overrides: Sequence[str] = (), devices: Sequence | None = None) -> LoadedModel:
    """Read `target`: an experiment YAML, a run directory (config.yaml + checkpoints/), or a HF directory."""
    path = Path(target)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return from_config(load_config(path, list(overrides)), devices)
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return from_run_dir(path, overrides, devices)
    if path.is_dir() and (path / "config.json").is_file():
        return from_hf_dir(path, overrides, devices)
    raise ConfigError(
        f"model: {target} is neither an experiment YAML file, a run directory (config.yaml and checkpoints/) nor a "
        f"Hugging Face directory (config.json and safetensors)"
    )


def load_engine(target: str | Path, overrides: Sequence[str] = (), **engine_options):
    """An engine serving `target` (see `load_model`). Options: num_slots, max_context, prefill_chunk,
    prefill_rows, max_waiting, decode_steps, warm_up (default on here), decode_all_slots, concurrent_kernels,
    model_name, devices (those go to the mesh) — see `InferenceEngine`."""
    from jaxdeep.serve.engine import InferenceEngine

    devices = engine_options.pop("devices", None)
    engine_options.setdefault("warm_up", True)
    loaded = load_model(target, overrides, devices)
    return InferenceEngine.from_loaded(loaded, **engine_options, own_params=True)  # `loaded` ends here
