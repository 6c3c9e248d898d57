"""The OpenAI-compatible server over real HTTP on localhost: the official `openai` client, server-sent events,
Prometheus metrics, bad input, a full queue and clients that leave."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace
from urllib.parse import urlparse

import jax
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxdeep import cli
from jaxdeep.serve.api import EngineStats, GenerationRequest, SamplingParams
from jaxdeep.serve.metrics import ServerMetrics
from jaxdeep.serve.protocol import apply_chat_template
from jaxdeep.serve.server import BackgroundServer, OpenAIServer
from tests.helpers import TINY
from tests.serve_fixtures import (
    MAX_CONTEXT,
    MAX_WAITING,
    NUM_SLOTS,
    ONE_DEVICE,
    REPO,
    get_text,
    post,
    shared_server,
    wait_for,
)

PROMPT = "def main():\n"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a loop."}]


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(server):
    return server.server.model_name


def scrape(server) -> dict[str, float]:
    """Every sample of /metrics, keyed `name{label=value,...}`; parsing fails loudly on a malformed page."""
    samples = {}
    for family in text_string_to_metric_families(get_text(server.url + "/metrics")):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def test_models_lists_the_served_model(client, model):
    assert [m.id for m in client.models.list().data] == [model]


def test_completion_whole_and_streamed_agree(client, model):
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0.0)
    whole = client.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(PROMPT.encode())
    assert 1 <= whole.usage.completion_tokens <= 12
    if choice.finish_reason == "length":
        assert whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text  # greedy: the same tokens, whether streamed or not
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completion_accepts_token_ids_and_a_list_of_one_prompt(client, model):
    by_text = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0.0)
    by_ids = client.completions.create(model=model, prompt=list(PROMPT.encode()), max_tokens=4, temperature=0.0)
    by_list = client.completions.create(model=model, prompt=[PROMPT], max_tokens=4, temperature=0.0)
    assert by_text.choices[0].text == by_ids.choices[0].text == by_list.choices[0].text


def test_chat_whole_and_streamed(client, model):
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=10, temperature=0)
    message = whole.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(apply_chat_template(MESSAGES).encode())
    assert 1 <= whole.usage.completion_tokens <= 10

    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage


def test_stream_is_server_sent_events_ending_with_done(server, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    url = urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type").startswith("text/event-stream")
        events = response.read().decode()
    finally:
        connection.close()
    assert events.endswith("data: [DONE]\n\n")
    lines = events.split("\n\n")[:-1]
    assert all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == model for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_metrics_parse_and_move(server, client, model):
    before = scrape(server)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"jaxdeep:{name}" in before
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=32, temperature=0.0)
    finish = whole.choices[0].finish_reason
    after = scrape(server)

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("jaxdeep:prompt_tokens_total") == whole.usage.prompt_tokens
    assert delta("jaxdeep:generation_tokens_total") == whole.usage.completion_tokens
    assert delta(f"jaxdeep:request_success_total{{finished_reason={finish}}}") == 1
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert delta(f"jaxdeep:{histogram}_count") == 1
        assert delta(f"jaxdeep:{histogram}_sum") > 0
    gaps = delta("jaxdeep:inter_token_latency_seconds_count")  # an end-of-sequence token has no text event
    assert gaps == whole.usage.completion_tokens - 1 if finish == "length" else gaps <= whole.usage.completion_tokens
    assert delta("jaxdeep:request_time_per_output_token_seconds_count") == 1
    assert after["jaxdeep:num_requests_running"] == 0
    assert delta("jaxdeep:decode_batch_size_count") >= 1  # sampled while the request ran
    # A lone request: one launch per chunk of its prompt.
    assert delta("jaxdeep:prefill_calls_total") == delta("jaxdeep:prefill_chunks_total") >= 1
    assert after["jaxdeep:decode_batch_size_sum"] >= after["jaxdeep:decode_batch_size_count"]  # batches of >= 1


BAD = [
    ("completions", b"{not json", 400, "body"),
    ("completions", [1, 2], 400, "body"),
    ("completions", {}, 400, "prompt"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": "x" * MAX_CONTEXT}, 400, "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": MAX_CONTEXT}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "hi", "top_k": -3}, 400, "top_k"),
    ("completions", {"prompt": "hi", "seed": 1.5}, 400, "seed"),
    ("completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    (
        "completions",
        {"prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}},
        400,
        "stream_options.include_usage",
    ),
    ("completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("completions", {"prompt": "hi", "logit_bias": {"65": 10}}, 400, "logit_bias"),
    ("completions", {"prompt": "hi", "ignore_eos": "yes"}, 400, "ignore_eos"),
    ("chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("completions", {"prompt": "hi", "model": "gpt-nothing"}, 404, "model"),
    ("chat/completions", {}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x" * MAX_CONTEXT}]}, 400, "messages"),
    ("chat/completions", {"messages": MESSAGES, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_field(server, route, body, status, param):
    code, answer = post(f"{server.url}/v1/{route}", body)
    assert code == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_unknown_route_answers_json(server):
    code, answer = post(f"{server.url}/v1/embeddings", {"input": "x"})
    assert code == 404 and answer["error"]["message"]


# ---- capacity and clients that leave ----------------------------------------------------------------------------


def _request(host: str, port: int, body: dict) -> socket.socket:
    """Send one POST /v1/completions on a raw socket and leave the answer unread."""
    data = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock = socket.create_connection((host, port), timeout=60)
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _long(model: str, stream: bool = True) -> dict:
    # Greedy, and as long as the context allows, so it holds its slot while the test looks.
    return {"model": model, "prompt": PROMPT, "max_tokens": MAX_CONTEXT - 16, "temperature": 0, "stream": stream}


def _wait_idle(engine) -> None:
    wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0, what="an idle engine")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_client_that_disconnects_frees_its_slot(server, model, stream):
    engine = server.server.engine
    _wait_idle(engine)
    aborts = scrape(server).get("jaxdeep:request_success_total{finished_reason=abort}", 0)
    host, port = urlparse(server.url).hostname, urlparse(server.url).port
    sock = _request(host, port, _long(model, stream))
    received = b""
    while stream and b"data: " not in received:  # the answer has started
        received += sock.recv(65536)
    wait_for(lambda: engine.stats().running == 1, what="the request to take a slot")
    sock.close()
    wait_for(lambda: engine.stats().running == 0, timeout=10, what="the slot to be freed")
    assert scrape(server)["jaxdeep:request_success_total{finished_reason=abort}"] == aborts + 1


def test_a_waiting_request_whose_client_goes_leaves_the_queue_without_handler_cancellation(server, model):
    """With aiohttp's handler cancellation off, nothing cancels a handler whose client has gone: a request waiting for
    a slot gets no events, and only its watchdog (`server._watch`) notices and cancels it in the engine."""
    engine = server.server.engine
    _wait_idle(engine)
    plain = BackgroundServer(OpenAIServer(engine), handler_cancellation=False)
    host, port = urlparse(plain.url).hostname, urlparse(plain.url).port
    held, started, lock = threading.Event(), set(), threading.Lock()
    holders = [
        GenerationRequest(f"holder{i}", [1, 2, 3], SamplingParams(max_tokens=MAX_CONTEXT - 8)) for i in range(NUM_SLOTS)
    ]

    def hold(request_id: str):
        # Once every holder has had a token, the engine's thread waits in a callback: the slots stay taken. (Waiting
        # at the first token would stall the engine before it admits holders that arrive in a later step.)
        def callback(event) -> None:
            with lock:
                started.add(request_id)
                all_started = len(started) == NUM_SLOTS
            if all_started:
                held.wait(30)

        return callback

    try:
        for r in holders:
            engine.submit(r, hold(r.request_id))
        wait_for(lambda: engine.stats().running == NUM_SLOTS, what="every slot taken")
        waiting = _request(host, port, _long(model))
        wait_for(lambda: engine.stats().waiting == 1, what="a waiting request")
        waiting.close()
        wait_for(lambda: engine.stats().waiting == 0, timeout=5, what="the waiting request cancelled")
    finally:
        held.set()
        for r in holders:
            engine.cancel(r.request_id)
        _wait_idle(engine)
        plain.close()


def test_full_queue_answers_429(server, model):
    engine = server.server.engine
    _wait_idle(engine)
    host, port = urlparse(server.url).hostname, urlparse(server.url).port
    holders = []
    try:
        for _ in range(NUM_SLOTS):
            holders.append(_request(host, port, _long(model)))
        wait_for(lambda: engine.stats().running == NUM_SLOTS, what="every slot taken")
        for _ in range(MAX_WAITING):
            holders.append(_request(host, port, _long(model)))
        wait_for(lambda: engine.stats().waiting == MAX_WAITING, what="a full queue")
        code, answer = post(f"{server.url}/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 2})
        assert code == 429, answer
        assert answer["error"]["code"] == "queue_full"
    finally:
        for sock in holders:
            sock.close()
    wait_for(lambda: engine.stats().running == 0 and engine.stats().waiting == 0, timeout=10, what="slots freed")


# ---- the command line ---------------------------------------------------------------------------------------------


def test_cli_serve_refuses_bad_targets(capsys):
    assert cli.main(["serve", "no/such/experiment.yaml"]) == 2
    assert cli.main(["serve", str(REPO / "experiments" / "quickstart.yaml"), "model.no_such_key=1"]) == 2
    assert cli.main(["serve", str(REPO / "experiments" / "quickstart.yaml"), "--num-slots", "0"]) == 2
    assert cli.main(["serve", str(REPO / "experiments" / "quickstart.yaml"), "--decode-steps", "0"]) == 2
    assert cli.main(["serve", str(REPO / "experiments" / "quickstart.yaml"), "--prefill-rows", "0"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no_such_key" in err and "--num-slots" in err and "--decode-steps" in err
    assert "--prefill-rows must be >= 1, got 0" in err


def test_cli_serve_hands_engine_options_over(monkeypatch):
    """`jaxdeep serve`'s engine flags reach `load_engine`: --concurrent-kernels on asks the engine for it; off,
    the default, leaves the engine's default (off)."""
    from jaxdeep.serve import loading

    seen = []

    def load_engine(target, overrides, **options):
        seen.append(options)
        raise ValueError("stop here")

    monkeypatch.setattr(loading, "load_engine", load_engine)
    monkeypatch.setattr(cli, "_start_jax", lambda cfg, args: None)  # it would set JAX_PLATFORMS for the session
    quickstart = str(REPO / "experiments" / "quickstart.yaml")
    assert cli.main(["serve", quickstart, "--concurrent-kernels", "off", "--prefill-rows", "2"]) == 2
    assert cli.main(["serve", quickstart, "--concurrent-kernels", "on"]) == 2
    assert cli.main(["serve", quickstart]) == 2
    assert seen == [{"prefill_rows": 2}, {"concurrent_kernels": True}, {}]


