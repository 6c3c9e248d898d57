"""A plain PyTorch `transformers` `generate` server: the baseline of the serving benchmark (bench_serve_qps.py).

Loads a Hugging Face model directory with `AutoModelForCausalLM` (bf16 on CUDA by default) and answers the subset
of OpenAI's `POST /v1/completions` that `jaxdeep bench serve` uses, plus `GET /v1/models` and `GET /health`. Each
request is one `model.generate` call, **one request at a time**, first come first served: requests that arrive
while one is generating wait for it to finish. That is what a plain `generate` server is — no continuous
batching, no paged cache, no CUDA graphs — the before-picture against which `jaxdeep serve` is measured.

Request fields honoured: `prompt` (a string, a list of one string, or a list of token ids), `max_tokens`
(default 16), `temperature` (0 = greedy, the default of the benchmark), `top_p`, `top_k`, `seed`, `stream`,
`stream_options.include_usage`, `ignore_eos` (as vLLM and `jaxdeep serve`: generate exactly `max_tokens`).
Streaming answers are server-sent events, one chunk per generated token as soon as `generate` hands it to its
streamer (so the time to first token is real), then a chunk with `finish_reason`, an optional usage chunk and
`data: [DONE]`; the connection closes after each answer. A client that goes away is noticed while its request
waits (its socket is polled) and while it streams (the write fails), and its generation stops.

Tokenizer: `tokenizer.json` of the directory through `tokenizers` (special tokens added as the tokenizer says);
without one, a 256-token vocabulary is read as bytes (jaxdeep's byte tokenizer).

    python experiments/benchmarks/hf_generate_server.py HF_DIR --port 8001
"""

from __future__ import annotations

import argparse
import json
import logging
import select
import socket
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.streamers import BaseStreamer

log = logging.getLogger("hf_generate_server")


class ClientGone(Exception):
    """The client closed its connection: stop generating for it."""


class FifoTurn:
    """One generation at a time, in arrival order; a waiter gives up when `gone()` says its client left."""

    def __init__(self):
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self.busy = False

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def acquire(self, gone) -> None:
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self.busy or self._queue[0] is not ticket:
                self._cond.wait(timeout=0.5)
                if gone():
                    self._queue.remove(ticket)
                    self._cond.notify_all()
                    raise ClientGone()
            self._queue.popleft()
            self.busy = True

    def release(self) -> None:
        with self._cond:
            self.busy = False
            self._cond.notify_all()


class Tokens:
    def __init__(self, directory: Path, vocab_size: int):
        self._tok = None
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        elif vocab_size != 256:
            raise FileNotFoundError(f"{directory / 'tokenizer.json'} does not exist (and the vocabulary is not bytes)")

    def encode(self, text: str) -> list[int]:
        if self._tok is None:
            return list(text.encode("utf-8"))
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        if self._tok is None:
            return bytes(i for i in ids if i != 0).decode("utf-8", errors="replace")
        return self._tok.decode(ids, skip_special_tokens=True)


class TokenStreamer(BaseStreamer):
    """Hands each new token to `on_token` as `generate` produces it (the first `put` is the prompt)."""

    def __init__(self, on_token):
        self.on_token = on_token
        self.prompt_seen = False
        self.count = 0

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.count += 1
            self.on_token(int(token))

    def end(self):
        pass


class Generator:
    def __init__(self, directory: str, device: str, dtype: str, attn: str | None):
        self.directory = Path(directory)
        torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
        kwargs = (
            {"dtype": torch_dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": torch_dtype}
        )
        if attn:
            kwargs["attn_implementation"] = attn
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        self.model = model.to(device=device, dtype=torch_dtype).eval()
        self.device = device
        config = self.model.config
        self.vocab_size = config.vocab_size
        self.max_context = int(getattr(config, "max_position_embeddings", 4096) or 4096)
        self.tokens = Tokens(self.directory, self.vocab_size)
        eos = config.eos_token_id
        self.eos_id = eos[0] if isinstance(eos, list) and eos else eos
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else (self.eos_id or 0)
        self.turn = FifoTurn()

    def warm_up(self) -> None:
        self.generate([1, 2, 3, 4], max_tokens=4, temperature=0.0, ignore_eos=True, on_token=lambda t: None)

    def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        temperature: float,
        ignore_eos: bool,
        on_token,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> tuple[int, str]:
        """Generate for one request, calling `on_token(id)` per new token; (completion tokens, finish reason)."""
        sample = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens if ignore_eos else 0,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=top_k if sample and top_k > 0 else None,
            eos_token_id=None if ignore_eos else self.eos_id,
            pad_token_id=self.pad_id,
        )
        if sample and seed is not None:
            torch.manual_seed(seed)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        streamer = TokenStreamer(on_token)
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer
            )
        n = int(out.shape[1] - ids.shape[1])
        stopped = not ignore_eos and self.eos_id is not None and n > 0 and int(out[0, -1]) == self.eos_id
        return n, "stop" if stopped else "length"


