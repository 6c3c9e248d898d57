"""The OpenAI wire format: parse request bodies into engine requests, build responses and stream chunks.

Only the fields we honour are read; other fields are ignored, except those whose silent omission would change
the answer (`n` > 1, `logprobs`, `echo`, penalties, `logit_bias`, ... — see UNSUPPORTED), which are refused unless
neutral. `top_k` and `ignore_eos` are extensions, as in vLLM.

Chat template: a Hugging Face model's own (`chat_template` in its `tokenizer_config.json`, rendered with Jinja);
otherwise messages become a plain-text prompt, one line per message, and the prompt ends where the assistant's
reply starts:

    system: You are terse.
    user: Say hi.
    assistant:

A message's `content` is a string or a list of `{"type": "text", "text": ...}` parts (joined).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxdeep.serve.api import EngineStats, RequestError, SamplingParams, Tokenizer

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Fields that would change the answer and that we do not implement: accepted only at their neutral value.
UNSUPPORTED = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "logit_bias": {},
    "min_tokens": 0,
    "suffix": "",
    "tools": [],
    "response_format": {"type": "text"},
}


@dataclass(frozen=True)
class ParsedRequest:
    """One OpenAI request turned into what the engine needs, plus what the response needs."""

    kind: str  # "completion" or "chat"
    prompt_tokens: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a final chunk carries usage
    model: str | None  # as the client named it


def apply_chat_template(messages: Sequence[dict[str, Any]]) -> str:
    """The documented plain-text chat template (module docstring); `messages` are already validated."""
    lines = [f"{m['role']}: {_content_text(m['content'])}" for m in messages]
    return "\n".join([*lines, "assistant:"])


def _content_text(content: str | list) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


def parse_request(body: Any, kind: str, tokenizer: Tokenizer, stats: EngineStats) -> ParsedRequest:
    """Validate an OpenAI completions (`kind="completion"`) or chat body; raise RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model", "must be a string")
    if body.get("n", 1) not in (1, None) or isinstance(body.get("n"), bool):
        raise RequestError("n", f"only n=1 is supported, got {body.get('n')!r}")
    if body.get("echo"):
        raise RequestError("echo", "echo is not supported")
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") is not None:
        raise RequestError("logprobs", "logprobs are not supported")
    for name, neutral in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not _is_neutral(value, neutral):
            raise RequestError(name, f"is not supported; leave it out (or {neutral!r})")

    if kind == "chat":
        messages = [{"role": m["role"], "content": _content_text(m["content"])} for m in _messages(body)]
        own = getattr(tokenizer, "chat_tokens", None)
        prompt_tokens = own(messages) if own is not None else None  # the model's own template, when it has one
        if prompt_tokens is None:
            prompt_tokens = _encode(tokenizer, apply_chat_template(messages), "messages")
        prompt_field = "messages"
    else:
        prompt_tokens = _prompt_tokens(body, tokenizer)
        prompt_field = "prompt"
    if len(prompt_tokens) >= stats.max_context:
        raise RequestError(
            prompt_field,
            f"the prompt is {len(prompt_tokens)} tokens; this model's context is {stats.max_context} tokens "
            "(prompt plus at least one new token)",
        )

    room = stats.max_context - len(prompt_tokens)
    max_tokens_field = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens_field = "max_completion_tokens"
    max_tokens = body.get(max_tokens_field)
    if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
        max_tokens = min(16, room) if kind == "completion" else room
    elif _is_int(max_tokens) and max_tokens > room:
        raise RequestError(
            max_tokens_field,
            f"{max_tokens_field}={max_tokens} plus the prompt's {len(prompt_tokens)} tokens exceeds this model's "
            f"context of {stats.max_context} tokens; ask for at most {room}",
        )

    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise RequestError("stop", "must be a string or a list of strings")

    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0),
        top_k=_top_k(body),
        top_p=_number(body, "top_p", 1.0),
        seed=body.get("seed"),
        stop=stop,
        ignore_eos=False if body.get("ignore_eos") is None else body["ignore_eos"],
    )
    try:
        params.validate()
    except RequestError as e:
        if e.field == "max_tokens" and max_tokens_field != "max_tokens":
            raise RequestError(max_tokens_field, str(e).split(": ", 1)[1]) from None
        raise

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("stream", "must be true or false")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise RequestError("stream_options", "must be an object")
        if not stream:
            raise RequestError("stream_options", "is only allowed with stream: true")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError("stream_options.include_usage", "must be true or false")
    return ParsedRequest(kind, prompt_tokens, params, stream, include_usage, model)


def _is_neutral(value: Any, neutral: Any) -> bool:
    if isinstance(neutral, float):  # 0 and 0.0 alike, but not false
        return isinstance(value, int | float) and not isinstance(value, bool) and value == neutral
    return type(value) is type(neutral) and value == neutral


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(body: dict, name: str, default: float) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise RequestError(name, f"must be a number, got {value!r}")
    return value


def _top_k(body: dict) -> Any:
    value = body.get("top_k")
    if value is None or value == -1:  # -1 means "all", as in vLLM
        return 0
    return value


def _encode(tokenizer: Tokenizer, text: str, field: str) -> list[int]:
    try:
        return [int(t) for t in tokenizer.encode(text)]
    except ValueError as e:
        raise RequestError(field, str(e)) from None


def _prompt_tokens(body: dict, tokenizer: Tokenizer) -> list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("prompt", "is required")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt", "must not be empty")
        return _encode(tokenizer, prompt, "prompt")
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        raise RequestError("prompt", f"a batch of {len(prompt)} prompts is not supported; send one per request")
    raise RequestError("prompt", "must be a string, a list of one string, or a non-empty list of token ids")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]", "must be an object with role and content")
        if m.get("role") not in CHAT_ROLES:
            raise RequestError(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {m.get('role')!r}")
        content = m.get("content")
        text_parts = isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
        )
        if not isinstance(content, str) and not text_parts:
            raise RequestError(f"messages[{i}].content", "must be a string or a list of text parts")
    return messages


# ---- responses -------------------------------------------------------------------------------------------------


def new_request_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(
    kind: str, request_id: str, model: str, created: int, text: str, finish_reason: str | None, usage_: dict
) -> dict:
    """A whole (non-streaming) completion or chat completion."""
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage_}


def chunk(
    kind: str,
    request_id: str,
    model: str,
    created: int,
    text: str | None,
    finish_reason: str | None = None,
    *,
    first: bool = False,
    with_usage_field: bool = False,
) -> dict:
    """One streamed chunk with one choice; a chat chunk's delta carries the role on the `first` chunk."""
    if kind == "chat":
        delta: dict[str, str] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    out = {"id": request_id, "object": obj, "created": created, "model": model, "choices": [choice]}
    if with_usage_field:
        out["usage"] = None
    return out


def usage_chunk(kind: str, request_id: str, model: str, created: int, usage_: dict) -> dict:
    """The last chunk when `stream_options.include_usage` is set: no choices, only usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [], "usage": usage_}


def error_body(message: str, param: str | None, err_type: str = "invalid_request_error", code: str | None = None):
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def now() -> int:
    return int(time.time())
