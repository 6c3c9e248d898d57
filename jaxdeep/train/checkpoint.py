"""Checkpoints through Orbax: train state (sharded arrays) plus the data-iterator position, saved together.

Orbax writes each step into a temporary directory and renames it when complete, so a crash mid-save
never leaves a checkpoint that looks valid; restores take target shardings, so a checkpoint written on
one mesh layout or device count loads onto any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from jaxdeep.train.state import TrainState

# Subtrees of the train state only training reads: a restore for serving, evaluation or export skips them.
TRAINING_ONLY = (("opt_state",), ("rng",))


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        # The general pytree handler (what StandardSave wraps, the same files) restores part of a tree as well.
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict[str, Any], force: bool = True) -> bool:
        """Start saving (in the background when async); arrays are copied before this returns."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def restore(
        self, abstract_state: TrainState, step: int | None = None, *, skip: Sequence[tuple[str, ...]] = ()
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restore onto the shardings held by `abstract_state` (ShapeDtypeStructs with `.sharding`).

        `skip`: key paths of subtrees to leave on disk, e.g. `("opt_state",)` to serve a checkpoint without reading
        its optimizer moments (twice the parameters' bytes under AdamW). They are not read, and the returned state
        has no entry for them."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; available: {self.all_steps()}")
        target = _without(abstract_state, skip)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        # A partial restore reads only the leaves its target holds.
        state_args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=bool(skip))
        restored = self._manager.restore(step, args=ocp.args.Composite(state=state_args, data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self) -> None:
        """Block until background saves have committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _without(tree: dict, paths: Sequence[tuple[str, ...]]) -> dict:
    """`tree` without the subtrees at `paths` (the caller's tree stays as it was)."""
    tree = dict(tree)
    for path in paths:
        del _parent(tree, path)[path[-1]]
    return tree


def _parent(tree: dict, path: tuple[str, ...]) -> dict:
    """The dict holding `path`'s last key, each dict on the way copied (the caller's tree stays as it was)."""
    if not path:
        raise ValueError("a skipped path needs at least one key")
    node = tree
    for depth, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"the train state has no {'/'.join(path[: depth + 1])} to skip")
        if depth == len(path) - 1:
            return node
        node[key] = dict(node[key])
        node = node[key]
    return node
