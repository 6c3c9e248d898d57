"""`jaxdeep bench serve`: load a running OpenAI-compatible server and measure it.

Requests stream from `/v1/completions` (or `/v1/chat/completions`) with random prompts of `--input-len` tokens
asking for `--output-len` new tokens. They arrive as a Poisson process at `--request-rate` requests/s (gamma
inter-arrival times with shape `--burstiness`: 1 is Poisson, below 1 burstier, above 1 more even), all at once
when the rate is `inf`, and never more than `--max-concurrency` at a time when that is set.

Prompt lengths: with `--prompt-unit byte` (the default, right for jaxdeep's byte tokenizer) a prompt is exactly
`--input-len` ASCII bytes, one token each. For BPE tokenizers use `--prompt-unit word`: prompts are random common
English words, which such vocabularies hold as one token each (with the leading space), so `--input-len` words
come to about as many tokens. Either way the report counts the tokens the server itself reports in `usage`
(asked for with `stream_options.include_usage`); a server that does not report usage is credited with the
requested input length and with one output token per non-empty chunk.

Output length: each request asks for `max_tokens=--output-len`; a request that stops early (end-of-sequence)
counts what came back. `--ignore-eos` also sends `ignore_eos: true` (honoured by `jaxdeep serve` and vLLM), so
every request generates exactly `--output-len` tokens.

Reported: request and token throughput; mean, median and P99 of time to first token (TTFT), time per output
token after the first (TPOT), inter-token latency (ITL, every gap between chunks) and end-to-end latency (E2EL);
goodput (requests/s that met every SLO of `--goodput ttft:200ms tpot:50ms e2el:2s`). `--sweep 1,2,4,8` runs
once per rate and plots P50/P99 TTFT and E2EL against the offered and the achieved request rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import aiohttp

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more about out up them some could "
    "what into than time only other new then these two may first any like now my such make over our even most "
    "after also made many before must through back years where much your way well down should because each just "
    "those people how too little state good very world still own see men work long here get both between life"
).split()
SLO_KEYS = ("ttft", "tpot", "e2el")


def _aiohttp():
    # Imported when a run starts, not when the CLI builds its parser: every `jaxdeep` command would pay for it.
    import aiohttp

    return aiohttp


@dataclass
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000"  # server root, without /v1
    endpoint: str = "/v1/completions"  # or /v1/chat/completions
    model: str | None = None  # None: the first model the server lists at /v1/models
    num_prompts: int = 100  # requests to send
    input_len: int = 128  # prompt length in tokens (see prompt_unit)
    output_len: int = 128  # max_tokens of each request
    prompt_unit: str = "byte"  # byte: ASCII bytes (byte tokenizers); word: common English words (BPE tokenizers)
    request_rate: float = math.inf  # requests/s offered; inf sends all at once
    burstiness: float = 1.0  # gamma shape of inter-arrival times; 1 is Poisson
    max_concurrency: int | None = None  # requests in flight at most
    temperature: float = 0.0
    ignore_eos: bool = False  # also send ignore_eos: true (a vLLM extension)
    seed: int = 0  # prompts and arrival times
    goodput: dict[str, float] = field(default_factory=dict)  # SLOs in seconds: ttft, tpot, e2el
    warmup: int = 0  # requests sent (one at a time) and not counted before the run
    timeout_s: float = 600.0  # per request


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start: float = 0.0  # seconds since the run started
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def tpot(self) -> float:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`["ttft:200ms", "tpot:50ms", "e2el:2s"]` -> seconds by key; a bare number is milliseconds."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        key = {"e2e": "e2el"}.get(key.strip().lower(), key.strip().lower())
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput {item!r}: expected KEY:VALUE with KEY one of {', '.join(SLO_KEYS)}")
        value = value.strip().lower()
        scale = 1e-3
        for suffix, s in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
            if value.endswith(suffix):
                value, scale = value[: -len(suffix)], s
                break
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number (write e.g. 200ms or 0.2s)") from None
        if not number > 0:
            raise ValueError(f"--goodput {item!r}: the limit must be > 0")
        slos[key] = number * scale
    return slos


def make_prompts(cfg: BenchConfig) -> list[str]:
    rng = random.Random(cfg.seed)
    if cfg.prompt_unit == "word":
        return [" ".join(rng.choices(WORDS, k=cfg.input_len)) for _ in range(cfg.num_prompts)]
    alphabet = "abcdefghijklmnopqrstuvwxyz     ,.\n"
    return ["".join(rng.choices(alphabet, k=cfg.input_len)) for _ in range(cfg.num_prompts)]


def arrival_gaps(cfg: BenchConfig) -> list[float]:
    """Seconds to wait before each request: gamma(shape=burstiness, mean=1/rate), the first request at once (so
    the run's duration holds no idle lead-in); zeros at rate inf."""
    if math.isinf(cfg.request_rate):
        return [0.0] * cfg.num_prompts
    rng = np.random.default_rng(cfg.seed)
    theta = 1.0 / (cfg.request_rate * cfg.burstiness)
    gaps = rng.gamma(cfg.burstiness, theta, cfg.num_prompts)
    gaps[:1] = 0.0
    return gaps.tolist()


def _payload(cfg: BenchConfig, model: str, prompt: str) -> dict:
    body: dict = {
        "model": model,
        "max_tokens": cfg.output_len,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint.rstrip("/").endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def _one(session: aiohttp.ClientSession, cfg: BenchConfig, model: str, prompt: str, t0: float) -> RequestResult:
    result = RequestResult(start=time.perf_counter() - t0)
    start = time.perf_counter()
    chunks = 0
    last = start
    usage = None
    try:
        async with session.post(cfg.base_url.rstrip("/") + cfg.endpoint, json=_payload(cfg, model, prompt)) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if _chunk_text(chunk):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
        result.e2el = time.perf_counter() - start
    except (TimeoutError, _aiohttp().ClientError, ValueError) as e:  # ValueError: bad JSON, an overlong line
        result.error = f"{type(e).__name__}: {e}"
        return result
    if chunks == 0:
        result.error = "no text came back"
        return result
    result.ok = True
    result.prompt_tokens = int(usage["prompt_tokens"]) if usage else cfg.input_len
    result.output_tokens = int(usage["completion_tokens"]) if usage else chunks
    return result


async def _model_name(session: aiohttp.ClientSession, cfg: BenchConfig) -> str:
    if cfg.model:
        return cfg.model
    async with session.get(cfg.base_url.rstrip("/") + "/v1/models") as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


async def run_benchmark(cfg: BenchConfig) -> dict:
    """One run at `cfg.request_rate`: the summary (see `summarize`) plus per-request figures."""
    prompts = make_prompts(cfg)
    gaps = arrival_gaps(cfg)
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    aiohttp = _aiohttp()
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = await _model_name(session, cfg)
        for prompt in prompts[: cfg.warmup]:
            warm = await _one(session, cfg, model, prompt, time.perf_counter())
            if not warm.ok:
                raise RuntimeError(f"warm-up request failed: {warm.error}")

        async def limited(prompt: str, t0: float) -> RequestResult:
            if limit is None:
                return await _one(session, cfg, model, prompt, t0)
            async with limit:
                return await _one(session, cfg, model, prompt, t0)

        t0 = time.perf_counter()
        tasks = []
        for prompt, gap in zip(prompts, gaps, strict=True):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(prompt, t0)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    summary = summarize(results, duration, cfg.goodput)
    summary.update(model=model, request_rate=cfg.request_rate, burstiness=cfg.burstiness)
    summary["max_concurrency"] = cfg.max_concurrency
    summary["requests"] = {
        "start_s": [r.start for r in results],
        "ttft_s": [r.ttft for r in results],
        "e2el_s": [r.e2el for r in results],
        "prompt_tokens": [r.prompt_tokens for r in results],
        "output_tokens": [r.output_tokens for r in results],
        "errors": [r.error for r in results],
    }
    return summary


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    out: dict = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    series = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2el for r in ok],
    }
    for name, values in series.items():
        ms = np.asarray(values, dtype=np.float64) * 1e3
        for stat, fn in (("mean", np.mean), ("median", np.median), ("p99", lambda a: np.percentile(a, 99))):
            out[f"{stat}_{name}_ms"] = float(fn(ms)) if ms.size else None
        out[f"p50_{name}_ms"] = out[f"median_{name}_ms"]
    if slos:
        good = sum(all(getattr(r, key) <= limit for key, limit in slos.items()) for r in ok)
        out["goodput_slos_s"] = dict(slos)
        out["good_requests"] = good
        out["request_goodput"] = good / duration
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        out["error_kinds"] = errors[:10]
    return out


