"""OpenAI-compatible HTTP server (aiohttp) over an `Engine`.

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`.
Streaming answers are server-sent events (`data: {chunk}\\n\\n` ... `data: [DONE]\\n\\n`) in OpenAI's chunk format;
whole answers carry `usage` and `finish_reason`. The request format, what is refused and the chat template are
described in `jaxdeep/serve/protocol.py`; the metrics in `jaxdeep/serve/metrics.py`.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`:
400 `invalid_request_error` naming the field (bad JSON, missing or wrong-typed field, prompt longer than the
context, impossible sampling values); 404 `invalid_request_error`/`model_not_found` for another model's name;
429 `rate_limit_error`/`queue_full` when the engine's waiting queue is full; 503 `server_error` once the engine is
closed. A client that goes away before its answer is complete has its request cancelled in the engine, which
frees its cache slot.

The engine calls back from its own thread; each callback hands its event to the event loop, into the request's
`asyncio.Queue`, through one `_Relay` per server, which wakes the loop once for all the events posted before the
loop gets to them (a step's tokens for every request), not once per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from typing import Any

from aiohttp import web

from jaxdeep.serve import protocol
from jaxdeep.serve.api import Engine, GenerationRequest, QueueFull, RequestError, TokenEvent
from jaxdeep.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.5  # how often a request's watchdog checks that its client is still there
_GONE = object()  # what a request's watchdog puts in its event queue once its client has gone


class _Relay:
    """Events from the engine's thread to queues on the event loop, in order, with one `call_soon_threadsafe` for
    all those posted before the loop takes them. One per event, each a write that wakes the loop, cost the engine's
    thread 224-267 µs for a step of 64 requests on a CPU host; this way 43 µs (experiments/benchmarks/RESULTS.md)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:  # engine thread
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:  # a flush is on its way and takes this one too
                return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # event loop
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)


