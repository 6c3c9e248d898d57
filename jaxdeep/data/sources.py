"""Token sources: the embedded standard-library corpus, text files, and memory-mapped .npy token arrays.

`load_tokens` returns a 1-D integer array (uint8 for byte sources, the file's own dtype for .npy);
batches are cast to int32 later, so large corpora stay compact in memory.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

from jaxdeep.data.tokenizer import ByteTokenizer

STDLIB_SOURCE = "stdlib"

# site-packages holds whatever happens to be installed, so it would make the corpus machine-dependent.
# Test directories are skipped too: they carry deliberately malformed files (bad encodings, NUL bytes)
# and would otherwise dominate the corpus.
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})

# Scans over possibly memory-mapped arrays go chunk by chunk so temporaries stay small.
_SCAN_CHUNK = 1 << 24

_SOURCE_HINT = (
    f"set the data source to {STDLIB_SOURCE!r} (the Python standard library, present on every machine), "
    "a UTF-8 text file, or a .npy array of token ids"
)


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, absolute path) of the stdlib corpus files, in corpus order.

    Corpus order sorts files by a hash of their relative path: it is identical on every machine with the
    same Python version, and any prefix (what `max_bytes` keeps) or suffix (the eval split) is a spread
    over the whole library rather than one alphabetical corner of it.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(
            f"the Python standard library was not found at {root} (sysconfig 'stdlib' path); "
            "set the data source to a text file or a .npy token array instead"
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if name not in _SKIPPED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: (hashlib.sha256(item[0].encode()).digest(), item[0]))
    return found


def load_tokens(
    source: str | os.PathLike[str],
    max_bytes: int | None = None,
    vocab_size: int = ByteTokenizer.vocab_size,
) -> np.ndarray:
    """Token stream of `source`: "stdlib", a text file (its UTF-8 bytes) or a .npy token array (memmap).

    `max_bytes` keeps the first `max_bytes` bytes of the stream (for .npy: of the array data), for quick runs.
    `vocab_size` is the model's vocabulary; every id must lie below it.
    """
    bad_cap = isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0
    if max_bytes is not None and bad_cap:
        raise ValueError(f"max_bytes must be a positive integer or None (no cap), got {max_bytes!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    # The keyword wins over a file called "stdlib"; write "./stdlib" to mean the file.
    if isinstance(source, str) and source == STDLIB_SOURCE:
        _check_byte_vocab(STDLIB_SOURCE, vocab_size)
        return _load_stdlib(max_bytes)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {str(source)!r}: no such file; {_SOURCE_HINT}")
    if not path.is_file():
        raise ValueError(f"data source {str(source)!r} is not a regular file; {_SOURCE_HINT}")
    if path.suffix == ".npy":
        return _load_npy(path, max_bytes, vocab_size)
    _check_byte_vocab(str(path), vocab_size)
    return _load_text(path, max_bytes)


def _check_byte_vocab(source: str, vocab_size: int) -> None:
    if vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(
            f"data source {source!r} is byte-tokenized (ids 0..{ByteTokenizer.vocab_size - 1}) but "
            f"vocab_size={vocab_size}; set the model vocab_size to at least {ByteTokenizer.vocab_size} "
            "or use a .npy array of ids from a smaller vocabulary"
        )


def _load_stdlib(max_bytes: int | None) -> np.ndarray:
    budget = max_bytes if max_bytes is not None else float("inf")
    parts: list[bytes] = []
    total = 0
    for _, path in stdlib_files():
        if total >= budget:
            break
        data = path.read_bytes()
        if not data or b"\x00" in data:  # a NUL inside a file would read as a document break
            continue
        parts.append(data)
        total += len(data) + 1
    if not parts:
        raise ValueError(
            f"the stdlib corpus at {sysconfig.get_paths()['stdlib']} has no usable .py files; "
            "set the data source to a text file or a .npy token array"
        )
    # Every file is followed by eos, so each document in the stream ends with eos and starts after one.
    stream = b"\x00".join(parts) + b"\x00"
    if max_bytes is not None:
        stream = stream[:max_bytes]
    return np.frombuffer(stream, dtype=np.uint8)


def _load_text(path: Path, max_bytes: int | None) -> np.ndarray:
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"data source {str(path)!r} is empty; {_SOURCE_HINT}")
    # Memory-mapped, so a multi-gigabyte text corpus costs page cache, not process memory.
    tokens = np.memmap(path, dtype=np.uint8, mode="r")
    if max_bytes is not None:
        tokens = tokens[:max_bytes]
    for start in range(0, len(tokens), _SCAN_CHUNK):
        nul = np.flatnonzero(tokens[start : start + _SCAN_CHUNK] == 0)
        if nul.size:
            raise ValueError(
                f"data source {str(path)!r} contains a NUL byte at offset {start + int(nul[0])}: it is not "
                "text (byte 0 is the eos id). If it is a NumPy array of token ids, save it with a .npy suffix"
            )
    return tokens


def _load_npy(path: Path, max_bytes: int | None, vocab_size: int) -> np.ndarray:
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"data source {str(path)!r} is not a readable .npy array: {error}") from error
    if not isinstance(tokens, np.ndarray):
        raise ValueError(f"data source {str(path)!r} holds several arrays; save one 1-D array with np.save")
    if tokens.dtype.kind not in "iu":
        raise ValueError(
            f"data source {str(path)!r} has dtype {tokens.dtype}; token ids must be integers "
            "(save with e.g. .astype(np.uint16) or np.int32)"
        )
    if tokens.ndim != 1:
        raise ValueError(
            f"data source {str(path)!r} has shape {tokens.shape}; token ids must be one 1-D stream "
            "(flatten it, with eos between documents)"
        )
    if max_bytes is not None:
        tokens = tokens[: max(1, max_bytes // tokens.dtype.itemsize)]
    if tokens.size == 0:
        raise ValueError(f"data source {str(path)!r} is empty; {_SOURCE_HINT}")
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[start : start + _SCAN_CHUNK]
        bad = np.flatnonzero((chunk < 0) | (chunk >= vocab_size))
        if bad.size:
            offset = start + int(bad[0])
            raise ValueError(
                f"data source {str(path)!r} has token id {int(tokens[offset])} at position {offset}, outside "
                f"[0, vocab_size={vocab_size}); set vocab_size to cover the tokenizer that produced it"
            )
    return tokens
