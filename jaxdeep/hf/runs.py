"""Conversions between Hugging Face DeepSeek directories and jaxdeep run directories.

A run directory holds `config.yaml` and Orbax `checkpoints/`: `import_hf` writes one at step 0 (fresh
optimizer state) so that `jaxdeep train RUN/config.yaml --run-dir RUN` fine-tunes the imported weights;
`export_hf` writes a run's checkpoint back in the Hugging Face format.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxdeep.config import ConfigError, ExperimentConfig, load_config, save_config
from jaxdeep.hf.config_map import model_config_from_hf
from jaxdeep.hf.convert import load, save
from jaxdeep.hf.model import HFModel


def run_config_for_hf(hf_dir: str | Path, run_dir: str | Path, overrides: list[str]) -> ExperimentConfig:
    """The experiment config of an imported checkpoint: its model, defaults elsewhere, then `overrides`.

    Written to RUN/config.yaml (so that the overrides go through the usual checks)."""
    hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
    model = model_config_from_hf(hf_config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(ExperimentConfig(name=run_dir.name, model=model), run_dir / "config.yaml")
    cfg = load_config(run_dir / "config.yaml", overrides)
    save_config(cfg, run_dir / "config.yaml")
    return cfg


def import_hf(hf_dir: str | Path, run_dir: str | Path, cfg: ExperimentConfig, devices=None) -> int:
    """Write the HF checkpoint as step 0 of a run on the config's mesh; returns the parameter count."""
    from jaxdeep.train.checkpoint import Checkpointer
    from jaxdeep.train.loop import make_data, mesh_from_config
    from jaxdeep.train.state import build_setup

    checkpoints = Path(run_dir) / "checkpoints"
    mesh, _ = mesh_from_config(cfg, devices)
    setup = build_setup(cfg, mesh)
    model, _ = load(hf_dir, mesh=mesh, rules=cfg.sharding.rules, dtype=cfg.model.param_dtype)
    params, model_state = model.params, model.model_state
    opt_state = jax.jit(setup.optimizer.init, out_shardings=setup.state_shardings["opt_state"])(params)
    rng = jax.random.key_data(jax.random.key(cfg.train.seed + 1)).astype(jnp.uint32)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state, "rng": rng}
    state["model_state"] = model_state
    state = jax.device_put(state, setup.state_shardings)
    ckpt = Checkpointer(checkpoints, async_save=False)
    try:
        if ckpt.latest_step() is not None:
            raise FileExistsError(f"{checkpoints} already holds checkpoints; convert into an empty run directory")
        ckpt.save(0, state, make_data(cfg).train.state())
    finally:
        ckpt.close()
    return sum(x.size for x in jax.tree.leaves(params))


def export_hf(
    cfg: ExperimentConfig, run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str | None = None
) -> int:
    """Write a run's checkpoint (the latest, or `step`) as a HF directory; returns the step written."""
    from jaxdeep.train.checkpoint import TRAINING_ONLY, Checkpointer
    from jaxdeep.train.loop import mesh_from_config
    from jaxdeep.train.state import build_setup

    if cfg.model.kind != "deepseek":
        raise ConfigError("only model.kind=deepseek runs convert to the Hugging Face DeepSeek format")
    mesh, _ = mesh_from_config(cfg)
    setup = build_setup(cfg, mesh)
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", async_save=False)
    try:
        state, _ = ckpt.restore(setup.abstract_train_state, step, skip=TRAINING_ONLY)
    finally:
        ckpt.close()
    save(HFModel(cfg.model, state["params"], state["model_state"], mesh, cfg.sharding.rules), out_dir, dtype=dtype)
    return int(state["step"])
