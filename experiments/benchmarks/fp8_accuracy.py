"""Does FP8 training follow bf16 training? Compares two runs of one config that differ only in
`precision.matmul` (experiments/deepseek_fp8_accuracy.yaml):

    jaxdeep train experiments/deepseek_fp8_accuracy.yaml --run-dir runs/fp8_accuracy_bf16 --fresh
    jaxdeep train experiments/deepseek_fp8_accuracy.yaml precision.matmul=fp8 --run-dir runs/fp8_accuracy_fp8 --fresh
    python experiments/benchmarks/fp8_accuracy.py runs/fp8_accuracy_bf16 runs/fp8_accuracy_fp8 \\
        --png experiments/benchmarks/fp8_accuracy.png --out experiments/benchmarks/fp8_accuracy.jsonl

Reads each run's `metrics.jsonl` (written by `jaxdeep train`), smooths the training loss (the mean of the last
`--window` logged steps for the final figure, an exponential moving average for the curves), and prints the
relative gap of the smoothed final loss and of the last held-out loss, the median step time (the first logged
window, which includes compilation, is left out), tokens/s and the allocator's peak memory where the run logged
it. Plots both curves and their relative gap to a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: pass the --run-dir of a finished `jaxdeep train` run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ema(values: list[float], decay: float) -> list[float]:
    """Bias-corrected exponential moving average (the first points are not pulled toward zero)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay**i))
    return out


def summarise(name: str, records: list[dict], window: int) -> dict:
    train = [r for r in records if "loss" in r]
    if not train:
        raise SystemExit(f"{name}: no training losses logged")
    evals = [r for r in records if "eval_loss" in r]
    timed = [r["step_time_s"] for r in train[1:]] or [train[0]["step_time_s"]]
    summary = {
        "run": name,
        "last_step": train[-1]["step"],
        "final_loss": statistics.fmean(r["loss"] for r in train[-window:]),
        "final_loss_window_steps": train[-1]["step"] - train[-min(window, len(train))]["step"],
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "step_time_s": statistics.median(timed),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:] or train),
    }
    if any("mfu" in r for r in train):
        summary["mfu"] = statistics.median(r["mfu"] for r in train[1:] or train if "mfu" in r)
    peaks = [r["peak_memory_gib"] for r in train if "peak_memory_gib" in r]
    summary["peak_memory_gib"] = max(peaks) if peaks else None
    return summary


def relative_gap(fp8: float | None, bf16: float | None) -> float | None:
    return None if fp8 is None or bf16 is None else (fp8 - bf16) / bf16


def plot(runs: dict[str, list[dict]], decay: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gap_ax) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 1))
    smoothed = {}
    for (name, records), color in zip(runs.items(), ("tab:blue", "tab:red"), strict=False):
        train = [r for r in records if "loss" in r]
        steps = [r["step"] for r in train]
        smooth = ema([r["loss"] for r in train], decay)
        smoothed[name] = dict(zip(steps, smooth, strict=True))
        ax.plot(steps, [r["loss"] for r in train], color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, smooth, color=color, label=f"{name} train (EMA {decay})")
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if evals:
            ax.plot(*zip(*evals, strict=True), "o--", color=color, label=f"{name} eval")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    (bf16_name, bf16), (fp8_name, fp8) = smoothed.items()
    common = sorted(set(bf16) & set(fp8))
    gap_ax.plot(common, [100 * (fp8[s] - bf16[s]) / bf16[s] for s in common], color="black")
    gap_ax.axhline(0, color="grey", linewidth=0.8)
    gap_ax.set_xlabel("step")
    gap_ax.set_ylabel(f"{fp8_name} vs {bf16_name} (%)")
    gap_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bf16_run", type=Path, help="run directory of the bf16 run (the baseline)")
    parser.add_argument("fp8_run", type=Path, help="run directory of the fp8 run")
    parser.add_argument("--window", type=int, default=20, help="logged steps averaged for the final loss")
    parser.add_argument("--ema", type=float, default=0.9, help="decay of the plotted moving average")
    parser.add_argument("--png", type=Path, default=Path("fp8_accuracy.png"), help="where the plot goes")
    parser.add_argument("--out", type=Path, help="append the two summaries and the gaps as JSON lines here")
    args = parser.parse_args()

    runs = {"bf16": read_metrics(args.bf16_run), "fp8": read_metrics(args.fp8_run)}
    bf16, fp8 = (summarise(name, records, args.window) for name, records in runs.items())
    if bf16["last_step"] != fp8["last_step"]:
        print(f"warning: the runs end at different steps (bf16 {bf16['last_step']}, fp8 {fp8['last_step']})")
    gaps = {
        "final_loss_gap": relative_gap(fp8["final_loss"], bf16["final_loss"]),
        "eval_loss_gap": relative_gap(fp8["eval_loss"], bf16["eval_loss"]),
        "step_time_ratio": fp8["step_time_s"] / bf16["step_time_s"],
    }
    if fp8["peak_memory_gib"] and bf16["peak_memory_gib"]:
        gaps["peak_memory_ratio"] = fp8["peak_memory_gib"] / bf16["peak_memory_gib"]

    def fmt(value, spec):
        return "not logged" if value is None else format(value, spec)

    print(f"| run | final train loss (last {args.window} logs) | eval loss | step ms | tokens/s | peak GiB |")
    print("|---|---|---|---|---|---|")
    for s in (bf16, fp8):
        print(
            f"| {s['run']} | {s['final_loss']:.4f} | {fmt(s['eval_loss'], '.4f')} | {1e3 * s['step_time_s']:.1f} | "
            f"{s['tokens_per_s']:,.0f} | {fmt(s['peak_memory_gib'], '.2f')} |"
        )
    print(
        f"fp8 vs bf16: final train loss {fmt(gaps['final_loss_gap'], '+.3%')}, eval loss "
        f"{fmt(gaps['eval_loss_gap'], '+.3%')}, step time x{gaps['step_time_ratio']:.2f}"
        + (f", peak memory x{gaps['peak_memory_ratio']:.2f}" if "peak_memory_ratio" in gaps else "")
    )
    plot(runs, args.ema, args.png)
    print(f"plot: {args.png}")
    if args.out:
        with args.out.open("a") as f:
            for line in (bf16, fp8, {"run": "gaps", **gaps}):
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