def format_summary(s: dict) -> str:
    rate = "inf" if math.isinf(s["request_rate"]) else f"{s['request_rate']:g}"
    lines = [
        f"{'model':<34}{s['model']}",
        f"{'offered rate (req/s)':<34}{rate}  (burstiness {s['burstiness']:g}, max concurrency {s['max_concurrency']})",
        f"{'completed / failed':<34}{s['completed']} / {s['failed']}",
        f"{'duration (s)':<34}{s['duration_s']:.2f}",
        f"{'input / output tokens':<34}{s['total_input_tokens']} / {s['total_output_tokens']}",
        f"{'request throughput (req/s)':<34}{s['request_throughput']:.2f}",
        f"{'output token throughput (tok/s)':<34}{s['output_throughput']:.1f}",
        f"{'total token throughput (tok/s)':<34}{s['total_token_throughput']:.1f}",
    ]
    if "request_goodput" in s:
        lines.append(f"{'goodput (req/s)':<34}{s['request_goodput']:.2f}  ({s['good_requests']} met every SLO)")
    lines.append(f"{'':<16}{'mean':>12}{'median':>12}{'p99':>12}  (ms)")
    for name in ("ttft", "tpot", "itl", "e2el"):
        cells = [s[f"{stat}_{name}_ms"] for stat in ("mean", "median", "p99")]
        lines.append(f"{name.upper():<16}" + "".join(f"{c:>12.2f}" if c is not None else f"{'-':>12}" for c in cells))
    for error in s.get("error_kinds", []):
        lines.append(f"error: {error}")
    return "\n".join(lines)