@pytest.mark.slow
def test_cli_serve_end_to_end(tmp_path):
    """`jaxdeep serve` in a subprocess: it comes up, answers the openai client, and stops cleanly on Ctrl-C."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI sets the device count itself
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    tiny = [o for o in TINY if o.startswith("model.")] + ONE_DEVICE
    command = [sys.executable, "-m", "jaxdeep.cli", "serve", str(REPO / "experiments" / "quickstart.yaml"), *tiny]
    command += ["--port", str(port), "--num-slots", "2", "--max-context", "64", "--served-model-name", "tiny"]
    command += ["--decode-steps", "2"]
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:

        def up() -> bool:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return json.loads(get_text(f"http://127.0.0.1:{port}/health"))["status"] == "ok"
            except OSError:
                return False

        wait_for(up, timeout=240, what="the server to come up")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="tiny", prompt="import os\n", max_tokens=5)
        assert out.model == "tiny" and out.usage.prompt_tokens == 10 and out.choices[0].finish_reason
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_gpu_gauges_from_nvml(monkeypatch):
    """NVML is read through `pynvml` when it imports (here a stand-in for two GPUs); without it, no gpu gauges."""

    stats = lambda: EngineStats(running=1, waiting=2, cache_usage=0.25, batch_size=1, max_context=64)
    nvml = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=40 + h),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=1000 * (h + 1), total=8000),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    page = ServerMetrics(stats).exposition().decode()
    samples = {(s.name, s.labels.get("gpu")): s.value for f in text_string_to_metric_families(page) for s in f.samples}
    assert samples[("jaxdeep:gpu_utilization_perc", "1")] == pytest.approx(0.41)
    assert samples[("jaxdeep:gpu_memory_used_bytes", "0")] == 1000
    assert samples[("jaxdeep:gpu_memory_total_bytes", "1")] == 8000
    assert samples[("jaxdeep:num_requests_waiting", None)] == 2
    assert samples[("jaxdeep:kv_cache_usage_perc", None)] == 0.25

    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now fails
    page = ServerMetrics(stats).exposition().decode()
    assert "jaxdeep:gpu_" not in page and "jaxdeep:num_requests_running 1.0" in page
    assert "jaxdeep:device_memory" not in page  # CPU devices report no memory_stats()


def test_device_memory_gauges_from_jax(monkeypatch):

    memory = {"bytes_in_use": 5.0, "peak_bytes_in_use": 7.0, "bytes_limit": 9.0}
    gpu = SimpleNamespace(platform="gpu", id=3, memory_stats=lambda: memory)
    monkeypatch.setattr(jax, "local_devices", lambda: [gpu])
    page = ServerMetrics(lambda: EngineStats(0, 0, 0.0, 0, 64), gpu=True).exposition().decode()
    for name, value in (("in_use", 5), ("peak", 7), ("limit", 9)):
        assert f'jaxdeep:device_memory_{name}_bytes{{device="gpu:3"}} {value}.0' in page


def test_time_to_first_token_is_observed_when_the_first_token_comes():
    from jaxdeep.serve.api import TokenEvent
    from jaxdeep.serve.server import _Tracker

    seen = []
    tracker = _Tracker(10.0, 3, seen.append)
    tracker.record(10.5, TokenEvent("r", 7, "a"))
    assert seen == [0.5]  # at once, not when the request ends
    tracker.record(10.7, TokenEvent("r", 8, "b"))
    tracker.record(10.9, TokenEvent("r", None, "", finished=True, finish_reason="length", completion_tokens=2))
    assert seen == [0.5]
    # A first token that is eos has no event of its own: the final event brings it.
    eos_first = []
    tracker = _Tracker(1.0, 3, eos_first.append)
    tracker.record(1.25, TokenEvent("r", None, "", finished=True, finish_reason="stop", completion_tokens=1))
    assert eos_first == [0.25]
    # A request aborted before any token has no time to first token.
    none = []
    _Tracker(1.0, 3, none.append).record(2.0, TokenEvent("r", None, "", finished=True, finish_reason="abort"))
    assert none == []


def test_neutral_values_of_unsupported_fields_are_accepted(server):
    body = {"prompt": "hi", "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}}
    code, answer = post(f"{server.url}/v1/completions", body)
    assert code == 200, answer


def test_ignore_eos_reaches_the_engine():
    from jaxdeep.serve.protocol import parse_request
    from jaxdeep.serve.tokenizers import ByteTokens

    stats = EngineStats(running=0, waiting=0, cache_usage=0.0, batch_size=0, max_context=64)
    parsed = parse_request({"prompt": "a", "ignore_eos": True}, "completion", ByteTokens(), stats)
    assert parsed.params.ignore_eos is True
    assert parse_request({"prompt": "a"}, "completion", ByteTokens(), stats).params.ignore_eos is False


def test_chat_uses_the_models_own_template(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    from jaxdeep.serve.protocol import parse_request
    from jaxdeep.serve.tokenizers import HFTokens

    words = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(16)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}w9"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    stats = EngineStats(running=0, waiting=0, cache_usage=0.0, batch_size=0, max_context=64)
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "w5 w6"}]}]}
    parsed = parse_request(body, "chat", HFTokens(tmp_path), stats)
    assert parsed.prompt_tokens == [1, 5, 6, 9]  # "user" is not a word of this vocabulary: unk (w1)


def test_relay_delivers_every_event_in_order_with_one_wakeup_per_burst():
    """Events posted from another thread reach their queues on the loop in order, and a burst of them posted while
    the loop is busy (a decode step's tokens for many requests, while the loop serves others) wakes it once."""
    import asyncio

    from jaxdeep.serve.server import _Relay

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        wakeups = []

        class Counting:  # the real loop, with its thread-safe calls counted
            def call_soon_threadsafe(self, *args):
                wakeups.append(1)
                return loop.call_soon_threadsafe(*args)

        async def queues():
            return [asyncio.Queue() for _ in range(8)]

        async def drained(n):
            while sum(q.qsize() for q in qs) < n:
                await asyncio.sleep(0.001)
            return [[q.get_nowait() for _ in range(q.qsize())] for q in qs]

        qs = asyncio.run_coroutine_threadsafe(queues(), loop).result()
        relay = _Relay(Counting())
        for burst in range(2):
            busy = threading.Event()
            loop.call_soon_threadsafe(busy.wait)  # the loop is held until the burst is posted
            for step in range(25):  # 25 steps of 8 requests' tokens, posted back to back
                for i, q in enumerate(qs):
                    relay.post(q, (burst, step, i))
            busy.set()
            got = asyncio.run_coroutine_threadsafe(drained(200), loop).result(timeout=10)
            assert got == [[(burst, step, i) for step in range(25)] for i in range(8)]
            assert len(wakeups) == burst + 1
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
