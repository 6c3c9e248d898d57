"""Reading and writing safetensors checkpoints: one file or shards listed in `model.safetensors.index.json`."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class TensorReader:
    """Lazy access to the tensors of a checkpoint directory; files are opened once and read on demand."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if (self.directory / INDEX).is_file():
            weight_map = json.loads((self.directory / INDEX).read_text())["weight_map"]
        elif (self.directory / SINGLE).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.directory}: neither {SINGLE} nor {INDEX} found")
        self._stack = contextlib.ExitStack()
        self._files: dict[str, object] = {}
        if weight_map is None:
            handle = self._open(SINGLE)
            self.file_of = {name: SINGLE for name in handle.keys()}
        else:
            self.file_of = dict(weight_map)

    def _open(self, filename: str):
        if filename not in self._files:
            path = self.directory / filename
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {INDEX} but missing")
            self._files[filename] = self._stack.enter_context(safe_open(str(path), framework="numpy"))
        return self._files[filename]

    def names(self) -> set[str]:
        return set(self.file_of)

    def _handle(self, name: str):
        if name not in self.file_of:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        return self._open(self.file_of[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor (or a slice of it, read without loading the rest)."""
        handle = self._handle(name)
        if index is None:
            return handle.get_tensor(name)
        return handle.get_slice(name)[index]

    def close(self) -> None:
        self._stack.close()


class ShardedWriter:
    """Writes tensors into files of at most `max_shard_bytes`, then the index; holds one shard in memory."""

    def __init__(self, directory: str | Path, max_shard_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # temporary filename, tensor names
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = np.ascontiguousarray(array)
        self._pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def add_all(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        for name, array in items:
            self.add(name, array)

    def _flush(self) -> None:
        filename = f"shard-{len(self._written):05d}.tmp"
        save_file(self._pending, str(self.directory / filename), metadata={"format": "pt"})
        self._written.append((filename, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards `model-0000i-of-0000n.safetensors` (or one `model.safetensors`) and write the index."""
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        weight_map = {}
        for i, (tmp, names) in enumerate(self._written):
            final = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / tmp, self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        # A stale file of the other layout would shadow or contradict what was just written.
        stale = self.directory / (INDEX if n == 1 else SINGLE)
        if stale.exists():
            stale.unlink()
