"""`jaxdeep bench serve` against our own server on localhost, and its arrival, prompt and SLO helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jaxdeep import cli
from jaxdeep.serve import bench
from tests.serve_fixtures import NUM_SLOTS, shared_server

# The shared engine queues few requests (its full-queue test needs that): never send more than it has slots,
# so that even while finished requests are leaving, new ones find room in the queue.
HOLDS = str(NUM_SLOTS)


@pytest.fixture(scope="module")
def server():
    return shared_server()


def test_short_run_reports_sane_numbers(server, tmp_path, capsys):
    out = tmp_path / "bench.json"
    n, input_len, output_len = 6, 12, 8
    argv = ["bench", "serve", "--base-url", server.url, "--num-prompts", str(n), "--input-len", str(input_len)]
    argv += [
        "--output-len",
        str(output_len),
        "--request-rate",
        "40",
        "--max-concurrency",
        HOLDS,
        "--goodput",
        "ttft:60s",
        "e2el:60s",
    ]
    assert cli.main([*argv, "--output-json", str(out)]) == 0
    assert "request throughput" in capsys.readouterr().out

    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["completed"] == n and run["failed"] == 0
    assert run["model"] == server.server.model_name and run["request_rate"] == 40
    assert run["total_input_tokens"] == n * input_len  # byte prompts: one token per byte, as the server counts
    assert n <= run["total_output_tokens"] <= n * output_len
    requests = run["requests"]
    assert len(requests["ttft_s"]) == n and not any(requests["errors"])
    assert all(0 < t <= e for t, e in zip(requests["ttft_s"], requests["e2el_s"], strict=True))
    assert sorted(requests["start_s"]) == requests["start_s"]  # sent in order, spread over the arrivals
    for name in ("ttft", "e2el", "tpot", "itl"):
        assert 0 < run[f"median_{name}_ms"] <= run[f"p99_{name}_ms"]
    assert run["p99_ttft_ms"] <= run["p99_e2el_ms"]
    assert run["duration_s"] >= max(requests["e2el_s"])
    assert run["request_throughput"] == pytest.approx(n / run["duration_s"])
    assert run["output_throughput"] == pytest.approx(run["total_output_tokens"] / run["duration_s"])
    assert run["good_requests"] == n  # generous SLOs
    assert run["goodput_slos_s"] == {"ttft": 60.0, "e2el": 60.0}


def test_impossible_slo_gives_zero_goodput_and_concurrency_cap_holds(server, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "serve", "--base-url", server.url, "--num-prompts", "4", "--input-len", "4", "--output-len", "4"]
    argv += ["--max-concurrency", "1", "--goodput", "ttft:1us", "--endpoint", "/v1/chat/completions"]
    assert cli.main([*argv, "--output-json", str(out)]) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert run["completed"] == 4 and run["good_requests"] == 0 and run["request_goodput"] == 0
    assert run["request_rate"] == "inf" and run["max_concurrency"] == 1
    # One at a time: each request starts after the previous one ended.
    starts, e2els = run["requests"]["start_s"], run["requests"]["e2el_s"]
    assert all(starts[i + 1] >= starts[i] + e2els[i] for i in range(3))


def test_sweep_writes_json_and_png(server, tmp_path):
    out = tmp_path / "sweep.json"
    argv = ["bench", "serve", "--base-url", server.url, "--num-prompts", "4", "--input-len", "4", "--output-len", "4"]
    assert cli.main([*argv, "--max-concurrency", HOLDS, "--sweep", "20,80", "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["request_rate"] for r in result["runs"]] == [20, 80]
    assert all(r["completed"] == 4 for r in result["runs"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreachable_server_and_bad_arguments(tmp_path, capsys):
    assert cli.main(["bench", "serve", "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"]) == 1
    assert cli.main(["bench", "serve", "--request-rate", "0"]) == 2
    assert cli.main(["bench", "serve", "--goodput", "latency:5ms"]) == 2
    assert cli.main(["bench", "serve", "--sweep", "1,x"]) == 2
    err = capsys.readouterr().err
    assert "cannot benchmark" in err and "--request-rate" in err and "latency:5ms" in err and "--sweep" in err


def test_parse_goodput_units():
    assert bench.parse_goodput(["ttft:200ms", "tpot:0.05s", "e2e:1500"]) == {
        "ttft": pytest.approx(0.2),
        "tpot": pytest.approx(0.05),
        "e2el": pytest.approx(1.5),
    }
    for bad in ("ttft", "ttft:fast", "ttft:-1ms", "itl:5ms"):
        with pytest.raises(ValueError, match="--goodput"):
            bench.parse_goodput([bad])


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_arrivals_have_the_asked_rate_and_burstiness(burstiness):
    cfg = bench.BenchConfig(num_prompts=20000, request_rate=5.0, burstiness=burstiness, seed=3)
    gaps = np.asarray(bench.arrival_gaps(cfg))
    assert gaps[0] == 0.0  # the first request goes at once
    gaps = gaps[1:]
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)  # gamma: CV = 1/sqrt(k)
    assert bench.arrival_gaps(bench.BenchConfig(num_prompts=3)) == [0.0, 0.0, 0.0]  # rate inf: all at once


def test_prompts_have_the_asked_length_and_repeat_with_the_seed():
    cfg = bench.BenchConfig(num_prompts=5, input_len=33, seed=1)
    prompts = bench.make_prompts(cfg)
    assert all(len(p.encode()) == 33 for p in prompts) and len(set(prompts)) == 5
    assert bench.make_prompts(cfg) == prompts
    words = bench.make_prompts(bench.BenchConfig(num_prompts=2, input_len=17, prompt_unit="word"))
    assert all(len(p.split(" ")) == 17 for p in words)
