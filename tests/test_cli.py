"""The `jaxdeep` command line, end to end in subprocesses: train, resume, eval, mesh and bad input.

Each subprocess pays for starting jax and compiling, so one module-level training run is shared and the
tests that change a run directory work on copies of it.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxdeep.config import load_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 2

CONFIG = f"""\
name: cli_test
mesh:
  data: 2
  fsdp: 2
  tensor: 2
  topology: cpu_host
  cpu_devices: 8
model:
  d_model: 32
  n_layers: 2
  n_heads: 4
  head_dim: 8
  d_ff: 64
  dtype: float32
data:
  max_bytes: 200000
  seq_len: 16
  global_batch_size: 8
optim:
  warmup_steps: 1
train:
  steps: {STEPS}
  log_every: 1
  eval_every: 0
  eval_batches: 1
  checkpoint_every: 0
  progress: false
"""


class Cli:
    def __init__(self, root: Path):
        self.root = root
        self.config = root / "cli_test.yaml"
        self.config.write_text(CONFIG)
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI sets the device count itself
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        # Later runs reuse what earlier ones compiled (eval step, small helpers): same programs, less waiting.
        env["JAX_COMPILATION_CACHE_DIR"] = str(root / "jax_cache")
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
        self.env = env

    def __call__(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "jaxdeep.cli", *map(str, args)],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-3000:]}"
    )
    return result


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Cli:
    return Cli(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def trained(cli) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = cli.root / "run"
    return run_dir, cli("train", cli.config, "--run-dir", run_dir)


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run_copy"
    shutil.copytree(run_dir, copy)
    return copy


# ----------------------------------------------------------------------------- train, resume, eval


def test_train_writes_the_run_directory(cli, trained):
    run_dir, result = trained
    _ok(result)
    assert f"done: step {STEPS}" in result.stdout

    assert load_config(run_dir / "config.yaml") == load_config(cli.config)

    records = _metrics(run_dir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    for r in train_records:
        assert {"step", "loss", "lr", "tokens_per_s"} <= set(r), r
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [STEPS] and math.isfinite(evals[0]["eval_loss"])

    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = _summary(run_dir)
    assert summary["step"] == STEPS
    assert summary["last_loss"] == train_records[-1]["loss"]
    assert summary["eval_loss"] == evals[0]["eval_loss"]
    assert _checkpoint_steps(run_dir) == [STEPS]


def test_eval_prints_the_checkpoint_loss(cli, trained):
    run_dir, result = trained
    _ok(result)
    out = json.loads(_ok(cli("eval", run_dir)).stdout.strip().splitlines()[-1])
    assert out["step"] == STEPS and out["eval_batches"] == 1
    # The same held-out batch as the run's final evaluation, on the same parameters.
    assert out["eval_loss"] == pytest.approx(_summary(run_dir)["eval_loss"], rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(out["eval_loss"]), rel=1e-6)


def test_compilation_cache_flag_stores_programs_that_a_later_run_loads(cli, trained, tmp_path):
    run_dir, result = trained
    _ok(result)
    cache = tmp_path / "xla_cache"
    env = {**cli.env, "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}  # logs each persistent-cache hit and miss
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(name)  # the flag alone: its directory, and every program stored however fast it compiles
    cli.env, saved = env, cli.env
    try:
        first = _ok(cli("eval", run_dir, "--compilation-cache", cache))
        stored = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
        second = _ok(cli("eval", run_dir, "--compilation-cache", cache))
    finally:
        cli.env = saved
    assert stored, "the first run stored no compiled program in the --compilation-cache directory"
    assert "Persistent compilation cache hit" not in first.stderr
    assert "Persistent compilation cache hit" in second.stderr
    # Nothing was compiled again, and both runs give the same loss.
    assert "PERSISTENT COMPILATION CACHE MISS" in first.stderr
    assert "PERSISTENT COMPILATION CACHE MISS" not in second.stderr
    assert json.loads(first.stdout.splitlines()[-1]) == json.loads(second.stdout.splitlines()[-1])


def test_train_again_continues_when_steps_are_raised(cli, trained, tmp_path):
    run_dir, result = trained
    _ok(result)
    copy = _copy(run_dir, tmp_path)
    result = _ok(cli("train", cli.config, "--run-dir", copy, f"train.steps={STEPS + 1}"))
    assert f"resumed from step {STEPS}" in result.stderr
    assert _summary(copy)["step"] == STEPS + 1
    steps = [r["step"] for r in _metrics(copy) if "loss" in r]
    assert steps == [*range(1, STEPS + 1), STEPS + 1]  # the earlier lines kept, one new step appended
    assert _checkpoint_steps(copy)[-1] == STEPS + 1
    assert load_config(copy / "config.yaml").train.steps == STEPS + 1


def test_train_again_when_finished_changes_nothing(cli, trained, tmp_path):
    run_dir, result = trained
    _ok(result)
    copy = _copy(run_dir, tmp_path)
    before = _metrics(copy)
    _ok(cli("train", cli.config, "--run-dir", copy))
    assert _summary(copy)["step"] == STEPS
    assert [r for r in _metrics(copy) if "loss" in r] == [r for r in before if "loss" in r]


def test_fresh_refuses_a_run_dir_with_a_checkpoint(cli, trained):
    run_dir, result = trained
    _ok(result)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    result = cli("train", cli.config, "--run-dir", run_dir, "--fresh")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"already holds a checkpoint (step {STEPS})" in result.stderr
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    assert _checkpoint_steps(run_dir) == [STEPS]


# ----------------------------------------------------------------------------- mesh and bad input


def test_mesh_prints_every_axis_and_its_tier(cli):
    out = _ok(cli("mesh", cli.config)).stdout
    assert "mesh: 8 devices" in out and "topology 'cpu_host'" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()}
    for axis, size in {"data": 2, "pipeline": 1, "fsdp": 2, "expert": 1, "tensor": 2}.items():
        assert axis in rows, f"axis {axis} missing from:\n{out}"
        assert rows[axis][1] == str(size)
        assert rows[axis][3] == ("host" if size > 1 else "-"), rows[axis]
    device_rows = [line for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(device_rows) == 8


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.n_layer=3", "unknown key model.n_layer"),
        ("train.steps=abc", "train.steps: expected an integer"),
    ],
)
def test_bad_override_exits_2_naming_the_key(cli, override, expected):
    result = cli("train", cli.config, override)
    assert result.returncode == 2
    assert "config error" in result.stderr and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (cli.root / "runs").exists()  # nothing written


def test_mesh_that_does_not_fit_the_devices_exits_2(cli):
    result = cli("mesh", cli.config, "mesh.data=3", "data.global_batch_size=12")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "data=3" in result.stderr and "8 available devices" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
