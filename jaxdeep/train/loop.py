"""The training run: config -> mesh -> data -> sharded state -> jitted steps -> metrics and checkpoints."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

import meshes
from jaxdeep.config import MESH_AXES, ConfigError, ExperimentConfig, check_splits, save_config
from jaxdeep.data import TokenBatches, load_tokens, split_train_eval, to_global_array
from jaxdeep.model import flops_per_token
from jaxdeep.train.checkpoint import TRAINING_ONLY, Checkpointer
from jaxdeep.train.metrics import MetricsWriter, device_peak_flops, peak_memory_bytes, plot_loss_curve
from jaxdeep.train.optimizer import learning_rate_schedule
from jaxdeep.train.state import ModelSetup, TrainState, build_setup, init_train_state
from jaxdeep.train.step import batch_sharding, make_eval_step, make_train_step

log = logging.getLogger("jaxdeep")


def mesh_from_config(cfg: ExperimentConfig, devices=None) -> tuple[Mesh, meshes.Topology | None]:
    """Build the named mesh the config asks for, checking every split dimension against it."""
    devices = meshes.default_devices() if devices is None else list(devices)
    sizes = {axis: getattr(cfg.mesh, axis) for axis in MESH_AXES}
    resolved = meshes.resolve_axis_sizes(sizes, len(devices))
    check_splits(cfg, resolved)
    topology = meshes.Topology.auto(devices) if cfg.mesh.topology == "auto" else meshes.load_topology(cfg.mesh.topology)
    return meshes.build_mesh(resolved, topology, devices), topology


@dataclass
class RunData:
    train: TokenBatches
    eval: TokenBatches


def make_data(cfg: ExperimentConfig) -> RunData:
    d = cfg.data
    tokens = load_tokens(d.source, d.max_bytes, cfg.model.vocab_size)
    train_tokens, eval_tokens = split_train_eval(tokens, d.eval_fraction)
    need = d.seq_len + 1
    for name, part in (("training", train_tokens), ("evaluation", eval_tokens)):
        if len(part) < need * 2:
            raise ConfigError(
                f"data: the {name} split has {len(part)} tokens, too few for sequences of data.seq_len={d.seq_len}; "
                f"raise data.max_bytes or data.eval_fraction, or lower data.seq_len"
            )
    train = TokenBatches(train_tokens, d.seq_len, d.global_batch_size, seed=d.seed, name="train")
    # Evaluation always reads the same batches, so eval losses are comparable across steps and runs.
    evaluation = TokenBatches(eval_tokens, d.seq_len, d.global_batch_size, seed=d.seed, shuffle=False, name="eval")
    return RunData(train, evaluation)


def evaluate(setup: ModelSetup, eval_step, params, data: TokenBatches, n_batches: int, model_state=None) -> float:
    sharding = batch_sharding(setup)
    extra = () if model_state is None else (model_state,)  # MoE models' selection biases
    losses = [eval_step(params, to_global_array(data.batch_at(i), sharding), *extra) for i in range(n_batches)]
    return float(np.mean(jax.device_get(losses)))


@dataclass
class RunResult:
    run_dir: Path
    state: TrainState
    first_loss: float | None
    last_loss: float | None
    eval_loss: float | None
    resumed_from: int | None


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled or jax.process_index() != 0, unit="step")


def train(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    resume: bool | None = None,
    stop_after: int | None = None,
    devices=None,
) -> RunResult:
    """Train `cfg` in `run_dir`.

    resume: None resumes when the run directory has a checkpoint; True requires one; False refuses to
    overwrite one. stop_after ends the run early at that step (as a crash would, but with a checkpoint).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh, topology = mesh_from_config(cfg, devices)
    setup = build_setup(cfg, mesh, topology)
    if setup.compression is not None:
        log.info("gradient compression %s: %s", cfg.optim.compression, setup.compression.plan.describe())
    data = make_data(cfg)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoint)
    latest = ckpt.latest_step()
    if resume is True and latest is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    if resume is False and latest is not None:
        raise FileExistsError(
            f"{run_dir} already holds a checkpoint (step {latest}); resume it or pick another run dir"
        )
    if latest is not None:
        state, data_state = ckpt.restore(setup.abstract_train_state)
        data.train.restore(data_state)
        log.info("resumed from step %d in %s", latest, ckpt.directory)
    else:
        state = init_train_state(setup)
    if is_main:
        save_config(cfg, run_dir / "config.yaml")

    train_step, eval_step = make_train_step(setup), make_eval_step(setup)
    sharding = batch_sharding(setup)
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    flops_per_step = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    peak = device_peak_flops(mesh.devices.flat[0].device_kind, cfg.train.peak_tflops)
    peak_total = peak * mesh.devices.size if peak else None
    writer = MetricsWriter(run_dir / "metrics.jsonl") if is_main else None
    local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]

    step = int(state["step"])
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, stop_after)
    first_loss = last_loss = eval_loss = None
    bar = _progress(cfg.train.steps, step, cfg.train.progress)
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < end:
            batch = to_global_array(next(data.train), sharding)
            state, metrics = train_step(state, batch)
            step += 1
            window_steps += 1
            if step % cfg.train.log_every == 0 or step == end:
                loss = float(metrics["loss"])  # waits for the step: timings below cover finished work
                elapsed = time.perf_counter() - window_start
                step_time = elapsed / window_steps
                record: dict[str, Any] = {
                    "step": step,
                    "loss": loss,
                    "grad_norm": float(metrics["grad_norm"]),
                    "lr": float(schedule(step - 1)),
                    "step_time_s": step_time,
                    "tokens_per_s": tokens_per_step / step_time,
                }
                if peak_total:
                    record["mfu"] = flops_per_step / step_time / peak_total
                peak_bytes = peak_memory_bytes(local_devices)
                if peak_bytes is not None:  # allocator peak since the start, largest over this host's devices
                    record["peak_memory_gib"] = peak_bytes / 2**30
                # Compressed runs: bytes each device sent per tier, the dense equivalent and the ratio.
                record.update({k: float(v) for k, v in metrics.items() if k.startswith("comm_")})
                # MoE models: MTP and balance losses, expert load (max/mean), dropped copies, selection-bias range.
                record.update({k: float(v) for k, v in metrics.items() if k.startswith(("moe_", "mtp_", "total_"))})
                if first_loss is None:
                    first_loss = loss
                last_loss = loss
                if not np.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}; lower optim.lr or check the data")
                if writer:
                    writer.write(record)
                bar.set_postfix(
                    loss=f"{loss:.3f}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                    step_ms=f"{1e3 * step_time:.0f}",
                    **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}),
                )
                window_start, window_steps = time.perf_counter(), 0
            bar.update(1)
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps:
                eval_loss = evaluate(
                    setup, eval_step, state["params"], data.eval, cfg.train.eval_batches, state.get("model_state")
                )
                if writer:
                    writer.write({"step": step, "eval_loss": eval_loss})
                bar.write(f"step {step}: eval loss {eval_loss:.4f}")
                window_start, window_steps = time.perf_counter(), 0
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < end:
                ckpt.save(step, state, data.train.state())
        if ckpt.latest_step() != step:
            ckpt.save(step, state, data.train.state())
    except KeyboardInterrupt:
        # Nothing lost: keep what was trained so far, then stop.
        if ckpt.latest_step() != step:
            ckpt.save(step, state, data.train.state())
        raise
    finally:
        bar.close()
        ckpt.close()
        if writer:
            writer.close()
    if is_main and last_loss is not None:  # a run resumed at its last step trained nothing: keep its summary
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
        summary = {"step": step, "first_loss": first_loss, "last_loss": last_loss, "eval_loss": eval_loss}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return RunResult(run_dir, state, first_loss, last_loss, eval_loss, latest)


def evaluate_checkpoint(cfg: ExperimentConfig, run_dir: str | Path, n_batches: int | None = None, step=None) -> dict:
    """Held-out loss of a run's checkpoint (the latest unless `step` is given), on the config's mesh."""
    mesh, _ = mesh_from_config(cfg)
    setup = build_setup(cfg, mesh)
    data = make_data(cfg)
    ckpt = Checkpointer(Path(run_dir) / "checkpoints", async_save=False)
    try:
        state, _ = ckpt.restore(setup.abstract_train_state, step, skip=TRAINING_ONLY)
    finally:
        ckpt.close()
    n = n_batches or cfg.train.eval_batches
    loss = evaluate(setup, make_eval_step(setup), state["params"], data.eval, n, state.get("model_state"))
    return {
        "step": int(state["step"]),
        "eval_loss": loss,
        "eval_batches": n,
        "perplexity": float(np.exp(loss)),
    }
