"""What restoring a checkpoint costs when only the weights are wanted (serving, export), on the local devices.

    python experiments/benchmarks/bench_restore.py experiments/dense_1b.yaml --override model.n_layers=4

Saves the config's freshly initialised train state (params, AdamW moments filled with random values as a trained
run's would be, step, RNG) as a checkpoint, then
restores it in fresh processes, alternating: the whole train state, and the parameters alone
(`Checkpointer.restore(skip=TRAINING_ONLY)`, what `jaxdeep serve RUN_DIR` does). Each prints the
restore's wall time and the process's peak resident memory; on a CPU the restored arrays live in that memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxdeep.train.checkpoint import TRAINING_ONLY

MODES = {"whole train state": [], "parameters alone": [list(p) for p in TRAINING_ONLY]}


def _setup(config: str, overrides: list[str]):
    from jaxdeep.config import load_config
    from jaxdeep.train.loop import mesh_from_config
    from jaxdeep.train.state import build_setup

    cfg = load_config(config, overrides)
    return build_setup(cfg, mesh_from_config(cfg)[0])


def save(config: str, overrides: list[str], directory: str) -> None:
    import jax
    import jax.numpy as jnp

    from jaxdeep.train.checkpoint import Checkpointer
    from jaxdeep.train.state import init_train_state

    setup = _setup(config, overrides)
    state = init_train_state(setup)

    def trained(opt_state):  # a trained run's moments are not zeros (which compress to almost nothing on disk)
        leaves, tree = jax.tree.flatten(opt_state)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        moved = [
            jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim else x
            for k, x in zip(keys, leaves, strict=True)
        ]
        return jax.tree.unflatten(tree, moved)

    state["opt_state"] = jax.jit(trained, out_shardings=setup.state_shardings["opt_state"])(state["opt_state"])
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(0, state, {})
    ckpt.close()


def restore(config: str, overrides: list[str], directory: str, skip: list[list[str]]) -> dict:
    import jax

    from jaxdeep.train.checkpoint import Checkpointer

    setup = _setup(config, overrides)
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ckpt = Checkpointer(directory, async_save=False)
    start = time.perf_counter()
    state, _ = ckpt.restore(setup.abstract_train_state, skip=[tuple(p) for p in skip])
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    ckpt.close()
    restored = sum(x.nbytes for x in jax.tree.leaves(state))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "restored_gb": restored / 1e9, "peak_rss_mb": peak_mb, "rss_before_mb": before_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--reps", type=int, default=2, help="restores per mode, alternating")
    p.add_argument("--json", help="append one JSON line per restore to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)  # "save DIR" or "restore DIR SKIP_JSON"
    args = p.parse_args()
    if args.child:
        what, directory, *rest = json.loads(args.child)
        if what == "save":
            save(args.config, args.override, directory)
        else:
            print(json.dumps(restore(args.config, args.override, directory, rest[0])))
        return

    def child(*what) -> str:
        cmd = [sys.executable, __file__, args.config, "--child", json.dumps(what)]
        cmd += [f"--override={o}" for o in args.override]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    with tempfile.TemporaryDirectory() as tmp:
        directory = str(Path(tmp) / "checkpoints")
        child("save", directory)
        on_disk = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
        print(f"# {args.config} {' '.join(args.override)}: checkpoint {on_disk / 1e9:.2f} GB on disk")
        print("| restore | seconds | GB restored | peak RSS MB | RSS before MB |\n|---|---|---|---|---|")
        for _ in range(args.reps):
            for mode, skip in MODES.items():
                row = json.loads(child("restore", directory, skip).strip().splitlines()[-1])
                print(f"| {mode} | {row['seconds']:.2f} | {row['restored_gb']:.2f} | {row['peak_rss_mb']:.0f} | "
                      f"{row['rss_before_mb']:.0f} |", flush=True)  # fmt: skip
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps({"config": args.config, "overrides": args.override, "mode": mode, **row}))
                        f.write("\n")


if __name__ == "__main__":
    main()
