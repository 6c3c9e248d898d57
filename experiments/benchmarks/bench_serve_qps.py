"""Serving QPS at a latency target: `jaxdeep serve` against a plain `transformers` `generate` server.

For each model (an experiment YAML, random weights from `train.seed`; decode speed does not depend on their
values) on one accelerator:

1. export the model once to a Hugging Face directory (in a subprocess that exits before any server starts):
   dense -> GPT-NeoX (`jaxdeep/hf/neox.py`), DeepSeek -> DeepSeek-V2/V3 (`jaxdeep.hf.save`), each with a byte-level
   `tokenizer.json` (ids 0-255 are the UTF-8 bytes, as our byte tokenizer);
2. for each server in turn, never two at once (same card): `jaxdeep serve` (dense: the experiment itself, whose
   parameters are those exported; DeepSeek: the exported directory) and `hf_generate_server.py` (the exported
   directory through `AutoModelForCausalLM` and `model.generate`, one request at a time). Wait for `/health`,
   measure the unloaded latency (requests one at a time), the latency of a few users (`--few-users` requests at a
   time, three rounds: a batching server then decodes that many rows), send a warm-up burst, then search the
   request rate:
   Poisson arrivals (`jaxdeep bench serve` load generator) with prompts of `--input-len` bytes = tokens for both
   servers, `--output-len` new tokens with `ignore_eos` (both generate exactly that many), greedy; a rate passes
   when every request completes and the P99 time to first token is <= `--slo-ttft-ms`. Rates double (or halve)
   from an estimate of the server's capacity until one fails (passes), then bisect while time allows;
3. write one JSON line per measured point and per server summary to `--out` and print a table. A jaxdeep point
   also gives its prefill launches and prompts per launch (`prefill_calls`, `prefill_prompts_per_call`, from the
   server's `/metrics` before and after it).

The whole run fits in `--budget` seconds (default 480; servers' start-up included): each server gets an even
share of what is left, and a point that would overrun its share is not started. A rate is measured for about
`--point-seconds` (at least `--min-requests` requests); each request gives up after `--request-timeout` seconds
(then the point fails), so an overloaded point ends soon after its last arrival.

    python experiments/benchmarks/bench_serve_qps.py --models dense_1b deepseek_2b --budget 480

A server that handles one request at a time meets a TTFT target only while few requests arrive during another's
generation: when its service time S (the unloaded end-to-end latency) is well above the target, P99 TTFT <= 200 ms
needs a utilisation below ~1%, i.e. QPS ~ 0.01 / S. Rates that low cannot be measured in seconds; the summary
gives the M/D/1 queue's figure (`fifo_estimate_qps`: Poisson arrivals, fixed service S) next to the measured
points (on CPU with a small model, where S is below the target, the estimate and the measured rate agree).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
HF_SERVER = Path(__file__).resolve().parent / "hf_generate_server.py"


# ---- export (runs in its own process: `bench_serve_qps.py --export CONFIG OUT [overrides]`) ---------------------


def export(config: str, out_dir: str, overrides: list[str], max_position_embeddings: int) -> None:
    from jaxdeep import hf
    from jaxdeep.hf.model import HFModel
    from jaxdeep.hf.neox import save_neox, write_byte_tokenizer
    from jaxdeep.serve.loading import load_model

    loaded = load_model(config, overrides)
    model_cfg = loaded.cfg.model
    if model_cfg.kind == "dense":
        save_neox(model_cfg, loaded.params, out_dir, max_position_embeddings)
    else:
        hf.save(HFModel(model_cfg, loaded.params, loaded.model_state, loaded.mesh, loaded.cfg.sharding.rules), out_dir)
        write_byte_tokenizer(out_dir, model_cfg.vocab_size)
    print(json.dumps({"exported": out_dir, "kind": model_cfg.kind, "name": loaded.cfg.name}))


# ---- servers ---------------------------------------------------------------------------------------------------


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


PREFILL_COUNTERS = ("jaxdeep:prefill_calls_total", "jaxdeep:prefill_chunks_total")


def prefill_counts(url: str) -> tuple[float, float] | None:
    """(prefill launches, prompt chunks they read) from a jaxdeep server's `/metrics`, or None for a server
    without them."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    values = {name: values[name] for name in PREFILL_COUNTERS if name in values}
    return tuple(values[name] for name in PREFILL_COUNTERS) if len(values) == len(PREFILL_COUNTERS) else None


