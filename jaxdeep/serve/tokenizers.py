"""Tokenizers behind the engine's `Tokenizer` protocol: our byte tokenizer, and Hugging Face `tokenizer.json`."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

from jaxdeep.data.tokenizer import ByteTokenizer


class ByteTokens:
    """`ByteTokenizer` with list ids; id 0 ends a generation (it separates documents in training data).

    A model whose vocabulary is larger than the bytes (a DeepSeek preset trained on bytes) can still sample an id
    of 256 or more: it decodes to the placeholder `<xN>`, as in the `tokenizer.json` that `jaxdeep.hf.neox`
    exports, instead of failing the request."""

    # An incomplete character at the end of the text decodes to one U+FFFD (see TextStream).
    hold_replacements = 1

    def __init__(self):
        self._bytes = ByteTokenizer()
        self.eos_id: int | None = ByteTokenizer.eos_id
        self.vocab_size = ByteTokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._bytes.encode(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """`ByteTokenizer.decode` (documents decoded apart at each eos, which is dropped) with `<xN>` for ids past
        the bytes. Plain Python: a stream decodes a few ids per token, where numpy's per-call costs dominated (on a
        CPU host a `TextStream` token took 24-25 µs through numpy, 5-8 µs now)."""
        parts, run = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 < i < ByteTokenizer.vocab_size:
                run.append(i)
                continue
            if i < 0:
                raise ValueError(f"token ids must be >= 0, got {i}")
            parts.append(run.decode("utf-8", errors="replace"))  # bytes never run across an eos or a placeholder
            run = bytearray()
            if i:
                parts.append(f"<x{i}>")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def chat_tokens(self, messages: Sequence[dict]) -> list[int] | None:
        return None  # no template of its own: the server's plain one applies


class HFTokens:
    """A `tokenizers` tokenizer read from `tokenizer.json`; eos from `tokenizer_config.json` or `config.json`."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        directory = Path(directory)
        self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos(directory)
        config_path = directory / "tokenizer_config.json"
        self._config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = self._config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template if isinstance(template, str) else None

    def chat_tokens(self, messages: Sequence[dict]) -> list[int] | None:
        """`messages` rendered by the model's own chat template (`tokenizer_config.json`), ending where the
        assistant's reply starts; None when the model has none. The template writes the special tokens itself."""
        if self.chat_template is None:
            return None
        text = _compiled_template(self.chat_template).render(
            messages=list(messages),
            add_generation_prompt=True,
            bos_token=_token_text(self._config.get("bos_token")),
            eos_token=_token_text(self._config.get("eos_token")),
        )
        return self._tok.encode(text, add_special_tokens=False).ids

    def _find_eos(self, directory: Path) -> int | None:
        config = directory / "tokenizer_config.json"
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            if isinstance(eos, dict):  # {"content": "<｜end▁of▁sentence｜>", ...}
                eos = eos.get("content")
            if isinstance(eos, str) and self._tok.token_to_id(eos) is not None:
                return self._tok.token_to_id(eos)
        model_config = directory / "config.json"
        if model_config.is_file():
            eos_id = json.loads(model_config.read_text()).get("eos_token_id")
            if isinstance(eos_id, list):
                eos_id = eos_id[0] if eos_id else None
            if isinstance(eos_id, int):
                return eos_id
        return None

    def encode(self, text: str) -> list[int]:
        # The tokenizer's own special tokens (a DeepSeek prompt starts with its begin-of-sentence token), as
        # the model saw in training and as other OpenAI-compatible servers send.
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def _token_text(token) -> str:
    if isinstance(token, dict):  # {"content": "<｜begin▁of▁sentence｜>", ...}
        token = token.get("content")
    return token if isinstance(token, str) else ""


@functools.cache
def _compiled_template(source: str):
    # Hugging Face chat templates are Jinja, rendered in a sandbox with `raise_exception` for their own checks.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from jaxdeep.serve.api import RequestError

    def raise_exception(message):
        raise RequestError("messages", f"the model's chat template refused them: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