class OpenAIServer:
    """The HTTP layer of one engine; `app()` builds the aiohttp application."""

    def __init__(
        self,
        engine: Engine,
        *,
        served_model_name: str | None = None,
        metrics: ServerMetrics | None = None,
        batch_sample_interval: float = 0.1,
        close_engine_on_cleanup: bool = False,
    ):
        self.engine = engine
        self.model_name = served_model_name or engine.model_name
        self.metrics = metrics or ServerMetrics(engine.stats)
        self.batch_sample_interval = batch_sample_interval  # seconds between decode batch size samples
        self.close_engine_on_cleanup = close_engine_on_cleanup
        self.created = protocol.now()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._json_errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.scrape)
        app.cleanup_ctx.append(self._background)
        return app

    # ---- simple routes ----------------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        model = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "jaxdeep",
            "max_model_len": self.engine.stats().max_context,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def health(self, request: web.Request) -> web.Response:
        s = self.engine.stats()
        return web.json_response({"status": "ok", "running": s.running, "waiting": s.waiting})

    async def scrape(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        body = await asyncio.get_running_loop().run_in_executor(None, self.metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- generation ---------------------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        arrival = time.perf_counter()
        try:
            body = json.loads(await request.read())  # whatever the Content-Type says (curl -d sends a form type)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return self._error(400, f"the body is not valid JSON: {e}", "body")
        try:
            parsed = protocol.parse_request(body, kind, self.engine.tokenizer, self.engine.stats())
        except RequestError as e:
            return self._error(400, str(e), e.field)
        if parsed.model is not None and parsed.model != self.model_name:
            return self._error(
                404,
                f"the model {parsed.model!r} does not exist; this server serves {self.model_name!r}",
                "model",
                code="model_not_found",
            )

        events: asyncio.Queue[tuple[float, TokenEvent]] = asyncio.Queue()
        relay = self._relay

        def on_event(event: TokenEvent) -> None:  # engine thread
            relay.post(events, (time.perf_counter(), event))

        request_id = protocol.new_request_id(kind)
        try:
            self.engine.submit(GenerationRequest(request_id, parsed.prompt_tokens, parsed.params), on_event)
        except RequestError as e:
            field = e.field
            if field in ("prompt", "prompt_tokens"):
                field = "messages" if kind == "chat" else "prompt"
            return self._error(400, str(e), field)
        except QueueFull as e:
            return self._error(
                429, f"the server is busy: {e or 'the waiting queue is full'}; retry later", None,
                err_type="rate_limit_error", code="queue_full",
            )  # fmt: skip
        except RuntimeError as e:  # the engine is closed (shutting down)
            return self._error(503, f"the engine is not accepting requests: {e}", None, err_type="server_error")

        tracker = _Tracker(arrival, len(parsed.prompt_tokens), self.metrics.observe_first_token)
        watchdog = asyncio.create_task(_watch(request, events))
        try:
            if parsed.stream:
                return await self._stream(request, request_id, parsed, events, tracker)
            return await self._whole(request, request_id, parsed, events, tracker)
        except ConnectionResetError:  # the client went away while waiting for a whole answer
            log.info("client of %s disconnected", request_id)
            return web.Response(status=499)
        finally:
            watchdog.cancel()
            if not tracker.finished:
                self.engine.cancel(request_id)
                tracker.finish_reason = "abort"
            self.metrics.observe_request(
                arrival,
                tracker.token_times,
                tracker.end or time.perf_counter(),
                tracker.prompt_tokens,
                tracker.completion_tokens,
                tracker.finish_reason,
            )

    async def _next(self, request: web.Request, events: asyncio.Queue, tracker: _Tracker) -> TokenEvent:
        """The next event of this request; raises ConnectionResetError when its client has gone.

        Besides aiohttp's handler cancellation (on with `run_server` and `BackgroundServer`), the connection is
        checked at every event, and by the request's watchdog (`_watch`) every DISCONNECT_POLL_S, which wakes this
        wait while no event comes (a request waiting for a slot). A timeout around each wait did the same for about
        7 µs more per event on a CPU host, where the wait itself takes 7.4."""
        t, event = await events.get()
        if event is _GONE:
            raise ConnectionResetError("the client disconnected")
        tracker.record(t, event)
        if _client_gone(request):
            raise ConnectionResetError("the client disconnected")
        return event

    async def _whole(self, request, request_id, parsed, events, tracker) -> web.Response:
        parts = []
        while not tracker.finished:
            event = await self._next(request, events, tracker)
            parts.append(event.text)
        usage = protocol.usage(tracker.prompt_tokens, tracker.completion_tokens)
        body = protocol.response(
            parsed.kind, request_id, self.model_name, protocol.now(), "".join(parts), tracker.finish_reason, usage
        )
        return web.json_response(body)

    async def _stream(self, request, request_id, parsed, events, tracker) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = protocol.now()
        kind, model, usage_field = parsed.kind, self.model_name, parsed.include_usage

        async def send(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
            await response.write(f"data: {data}\n\n".encode())

        try:
            if kind == "chat":
                await send(
                    protocol.chunk(kind, request_id, model, created, "", first=True, with_usage_field=usage_field)
                )
            while not tracker.finished:
                event = await self._next(request, events, tracker)
                if event.text:
                    await send(
                        protocol.chunk(kind, request_id, model, created, event.text, with_usage_field=usage_field)
                    )
            text = None if kind == "chat" else ""
            await send(
                protocol.chunk(
                    kind, request_id, model, created, text, tracker.finish_reason, with_usage_field=usage_field
                )
            )
            if parsed.include_usage:
                usage = protocol.usage(tracker.prompt_tokens, tracker.completion_tokens)
                await send(protocol.usage_chunk(kind, request_id, model, created, usage))
            await send("[DONE]")
            await response.write_eof()
        except ConnectionResetError:  # the client went away; the caller cancels the request in the engine
            log.info("client of %s disconnected", request_id)
        return response

    # ---- errors and background work ----------------------------------------------------------------------------

    def _error(
        self, status: int, message: str, param: str | None, *, err_type: str = "invalid_request_error", code=None
    ) -> web.Response:
        self.metrics.request_errors.labels(str(status)).inc()
        return web.json_response(protocol.error_body(message, param, err_type, code), status=status)

    @web.middleware
    async def _json_errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Unknown routes and wrong methods answer in the same JSON error shape as everything else."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return self._error(e.status, f"{request.method} {request.path}: {e.reason}", None)
        except Exception:
            log.exception("request %s %s failed", request.method, request.path)
            return self._error(500, "internal server error", None, err_type="server_error")

    async def _background(self, app: web.Application):
        self._relay = _Relay(asyncio.get_running_loop())
        task = asyncio.create_task(self._sample_batch_size())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self.close_engine_on_cleanup:
            self.engine.close()

    async def _sample_batch_size(self) -> None:
        while True:
            await asyncio.sleep(self.batch_sample_interval)
            try:
                stats = self.engine.stats()
            except Exception:  # never let a failing stats() kill the sampler
                log.exception("engine.stats() failed")
                continue
            if stats.running > 0 and stats.batch_size > 0:
                self.metrics.batch_size.observe(stats.batch_size)


async def _watch(request: web.Request, events: asyncio.Queue) -> None:
    """Every DISCONNECT_POLL_S, check the request's connection; once its client has gone, put `_GONE` in its event
    queue, which wakes its handler."""
    while True:
        await asyncio.sleep(DISCONNECT_POLL_S)
        if _client_gone(request):
            events.put_nowait((time.perf_counter(), _GONE))
            return


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class _Tracker:
    """What one request has produced so far: token arrival times, usage, finish."""

    def __init__(self, arrival: float, prompt_tokens: int, on_first_token=None):
        self.arrival = arrival
        self.on_first_token = on_first_token  # called once with the time to first token, when it comes
        self.token_times: list[float] = []
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finished = False
        self.finish_reason: str | None = None
        self.end: float | None = None

    def record(self, t: float, event: TokenEvent) -> None:
        # The first token may be eos, which has no event of its own: the final event then counts it.
        first = not self.token_times and not self.finished and (event.token is not None or event.completion_tokens)
        if first and self.on_first_token is not None:
            self.on_first_token(t - self.arrival)
        if event.token is not None:
            self.token_times.append(t)
            self.completion_tokens += 1
        if event.finished:
            self.finished = True
            self.finish_reason = event.finish_reason or "stop"
            self.end = t
            if event.prompt_tokens:  # the engine's usage, when it reports it
                self.prompt_tokens = event.prompt_tokens
            if event.completion_tokens:
                self.completion_tokens = event.completion_tokens


def run_server(server: OpenAIServer, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C); the engine is closed on the way out."""
    server.close_engine_on_cleanup = True
    web.run_app(
        server.app(),
        host=host,
        port=port,
        handler_cancellation=True,
        access_log=None,
        print=lambda msg: log.info("%s", msg.strip()),
    )


class BackgroundServer:
    """The server on its own event loop in a daemon thread: for tests and notebooks. `port=0` picks a free port;
    `handler_cancellation=False` leaves a handler running when its client goes, as aiohttp's own default does.

    >>> with BackgroundServer(OpenAIServer(engine)) as s:
    ...     print(s.url)  # http://127.0.0.1:PORT
    """

    def __init__(self, server: OpenAIServer, host: str = "127.0.0.1", port: int = 0, handler_cancellation=True):
        self.server = server
        self.host = host
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="jaxdeep-http", daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(server.app(), handler_cancellation=handler_cancellation, access_log=None)
        self.port = asyncio.run_coroutine_threadsafe(self._start(port), self.loop).result(timeout=60)
        self.url = f"http://{host}:{self.port}"

    async def _start(self, port: int) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, port)
        await site.start()
        return self.runner.addresses[0][1]

    def close(self) -> None:
        if not self.loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