def _client_gone(sock: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one answer per connection; a stream ends when the connection closes
    generator: Generator
    model_name: str

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.address_string(), *args)

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param: str | None = None) -> None:
        self._json(status, {"error": {"message": message, "type": "invalid_request_error", "param": param}})

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/health":
            turn = self.generator.turn
            self._json(200, {"status": "ok", "running": int(turn.busy), "waiting": turn.waiting()})
        elif self.path == "/v1/models":
            model = {"id": self.model_name, "object": "model", "owned_by": "transformers"}
            model["max_model_len"] = self.generator.max_context
            self._json(200, {"object": "list", "data": [model]})
        else:
            self._error(404, f"GET {self.path}: not found")

    def do_POST(self):  # noqa: N802
        if self.path != "/v1/completions":
            return self._error(404, f"POST {self.path}: not found (only /v1/completions)")
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            prompt_ids = self._prompt_ids(body.get("prompt"))
            max_tokens = int(body.get("max_tokens") or 16)
            temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        except (ValueError, TypeError) as e:
            return self._error(400, str(e))
        if body.get("model") not in (None, self.model_name):
            return self._error(404, f"the model {body['model']!r} does not exist; this serves {self.model_name!r}")
        if len(prompt_ids) + max_tokens > self.generator.max_context:
            return self._error(400, "prompt plus max_tokens exceeds the context", "max_tokens")
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        request_id = "cmpl-" + uuid.uuid4().hex
        created = int(time.time())
        options = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "ignore_eos": bool(body.get("ignore_eos", False)),
            "top_p": float(body.get("top_p") or 1.0),
            "top_k": int(body.get("top_k") or 0),
            "seed": body.get("seed"),
        }

        def chunk(text: str, finish_reason=None) -> dict:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            out = {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name}
            out["choices"] = [choice]
            return out

        gone = lambda: _client_gone(self.connection)
        turn = self.generator.turn
        try:
            turn.acquire(gone)
        except ClientGone:
            log.info("client of %s left while waiting", request_id)
            return None
        try:
            if not stream:
                ids: list[int] = []
                n, finish = self.generator.generate(prompt_ids, on_token=ids.append, **options)
                text = self.generator.tokens.decode(ids)
                usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}
                body = chunk(text, finish) | {"usage": usage}
                return self._json(200, body)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()

            def send(obj) -> None:
                data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
                try:
                    self.wfile.write(f"data: {data}\n\n".encode())
                    self.wfile.flush()
                except OSError as e:
                    raise ClientGone() from e

            decode = self.generator.tokens.decode

            def on_token(token: int) -> None:
                text = decode([token])
                if text:
                    send(chunk(text))

            n, finish = self.generator.generate(prompt_ids, on_token=on_token, **options)
            send(chunk("", finish))
            if include_usage:
                usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}
                send(chunk("") | {"choices": [], "usage": usage})
            send("[DONE]")
        except ClientGone:
            log.info("client of %s left while streaming", request_id)
        finally:
            turn.release()
        return None

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return self.generator.tokens.encode(prompt)
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and 0 <= t < self.generator.vocab_size for t in prompt)
        ):
            return list(prompt)
        raise ValueError("prompt must be a non-empty string or a list of token ids")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog: a burst of requests connects at once


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="Hugging Face model directory (config.json, safetensors, tokenizer.json)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--attn", default=None, help="attn_implementation (default: transformers' own choice, sdpa)")
    ap.add_argument("--served-model-name", help="model name (default: the directory's name)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    generator = Generator(args.model_dir, args.device, args.dtype, args.attn)
    generator.warm_up()
    Handler.generator = generator
    Handler.model_name = args.served_model_name or Path(args.model_dir).resolve().name
    server = Server((args.host, args.port), Handler)
    log.info(
        "serving %r (%s, %s) at http://%s:%d/v1", Handler.model_name, args.device, args.dtype, args.host, args.port
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