class Server:
    """One server process; `start()` waits for /health, `stop()` ends it (and its children)."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict, log_path: Path, concurrency: int):
        self.name, self.cmd, self.port, self.env, self.log_path = name, cmd, port, env, log_path
        self.concurrency = concurrency  # requests it generates for at once (capacity estimate)
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> float:
        t0 = time.perf_counter()
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                _get_json(self.url + "/health", timeout=2)
                return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy after {timeout:.0f} s; see {self.log_path}")

    def wait_idle(self, timeout: float = 60.0) -> bool:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            try:
                h = _get_json(self.url + "/health", timeout=5)
                if not h.get("running") and not h.get("waiting"):
                    return True
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.log.close()
        self.proc = None


# ---- load points -----------------------------------------------------------------------------------------------


def run_point(server: Server, args, tmp: Path, rate: float, num_prompts: int, label: str, **extra) -> dict:
    """One `jaxdeep bench serve` run; returns its summary (or a failed stub when the client itself failed)."""
    out = tmp / f"{server.name}_{label}.json"
    cmd = [
        sys.executable, "-m", "jaxdeep.cli", "bench", "serve", "--base-url", server.url,
        "--num-prompts", str(num_prompts), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--request-rate", str(rate), "--ignore-eos", "--temperature", "0", "--seed", str(args.seed),
        "--timeout", str(extra.get("timeout", args.request_timeout)), "--output-json", str(out),
        "--goodput", f"ttft:{args.slo_ttft_ms}ms",
    ]  # fmt: skip
    if extra.get("max_concurrency"):
        cmd += ["--max-concurrency", str(extra["max_concurrency"])]
    if extra.get("warmup"):
        cmd += ["--warmup", str(extra["warmup"])]
    counts = prefill_counts(server.url)
    t0 = time.perf_counter()
    limit = num_prompts / rate + extra.get("timeout", args.request_timeout) + 60 if rate < math.inf else 600
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=limit)
        ok = proc.returncode == 0 and out.is_file()
        detail = proc.stderr[-500:] if not ok else ""
    except subprocess.TimeoutExpired:
        ok, detail = False, f"client ran past {limit:.0f} s"
    wall = time.perf_counter() - t0
    if ok:
        summary = json.loads(out.read_text())["runs"][0]
        summary.pop("requests", None)
    else:
        summary = {"completed": 0, "failed": num_prompts, "p99_ttft_ms": None, "error_kinds": [detail]}
    summary.update(offered_rate=rate, num_prompts=num_prompts, wall_s=wall)
    idle = server.wait_idle()
    if not idle:
        summary.setdefault("error_kinds", []).append("server still busy 60 s after the point")
    after = prefill_counts(server.url)
    if counts and after and after[0] > counts[0]:
        calls, chunks = after[0] - counts[0], after[1] - counts[1]
        summary.update(prefill_calls=calls, prefill_prompts_per_call=chunks / calls)
    return summary


def md1_wait_cdf(t: float, rate: float, service: float) -> float:
    """P(wait <= t) in an M/D/1 queue (Poisson arrivals at `rate`, fixed `service` seconds): Erlang's formula."""
    rho = rate * service
    if rho >= 1:
        return 0.0
    total = 0.0
    for k in range(int(t // service) + 1):
        x = rate * (k * service - t)
        total += x**k / math.factorial(k) * math.exp(-x)
    return (1 - rho) * total


def fifo_estimate(slo_s: float, ttft_s: float, service_s: float, quantile: float = 0.99) -> float:
    """Highest Poisson rate at which a one-at-a-time server keeps the `quantile` of TTFT within `slo_s`: the
    wait may use what the unloaded TTFT leaves of the target (M/D/1 with the unloaded end-to-end latency)."""
    t = slo_s - ttft_s
    if t < 0:
        return 0.0
    lo, hi = 0.0, 1.0 / service_s
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if md1_wait_cdf(t, mid, service_s) >= quantile else (lo, mid)
    return lo


def passes(summary: dict, slo_ms: float) -> bool:
    p99 = summary.get("p99_ttft_ms")
    return summary.get("failed", 1) == 0 and summary.get("completed", 0) > 0 and p99 is not None and p99 <= slo_ms


def _nice(rate: float) -> float:
    """Round to 2 significant digits (rates in the table read cleanly)."""
    if rate <= 0:
        return rate
    digits = 1 - int(math.floor(math.log10(rate)))
    return round(rate, max(digits, 0))


def sweep(server: Server, args, tmp: Path, deadline: float, record) -> dict:
    """Unloaded latency, warm-up burst, then the rate search. Returns the server's summary."""
    result: dict = {"server": server.name}
    unloaded = run_point(server, args, tmp, math.inf, 3, "unloaded", max_concurrency=1, warmup=1, timeout=300)
    record({"kind": "unloaded", **unloaded})
    if not unloaded.get("completed"):
        result["error"] = f"unloaded requests failed: {unloaded.get('error_kinds')}"
        return result
    e2el_s = unloaded["median_e2el_ms"] / 1e3
    result.update(unloaded_ttft_ms=unloaded["median_ttft_ms"], unloaded_e2el_ms=unloaded["median_e2el_ms"])
    result["unloaded_tpot_ms"] = unloaded["median_tpot_ms"]
    few_n = min(args.few_users, server.concurrency)
    if few_n > 1:
        few = run_point(server, args, tmp, math.inf, 3 * few_n, "few", max_concurrency=few_n, timeout=300)
        record({"kind": "few", "users": few_n, **few})
        if few.get("completed"):
            result.update(
                few_users=few_n, few_users_tpot_ms=few["median_tpot_ms"], few_users_ttft_ms=few["median_ttft_ms"]
            )
    burst_n = server.concurrency
    burst = {}
    if burst_n > 1:  # all slots busy at once; one at a time it would be 1 / E2EL
        burst = run_point(server, args, tmp, math.inf, burst_n, "burst", timeout=300)
        record({"kind": "burst", **burst})
    if burst.get("completed"):
        result["burst_requests"] = burst_n
        result["burst_request_throughput"] = burst["request_throughput"]
        result["burst_output_throughput"] = burst["output_throughput"]
    capacity = server.concurrency / e2el_s  # requests/s it could finish with every slot busy, no prefill cost
    result["capacity_estimate_qps"] = capacity
    if server.concurrency == 1:
        ttft_s = unloaded["median_ttft_ms"] / 1e3
        result["fifo_estimate_qps"] = fifo_estimate(args.slo_ttft_ms / 1e3, ttft_s, e2el_s)
    timeout = min(args.request_timeout, max(10.0, 4 * e2el_s))

    points: list[tuple[float, bool, dict]] = []
    lo, hi = None, None  # highest passing rate, lowest failing rate

    def measure(rate: float) -> bool | None:
        n = max(args.min_requests, round(rate * args.point_seconds))
        n = min(n, max(3, round(rate * args.max_point_seconds)))
        estimate = n / rate + min(timeout, 2 * e2el_s) + 5
        if time.perf_counter() + estimate > deadline:
            return None
        s = run_point(server, args, tmp, rate, n, f"rate{rate:g}", timeout=timeout)
        ok = passes(s, args.slo_ttft_ms)
        s.update(kind="point", passed=ok)
        record(s)
        points.append((rate, ok, s))
        p99 = s.get("p99_ttft_ms")
        p99_text = f"{p99:.0f} ms" if p99 is not None else "-"
        per_call = (
            f", {s['prefill_prompts_per_call']:.2f} prompts per prefill" if "prefill_prompts_per_call" in s else ""
        )
        print(
            f"  {server.name}: rate {rate:g} req/s x {n}: P99 TTFT {p99_text}{per_call}, "
            f"{s.get('completed', 0)} ok / {s.get('failed', 0)} failed -> {'pass' if ok else 'fail'}",
            flush=True,
        )
        return ok

    rate = _nice(min(max(args.start_fraction * capacity, args.min_rate), args.max_rate))
    ok = measure(rate)
    if ok is not None:
        if ok:
            lo = rate
            while hi is None and rate < args.max_rate:
                rate = _nice(min(rate * 2, args.max_rate))
                ok = measure(rate)
                if ok is None:
                    break
                lo, hi = (rate, hi) if ok else (lo, rate)
        else:
            hi = rate
            while lo is None and rate / 2 >= args.min_rate:
                rate = _nice(rate / 2)
                ok = measure(rate)
                if ok is None:
                    break
                lo, hi = (rate, hi) if ok else (lo, rate)
        while lo is not None and hi is not None and hi / lo > 1 + args.resolution:
            rate = _nice(math.sqrt(lo * hi))
            if rate in (lo, hi):
                break
            ok = measure(rate)
            if ok is None:
                break
            lo, hi = (rate, hi) if ok else (lo, rate)
    best = next((s for r, ok, s in points if ok and r == lo), None)
    result.update(
        qps_at_slo=lo,
        first_failing_rate=hi,
        p99_ttft_ms_at_qps=best["p99_ttft_ms"] if best else None,
        achieved_rps_at_qps=best["request_throughput"] if best else None,
        p99_ttft_ms_at_failing=next((s["p99_ttft_ms"] for r, ok, s in points if r == hi), None),
        points=len(points),
    )
    return result


# ---- the run ---------------------------------------------------------------------------------------------------


def config_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return p if p.is_absolute() else ROOT / p
    return ROOT / "experiments" / f"{name}.yaml"


def fmt(x, spec: str = ".1f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def print_table(rows: list[dict], args) -> None:
    print()
    print(
        f"QPS sustained with P99 TTFT <= {args.slo_ttft_ms:g} ms; {args.input_len} prompt tokens, "
        f"{args.output_len} new tokens (ignore_eos, greedy), Poisson arrivals"
    )
    head = (
        "| model | server | QPS at SLO | P99 TTFT there (ms) | first failing rate (P99 TTFT ms) | unloaded TTFT / "
        "E2EL (ms) | unloaded TPOT (ms) | TPOT of a few users (ms) | burst throughput (req/s, tok/s) | points |"
    )
    print(head)
    print("|" + "---|" * 10)
    for r in rows:
        if r.get("qps_at_slo") is not None:
            qps = f"{r['qps_at_slo']:g}"
        elif r.get("first_failing_rate") is not None:
            qps = f"< {r['first_failing_rate']:g}"
        else:
            qps = "-"
        if r.get("fifo_estimate_qps") is not None:
            qps += f" (est. {r['fifo_estimate_qps']:.3f})"
        failing = "-"
        if r.get("first_failing_rate") is not None:
            failing = f"{r['first_failing_rate']:g} ({fmt(r.get('p99_ttft_ms_at_failing'), '.0f')})"
        few = "-"
        if r.get("few_users_tpot_ms") is not None:
            few = f"{r['few_users_tpot_ms']:.2f} ({r['few_users']} users)"
        burst = "-"
        if r.get("burst_request_throughput") is not None:
            burst = f"{r['burst_request_throughput']:.2f}, {r['burst_output_throughput']:.0f}"
        print(
            f"| {r['model']} | {r['server']} | {qps} | {fmt(r.get('p99_ttft_ms_at_qps'), '.0f')} | {failing} | "
            f"{fmt(r.get('unloaded_ttft_ms'), '.0f')} / {fmt(r.get('unloaded_e2el_ms'), '.0f')} | "
            f"{fmt(r.get('unloaded_tpot_ms'), '.2f')} | {few} | {burst} | {r.get('points', 0)} |"
            + (f" error: {r['error']}" if r.get("error") else "")
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", nargs="+", metavar="ARG", help=argparse.SUPPRESS)  # internal: CONFIG OUT [overrides]
    ap.add_argument("--models", nargs="+", default=["dense_1b"], help="experiment names or YAML paths")
    ap.add_argument("--servers", nargs="+", default=["jaxdeep", "hf"], choices=["jaxdeep", "hf"])
    ap.add_argument(
        "--override",
        action="append",
        default=None,
        help="config override for the model (repeatable; default model.param_dtype=bfloat16)",
    )
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--slo-ttft-ms", type=float, default=200.0)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 480)")
    ap.add_argument("--point-seconds", type=float, default=20.0, help="arrivals per rate span about this long")
    ap.add_argument("--max-point-seconds", type=float, default=40.0, help="at low rates, fewer requests than min")
    ap.add_argument("--min-requests", type=int, default=10)
    ap.add_argument("--few-users", type=int, default=4, help="requests at a time for the few-users latency (0: skip)")
    ap.add_argument("--request-timeout", type=float, default=30.0, help="seconds a request may take at most")
    ap.add_argument("--start-fraction", type=float, default=0.25, help="first rate, as a share of capacity")
    ap.add_argument("--min-rate", type=float, default=0.1)
    ap.add_argument("--max-rate", type=float, default=512.0)
    ap.add_argument("--resolution", type=float, default=0.2, help="bisect until fail/pass rates are this close")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-slots", type=int, default=64, help="jaxdeep serve --num-slots")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="jaxdeep serve --prefill-chunk")
    ap.add_argument("--prefill-rows", type=int, default=4, help="jaxdeep serve --prefill-rows")
    ap.add_argument("--decode-steps", type=int, default=1, help="jaxdeep serve --decode-steps")
    ap.add_argument(
        "--concurrent-kernels", choices=["on", "off"], default="off", help="jaxdeep serve --concurrent-kernels"
    )
    ap.add_argument("--max-context", type=int, default=None, help="default: input + output length, rounded up")
    ap.add_argument("--hf-device", default=None, help="default: cuda when torch sees one, else cpu")
    ap.add_argument("--hf-dtype", default="bfloat16")
    ap.add_argument("--port", type=int, default=8123, help="first port; the baseline uses the next")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--reserve", type=float, default=45.0, help="seconds kept per later server start or export")
    ap.add_argument("--workdir", help="exported models and logs (default: a temporary directory, removed)")
    ap.add_argument("--log-dir", help="servers' logs (default: the workdir)")
    ap.add_argument("--out", default=None, help="JSON lines (default experiments/benchmarks/bench_serve_qps.jsonl)")
    args = ap.parse_args(argv)

    if args.export:
        config, out_dir, *overrides = args.export
        max_pos = int(os.environ.get("BENCH_MAX_POSITION_EMBEDDINGS", "4096"))
        export(config, out_dir, overrides, max_pos)
        return 0

    t_start = time.perf_counter()
    deadline = t_start + args.budget
    overrides = args.override if args.override is not None else ["model.param_dtype=bfloat16"]
    max_context = args.max_context or 64 * math.ceil((args.input_len + args.output_len + 1) / 64)
    out_path = Path(args.out) if args.out else ROOT / "experiments/benchmarks/bench_serve_qps.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_serve_qps_"))
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir) if args.log_dir else workdir
    log_dir.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.85")  # one server at a time; leave room for the runtime
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    common = {
        "time": stamp,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "slo_ttft_ms": args.slo_ttft_ms,
        "decode_steps": args.decode_steps,
        "prefill_rows": args.prefill_rows,
        "concurrent_kernels": args.concurrent_kernels,
        "overrides": overrides,
    }
    rows: list[dict] = []
    weights = {"jaxdeep": 2.0, "hf": 1.0}  # the batching server's search takes more points
    left = [(m, n) for m in args.models for n in args.servers]
    try:
        for model in args.models:
            config = config_path(model)
            hf_dir = workdir / f"{config.stem}_hf"
            if deadline - time.perf_counter() < 2 * args.reserve:
                for name in args.servers:
                    rows.append({"model": config.stem, "server": name, "error": "no time left in the budget"})
                    left.remove((model, name))
                continue
            t0 = time.perf_counter()
            try:
                if not (hf_dir / "config.json").is_file():
                    print(f"exporting {config.name} to {hf_dir} ...", flush=True)
                    export_env = {**env, "BENCH_MAX_POSITION_EMBEDDINGS": str(max(max_context, 2048))}
                    subprocess.run(
                        [sys.executable, __file__, "--export", str(config), str(hf_dir), *overrides],
                        cwd=ROOT, env=export_env, check=True, timeout=max(60.0, deadline - time.perf_counter()),
                    )  # fmt: skip
                kind = json.loads((hf_dir / "config.json").read_text())["model_type"]
            except (subprocess.SubprocessError, OSError, ValueError, KeyError) as e:
                print(f"  export of {config.name} failed: {e}", flush=True)
                for name in args.servers:
                    rows.append({"model": config.stem, "server": name, "error": f"export failed: {e}"})
                    left.remove((model, name))
                continue
            export_s = time.perf_counter() - t0
            for name in args.servers:
                port = args.port + (0 if name == "jaxdeep" else 1)
                log_path = log_dir / f"{config.stem}_{name}.log"
                if name == "jaxdeep":
                    # Dense: the experiment itself (same parameters as exported); DeepSeek: the exported directory.
                    target = [str(config), *overrides] if kind == "gpt_neox" else [str(hf_dir)]
                    cmd = [
                        sys.executable, "-m", "jaxdeep.cli", "serve", *target, "--port", str(port),
                        "--num-slots", str(args.num_slots), "--max-context", str(max_context),
                        "--prefill-chunk", str(args.prefill_chunk), "--prefill-rows", str(args.prefill_rows),
                        "--max-waiting", "100000",
                        "--decode-steps", str(args.decode_steps),
                        "--concurrent-kernels", args.concurrent_kernels,
                    ]  # fmt: skip
                    concurrency = args.num_slots
                else:
                    cmd = [sys.executable, str(HF_SERVER), str(hf_dir), "--port", str(port), "--dtype", args.hf_dtype]
                    if args.hf_device:
                        cmd += ["--device", args.hf_device]
                    concurrency = 1
                server = Server(name, cmd, port, env, log_path, concurrency)
                row = {"model": config.stem, "server": name, "export_s": export_s}
                print(f"starting {name} for {config.stem} ...", flush=True)
                try:
                    row["startup_s"] = server.start(min(args.startup_timeout, deadline - time.perf_counter()))
                    left.remove((model, name))
                    models_left = len({m for m, _ in left} - {model})
                    reserve = args.reserve * (len(left) + models_left)  # later start-ups and exports
                    weight = weights[name] / (weights[name] + sum(weights[n] for _, n in left))
                    share = max(0.0, deadline - time.perf_counter() - reserve) * weight
                    print(f"  {name} up after {row['startup_s']:.0f} s; {share:.0f} s for its sweep", flush=True)

                    def record(point, name=name, stem=config.stem):
                        with out_path.open("a") as f:
                            f.write(json.dumps({**common, "model": stem, "server": name, **point}) + "\n")

                    row.update(sweep(server, args, workdir, time.perf_counter() + share, record))
                except (RuntimeError, TimeoutError, subprocess.SubprocessError) as e:
                    row["error"] = str(e)
                    print(f"  {name}: {e}", flush=True)
                    if log_path.is_file():
                        print("".join(log_path.read_text(errors="replace").splitlines(True)[-40:]), flush=True)
                finally:
                    server.stop()
                    if (model, name) in left:
                        left.remove((model, name))
                rows.append(row)
                with out_path.open("a") as f:
                    f.write(json.dumps({**common, "kind": "summary", **row}) + "\n")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows, args)
    print(f"\n{time.perf_counter() - t_start:.0f} s in all; results appended to {out_path}")
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