def plot_sweep(runs: list[dict], path: Path) -> None:
    """P50/P99 TTFT and E2EL against the offered (left) and achieved (right) request rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    xs = {"offered": [r["request_rate"] for r in runs], "achieved": [r["request_throughput"] for r in runs]}
    for ax, (label, x) in zip(axes, xs.items(), strict=True):
        for key, style, color in (
            ("p50_ttft", "o-", "tab:blue"),
            ("p99_ttft", "o--", "tab:blue"),
            ("p50_e2el", "s-", "tab:red"),
            ("p99_e2el", "s--", "tab:red"),
        ):
            y = [r[f"{key}_ms"] if r[f"{key}_ms"] is not None else math.nan for r in runs]
            ax.plot(x, y, style, color=color, label=key.replace("_", " ").upper())
        ax.set_xlabel(f"{label} request rate (req/s)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (ms)")
    axes[0].legend()
    fig.suptitle(f"{runs[0]['model']}: latency against load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument("--base-url", default=d.base_url, help=f"server root (default {d.base_url})")
    p.add_argument("--endpoint", default=d.endpoint, help=f"{d.endpoint} (default) or /v1/chat/completions")
    p.add_argument("--model", help="model name to send (default: the first listed at /v1/models)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts, help=f"requests (default {d.num_prompts})")
    p.add_argument("--input-len", type=int, default=d.input_len, help=f"prompt tokens (default {d.input_len})")
    p.add_argument("--output-len", type=int, default=d.output_len, help=f"max_tokens (default {d.output_len})")
    p.add_argument(
        "--prompt-unit",
        choices=["byte", "word"],
        default=d.prompt_unit,
        help="byte: ASCII bytes, exact for byte tokenizers; word: common English words, about one BPE token each",
    )
    p.add_argument("--request-rate", type=float, default=d.request_rate, help="requests/s offered (default inf)")
    p.add_argument("--burstiness", type=float, default=d.burstiness, help="gamma shape; 1 = Poisson (default)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    p.add_argument("--temperature", type=float, default=d.temperature, help="default 0 (greedy)")
    p.add_argument("--ignore-eos", action="store_true", help="also send ignore_eos: true (vLLM extension)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--goodput", nargs="+", metavar="KEY:VALUE", help="SLOs, e.g. ttft:200ms tpot:50ms e2el:2s")
    p.add_argument("--warmup", type=int, default=d.warmup, help="uncounted requests sent first (default 0)")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per request (default 600)")
    p.add_argument("--sweep", help="comma-separated request rates: one run each, and a PNG of latency against load")
    p.add_argument("--output-json", help="write the results here (default: print only)")
    p.add_argument("--plot", help="sweep PNG path (default: OUTPUT_JSON with .png, else bench_sweep.png)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf sends everything at once), got {args.request_rate}")
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness must be > 0, got {args.burstiness}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if not args.endpoint.startswith("/"):
        raise ValueError(f"--endpoint must start with '/', got {args.endpoint!r}")
    return BenchConfig(
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=args.model,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        prompt_unit=args.prompt_unit,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        goodput=parse_goodput(args.goodput),
        warmup=args.warmup,
        timeout_s=args.timeout,
    )


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--sweep {text!r}: expected comma-separated numbers, e.g. 1,2,4,8") from None
    if not rates or not all(0 < r < math.inf for r in rates):
        raise ValueError(f"--sweep {text!r}: rates must be finite numbers > 0")
    return rates


def main(args: argparse.Namespace) -> int:
    """`jaxdeep bench serve`: 0 on success, 1 when every request failed, 2 on bad arguments."""
    try:
        cfg = config_from_args(args)
        rates = parse_rates(args.sweep) if args.sweep else None
    except ValueError as e:
        print(f"jaxdeep bench serve: {e}", file=sys.stderr)
        return 2
    runs = []
    try:
        for rate in rates or [cfg.request_rate]:
            run_cfg = BenchConfig(**{**asdict(cfg), "request_rate": rate})
            summary = asyncio.run(run_benchmark(run_cfg))
            print(format_summary(summary), flush=True)
            runs.append(summary)
    except (_aiohttp().ClientError, OSError, RuntimeError) as e:
        print(f"jaxdeep bench serve: cannot benchmark {cfg.base_url}: {e}", file=sys.stderr)
        return 1
    result = {"config": {**asdict(cfg), "request_rate": [r["request_rate"] for r in runs]}, "runs": runs}
    if args.output_json:
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_strict_json(result), indent=1, allow_nan=False))
        print(f"wrote {path}")
    if rates:
        plot = Path(
            args.plot or (Path(args.output_json).with_suffix(".png") if args.output_json else "bench_sweep.png")
        )
        plot_sweep(runs, plot)
        print(f"wrote {plot}")
    return 0 if any(r["completed"] for r in runs) else 1


def _strict_json(x):
    """JSON has no infinity: an infinite rate is written as the string "inf"."""
    if isinstance(x, dict):
        return {k: _strict_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_strict_json(v) for v in x]
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x
