"""Does compressed training converge like dense training? Same config, seed, data order and steps; only the
gradient reduction changes.

    python experiments/benchmarks/bench_compression_convergence.py experiments/quickstart.yaml \\
        --out experiments/benchmarks/compression_convergence_quickstart.jsonl

Runs dense first, then each variant (default: top-k at 5%, 1% and 0.1%, each with and without error feedback),
and prints one JSON line per run and a Markdown table: final training loss (mean of the last `--window` logged
steps, to smooth single-batch noise), held-out loss at the end, and their gaps to dense.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_VARIANTS = [
    "topk_0.05=optim.compression=topk,optim.topk.ratio=0.05",
    "topk_0.05_no_ef=optim.compression=topk,optim.topk.ratio=0.05,optim.topk.error_feedback=false",
    "topk_0.01=optim.compression=topk,optim.topk.ratio=0.01",
    "topk_0.01_no_ef=optim.compression=topk,optim.topk.ratio=0.01,optim.topk.error_feedback=false",
    "topk_0.001=optim.compression=topk,optim.topk.ratio=0.001",
    "topk_0.001_no_ef=optim.compression=topk,optim.topk.ratio=0.001,optim.topk.error_feedback=false",
]


def run_one(config: str, name: str, overrides: list[str], window: int, workdir: Path) -> dict:
    from jaxdeep.config import load_config
    from jaxdeep.train.loop import train
    from jaxdeep.train.metrics import read_metrics

    cfg = load_config(config, [*overrides, "train.progress=false", "train.checkpoint_every=0"])
    run_dir = workdir / name
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    result = train(cfg, run_dir, resume=False)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    comm = {k: v for k, v in records[-1].items() if k.startswith("comm_")}
    return {
        "variant": name,
        "overrides": overrides,
        "steps": cfg.train.steps,
        "final_loss": float(np.mean([r["loss"] for r in records[-window:]])),
        "last_loss": result.last_loss,
        "eval_loss": result.eval_loss,
        "wall_s": time.perf_counter() - start,
        **comm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    parser.add_argument("--variant", action="append", default=[], help="NAME=override[,override...]")
    parser.add_argument("--override", action="append", default=[], help="section.key=value for every run")
    parser.add_argument("--window", type=int, default=5, help="final loss = mean of the last N logged losses")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--skip-dense", action="store_true", help="compare against the dense line already in --out")
    args = parser.parse_args()

    from jaxdeep.config import load_config  # no jax yet: devices are set up first, as the CLI does

    cfg = load_config(args.config, args.override)
    if cfg.mesh.cpu_devices:
        os.environ["XLA_FLAGS"] = " ".join(
            [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={cfg.mesh.cpu_devices}"]
        ).strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    variants = [("dense", [])] if not args.skip_dense else []
    for text in args.variant or DEFAULT_VARIANTS:
        name, _, overrides = text.partition("=")
        variants.append((name, [o for o in overrides.split(",") if o]))
    rows = []
    if args.skip_dense and args.out and Path(args.out).exists():
        rows += [json.loads(line) for line in Path(args.out).read_text().splitlines() if '"dense"' in line][-1:]
    if args.skip_dense and not rows:  # say so now, not after hours of training when the table needs it
        parser.error(f"--skip-dense compares against the dense line of --out, and {args.out} has none")
    with tempfile.TemporaryDirectory(prefix="jaxdeep_conv_") as tmp:
        for name, overrides in variants:
            row = run_one(args.config, name, [*args.override, *overrides], args.window, Path(tmp))
            row.update({"config": args.config, "jax": jax.__version__, "device": jax.devices()[0].device_kind})
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    dense = next(r for r in rows if r["variant"] == "dense")
    print("\n| variant | final train loss | gap | eval loss | gap | slow-tier compression |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        gap = 100 * (r["final_loss"] / dense["final_loss"] - 1)
        eval_gap = 100 * (r["eval_loss"] / dense["eval_loss"] - 1)
        ratio = f"{r['comm_compression_ratio']:.1f}x" if "comm_compression_ratio" in r else "-"
        losses = [f"{r['final_loss']:.4f}", f"{gap:+.2f}%", f"{r['eval_loss']:.4f}", f"{eval_gap:+.2f}%"]
        cells = [r["variant"], *losses, ratio]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
