"""Prometheus metrics of the HTTP server, on its own `CollectorRegistry` (scraped at `GET /metrics`).

Names follow vLLM's under a `jaxdeep:` prefix:

| metric | type | what |
|---|---|---|
| `jaxdeep:num_requests_running` | gauge | requests holding a KV-cache slot (engine, read at scrape time) |
| `jaxdeep:num_requests_waiting` | gauge | requests queued for a slot (engine, read at scrape time) |
| `jaxdeep:kv_cache_usage_perc` | gauge | fraction of the KV cache allocated to requests (whole slots), 0..1 |
| `jaxdeep:time_to_first_token_seconds` | histogram | request arrival to its first token |
| `jaxdeep:inter_token_latency_seconds` | histogram | gap between consecutive tokens of a request |
| `jaxdeep:request_time_per_output_token_seconds` | histogram | per request: (end - first token) / (tokens - 1) |
| `jaxdeep:e2e_request_latency_seconds` | histogram | request arrival to its last event |
| `jaxdeep:prompt_tokens_total` | counter | prompt tokens of finished requests |
| `jaxdeep:generation_tokens_total` | counter | generated tokens of finished requests |
| `jaxdeep:request_success_total{finished_reason}` | counter | finished requests by reason: stop, length, abort |
| `jaxdeep:request_errors_total{status}` | counter | requests refused with an HTTP error (400, 404, 429, ...) |
| `jaxdeep:decode_batch_size` | histogram | sequences per decode step, sampled while requests run (1) |
| `jaxdeep:prefill_calls_total` | counter | prefill launches (engine, read at scrape time) |
| `jaxdeep:prefill_chunks_total` | counter | prompt chunks they read (per launch: prompts per prefill launch) |
| `jaxdeep:gpu_utilization_perc{gpu}` | gauge | NVML GPU utilisation, 0..1 (2) |
| `jaxdeep:gpu_memory_used_bytes{gpu}` | gauge | NVML memory used |
| `jaxdeep:gpu_memory_total_bytes{gpu}` | gauge | NVML memory total |
| `jaxdeep:device_memory_in_use_bytes{device}` | gauge | jax `memory_stats()` bytes in use (devices that report it) |
| `jaxdeep:device_memory_peak_bytes{device}` | gauge | jax `memory_stats()` peak bytes in use |
| `jaxdeep:device_memory_limit_bytes{device}` | gauge | jax `memory_stats()` allocator limit |

(1) every `OpenAIServer.batch_sample_interval` seconds (0.1 by default) from `engine.stats().batch_size`.
(2) the `gpu_*` gauges appear only where `pynvml` imports and NVML finds GPUs; the `device_*` gauges only for
jax devices whose `memory_stats()` reports them (GPUs do, CPUs do not).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jaxdeep.serve.api import EngineStats

PREFIX = "jaxdeep:"
log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServerMetrics:
    """All metrics of one server; `stats` is read at scrape time for the gauges."""

    def __init__(self, stats: Callable[[], EngineStats], *, gpu: bool = True):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens.", buckets=ITL_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            PREFIX + "request_time_per_output_token_seconds",
            "Per request: time after the first token divided by the tokens after it.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Request latency end to end.", buckets=E2E_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens of finished requests.", registry=r
        )
        self.request_success = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.", ["finished_reason"], registry=r
        )
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(reason)
        self.request_errors = Counter(
            PREFIX + "request_errors", "Requests refused with an HTTP error, by status.", ["status"], registry=r
        )
        self.batch_size = Histogram(
            PREFIX + "decode_batch_size", "Sequences per decode step (sampled).", buckets=BATCH_BUCKETS, registry=r
        )
        r.register(_EngineCollector(stats))
        if gpu:
            r.register(_DeviceCollector())

    def observe_request(
        self, arrival: float, token_times: list[float], end: float, prompt_tokens: int, completion_tokens: int, reason
    ) -> None:
        """Record one finished request: `token_times` are the arrival times of its tokens (perf_counter). Its time
        to first token was recorded when that token came (`observe_first_token`)."""
        if token_times:
            for a, b in zip(token_times, token_times[1:], strict=False):
                self.itl.observe(b - a)
            if completion_tokens > 1:
                self.tpot.observe((end - token_times[0]) / (completion_tokens - 1))
        self.e2e.observe(end - arrival)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.request_success.labels(reason or "abort").inc()

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Requests holding a cache slot.", value=s.running)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests queued for a slot.", value=s.waiting)
        usage = "Fraction of the KV cache allocated to requests."
        yield GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", usage, value=s.cache_usage)
        yield CounterMetricFamily(PREFIX + "prefill_calls", "Prefill launches.", value=s.prefill_calls)
        chunks = "Prompt chunks read by prefill launches (one chunk of each prompt in a launch)."
        yield CounterMetricFamily(PREFIX + "prefill_chunks", chunks, value=s.prefill_chunks)


class _DeviceCollector(Collector):
    """GPU utilisation and memory through NVML when `pynvml` is importable; jax devices' `memory_stats()`."""

    def __init__(self):
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception as e:  # not installed, no driver, no GPU: these gauges are simply absent
            log.debug("NVML metrics off: %s", e)

    def collect(self) -> Iterator[Metric]:
        yield from self._nvml()
        yield from self._jax()

    def _nvml(self) -> Iterator[Metric]:
        if self.nvml is None:
            return
        nv = self.nvml
        util = GaugeMetricFamily(PREFIX + "gpu_utilization_perc", "GPU utilisation (NVML), 0..1.", labels=["gpu"])
        used = GaugeMetricFamily(PREFIX + "gpu_memory_used_bytes", "GPU memory used (NVML).", labels=["gpu"])
        total = GaugeMetricFamily(PREFIX + "gpu_memory_total_bytes", "GPU memory total (NVML).", labels=["gpu"])
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                rates = nv.nvmlDeviceGetUtilizationRates(handle)
                memory = nv.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([str(i)], rates.gpu / 100.0)
                used.add_metric([str(i)], float(memory.used))
                total.add_metric([str(i)], float(memory.total))
        except Exception as e:
            log.debug("NVML query failed: %s", e)
        yield from (util, used, total)

    def _jax(self) -> Iterator[Metric]:
        jax = sys.modules.get("jax")  # only report when the engine already runs jax in this process
        if jax is None:
            return
        fields = {
            "bytes_in_use": ("device_memory_in_use_bytes", "Device memory in use (jax memory_stats)."),
            "peak_bytes_in_use": ("device_memory_peak_bytes", "Peak device memory in use (jax memory_stats)."),
            "bytes_limit": ("device_memory_limit_bytes", "Device memory the allocator may use (jax memory_stats)."),
        }
        families = {k: GaugeMetricFamily(PREFIX + name, doc, labels=["device"]) for k, (name, doc) in fields.items()}
        try:
            devices = jax.local_devices()
        except Exception:
            return
        for device in devices:
            try:
                stats = device.memory_stats()
            except Exception:
                stats = None
            for key, family in families.items():
                if stats and key in stats:
                    family.add_metric([f"{device.platform}:{device.id}"], float(stats[key]))
        yield from (f for f in families.values() if f.samples)
