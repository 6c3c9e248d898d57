"""Pipeline schedules as tables: which microbatch each device runs forward and backward at every tick.

The model's layers are cut into `p × v` virtual stages; virtual stage `k` lives on device `k mod p` (device `d`
holds stages d, d + p, d + 2p, ...: with v > 1 a microbatch circles the ring of devices v times). Devices run in
lock step. At every tick each device runs at most one forward (F) and then at most one backward (B) of one
virtual stage, and then sends the F output to the next device and the B output (the input gradient) to the
previous one. A message sent at tick t can be used from tick t + 1 on.

In training the last virtual stage has no F of its own: its B runs the stage forward, the head and the loss,
and their backward in one go. Every B recomputes its stage's forward from the stored stage input, so a device
keeps only stage inputs (one activation per microbatch in flight), never per-layer residuals.

Schedules are made by one list scheduler with per-schedule priorities:
- `gpipe`: all forwards, then all backwards (activation memory grows with the microbatch count m);
- `1f1b`: backwards run as soon as they can, interleaved one for one with forwards, so a device holds at most
  2(p - 1 - d) + 1 stage inputs whatever m is (lock step doubles the p of the asynchronous 1F1B);
- `circular`: gpipe order over v virtual stages per device (bubble (p - 1) / (v·m + p - 1));
- `interleaved`: 1f1b order over v virtual stages per device, microbatches taken in groups of p.

`plan_buffers` turns a schedule into the integer table the executor (`pipeline.py`) reads, with a slot in a
per-device stash for every stage input and gradient that waits between ticks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

SCHEDULES = ("gpipe", "1f1b", "circular", "interleaved")
IDLE = -1

# Kinds of work in the executor table.
KIND_IDLE, KIND_FIRST, KIND_MIDDLE, KIND_LAST = 0, 1, 2, 3

Task = tuple[int, int]  # (microbatch, virtual stage)


@dataclass(frozen=True)
class Schedule:
    """The order of work: `forward[t, d]` / `backward[t, d]` hold (microbatch, virtual stage) or (-1, -1)."""

    name: str
    n_devices: int  # p
    n_virtual: int  # v: virtual stages per device
    n_microbatches: int  # m
    forward: np.ndarray  # int32 [ticks, devices, 2]
    backward: np.ndarray  # int32 [ticks, devices, 2]
    train: bool  # False: forward only, the last stage's F computes the loss

    @property
    def n_stages(self) -> int:
        return self.n_devices * self.n_virtual

    @property
    def n_ticks(self) -> int:
        return self.forward.shape[0]


def _priorities(name: str, p: int) -> tuple[Callable[[Task], tuple], Callable[[Task], tuple], bool]:
    """(forward key, backward key, backward waits for every forward) of a schedule; smaller keys go first."""
    if name in ("gpipe", "1f1b"):
        return (lambda t: (t[0],)), (lambda t: (t[0],)), name == "gpipe"
    if name == "circular":
        # Breadth first: every microbatch through the first repeat of the ring before any starts the second.
        return (lambda t: (t[1] // p, t[0])), (lambda t: (-(t[1] // p), t[0])), True
    if name == "interleaved":
        # Microbatches in groups of p: the group goes through repeat 0, then repeat 1, ... (Megatron's order).
        return (lambda t: (t[0] // p, t[1] // p, t[0])), (lambda t: (t[0] // p, -(t[1] // p), t[0])), False
    raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def build_schedule(name: str, n_devices: int, n_virtual: int, n_microbatches: int, train: bool = True) -> Schedule:
    """List-schedule every F and B task tick by tick; each device picks its ready task of smallest key."""
    p, v, m = n_devices, n_virtual, n_microbatches
    if p < 2 or v < 1 or m < 1:
        raise ValueError(f"a pipeline needs >= 2 devices, >= 1 virtual stage and >= 1 microbatch; got {p}, {v}, {m}")
    f_key, b_key, barrier = _priorities(name, p)
    n_stages = p * v
    f_stages = n_stages - 1 if train else n_stages
    f_todo = [{(i, k) for k in range(d, f_stages, p) for i in range(m)} for d in range(p)]
    b_todo = [{(i, k) for k in range(d, n_stages, p) for i in range(m)} if train else set() for d in range(p)]
    f_tick: dict[Task, int] = {}
    b_tick: dict[Task, int] = {}
    forward, backward = [], []
    tick = 0

    def done_before(ticks: dict[Task, int], task: Task) -> bool:
        return ticks.get(task, tick) < tick

    while any(f_todo) or any(b_todo):
        f_row, b_row = [(IDLE, IDLE)] * p, [(IDLE, IDLE)] * p
        forwards_finished = not any(f_todo)
        for d in range(p):
            ready = [t for t in f_todo[d] if t[1] == 0 or done_before(f_tick, (t[0], t[1] - 1))]
            if ready:
                f_row[d] = min(ready, key=f_key)
            if barrier and not forwards_finished:
                continue
            # The last stage's B needs the previous stage's output; every other B the next stage's gradient.
            needs = lambda t: (f_tick, (t[0], t[1] - 1)) if t[1] == n_stages - 1 else (b_tick, (t[0], t[1] + 1))
            ready = [t for t in b_todo[d] if done_before(*needs(t))]
            if ready:
                b_row[d] = min(ready, key=b_key)
        for d in range(p):
            if f_row[d][0] != IDLE:
                f_todo[d].remove(f_row[d])
                f_tick[f_row[d]] = tick
            if b_row[d][0] != IDLE:
                b_todo[d].remove(b_row[d])
                b_tick[b_row[d]] = tick
        forward.append(f_row)
        backward.append(b_row)
        tick += 1
        if tick > 4 * (m * v + n_stages) + 8:
            raise AssertionError(f"schedule {name} p={p} v={v} m={m} does not finish")
    as_array = lambda rows: np.asarray(rows, np.int32).reshape(len(rows), p, 2)
    return Schedule(name, p, v, m, as_array(forward), as_array(backward), train)


def task_ticks(schedule: Schedule) -> tuple[dict[Task, int], dict[Task, int]]:
    """(tick of every forward task, tick of every backward task)."""
    ticks: tuple[dict[Task, int], dict[Task, int]] = ({}, {})
    for table, out in zip((schedule.forward, schedule.backward), ticks, strict=True):
        for t, d in zip(*np.nonzero(table[:, :, 0] != IDLE), strict=True):
            out[(int(table[t, d, 0]), int(table[t, d, 1]))] = int(t)
    return ticks


# ----------------------------------------------------------------------------- buffers for the executor

# Columns of the executor table, per tick and device. `f_phase` / `b_phase` say whether any device runs an F / B
# at that tick (the same on every device): only a whole phase may be skipped, because a device that skips work
# its tensor-parallel partners do would leave their collectives waiting.
COLUMNS = (
    "f_phase", "f_kind", "f_mb", "f_chunk", "f_slot",
    "b_phase", "b_kind", "b_mb", "b_chunk", "b_slot", "b_grad_slot",
    "recv_f_slot", "recv_b_slot",
)  # fmt: skip


@dataclass(frozen=True)
class BufferPlan:
    """The executor's table and stash sizes. Slot `n_*_slots` is a scratch slot for messages nobody needs."""

    table: np.ndarray  # int32 [ticks, devices, len(COLUMNS)]
    n_input_slots: int  # stage inputs waiting on a device, at most (its activation memory)
    n_grad_slots: int  # input gradients waiting on a device, at most

    def column(self, name: str) -> np.ndarray:
        return self.table[:, :, COLUMNS.index(name)]


def _allocate(intervals: list[tuple[int, int, Task]]) -> tuple[dict[Task, int], int]:
    """Slots for [first tick held, last tick read] intervals: a slot is reused once its last read is over
    (the new value is written at the end of the tick before its first)."""
    free_after: list[int] = []  # per slot: the last tick its current value is read
    slots: dict[Task, int] = {}
    for start, end, task in sorted(intervals):
        slot = next((s for s, last in enumerate(free_after) if last < start), len(free_after))
        if slot == len(free_after):
            free_after.append(end)
        else:
            free_after[slot] = end
        slots[task] = slot
    return slots, len(free_after)


def plan_buffers(schedule: Schedule) -> BufferPlan:
    p, n_stages = schedule.n_devices, schedule.n_stages
    f_tick, b_tick = task_ticks(schedule)
    inputs: list[list] = [[] for _ in range(p)]
    grads: list[list] = [[] for _ in range(p)]
    for (i, k), t in f_tick.items():
        if k + 1 < n_stages:  # the next stage's input arrives after this tick and waits until its B (or F)
            release = b_tick[(i, k + 1)] if schedule.train else f_tick[(i, k + 1)]
            inputs[(k + 1) % p].append((t + 1, release, (i, k + 1)))
    for (i, k), t in b_tick.items():
        if k > 0:
            grads[(k - 1) % p].append((t + 1, b_tick[(i, k - 1)], (i, k - 1)))
    input_slots, grad_slots, n_in, n_grad = {}, {}, 1, 1
    for d in range(p):
        slots, n = _allocate(inputs[d])
        input_slots.update(slots)
        n_in = max(n_in, n)
        slots, n = _allocate(grads[d])
        grad_slots.update(slots)
        n_grad = max(n_grad, n)

    table = np.zeros((schedule.n_ticks, p, len(COLUMNS)), np.int32)
    col = {name: i for i, name in enumerate(COLUMNS)}
    table[:, :, col["f_slot"]] = table[:, :, col["b_slot"]] = table[:, :, col["recv_f_slot"]] = n_in
    table[:, :, col["b_grad_slot"]] = table[:, :, col["recv_b_slot"]] = n_grad

    def kind(k: int) -> int:
        return KIND_FIRST if k == 0 else KIND_LAST if k == n_stages - 1 else KIND_MIDDLE

    for (i, k), t in f_tick.items():
        d, row = k % p, table[t, k % p]
        row[[col["f_kind"], col["f_mb"], col["f_chunk"]]] = (kind(k), i, k // p)
        if k > 0:
            row[col["f_slot"]] = input_slots[(i, k)]
        if k + 1 < n_stages:
            table[t, (d + 1) % p, col["recv_f_slot"]] = input_slots[(i, k + 1)]
    for (i, k), t in b_tick.items():
        d, row = k % p, table[t, k % p]
        row[[col["b_kind"], col["b_mb"], col["b_chunk"]]] = (kind(k), i, k // p)
        if k > 0:
            row[col["b_slot"]] = input_slots[(i, k)]
            table[t, (d - 1) % p, col["recv_b_slot"]] = grad_slots[(i, k - 1)]
        if k < n_stages - 1:
            row[col["b_grad_slot"]] = grad_slots[(i, k)]
    for phase, kind_column in (("f_phase", "f_kind"), ("b_phase", "b_kind")):
        table[:, :, col[phase]] = (table[:, :, col[kind_column]] != KIND_IDLE).any(axis=1, keepdims=True)
    return BufferPlan(table, n_in, n_grad)


def pad_buffers(plans: list[BufferPlan]) -> list[BufferPlan]:
    """The plans with a common table shape (idle ticks at the end, more stash slots), so one compiled executor
    runs any of them with the table passed in at run time."""
    ticks = max(b.table.shape[0] for b in plans)
    n_in = max(b.n_input_slots for b in plans)
    n_grad = max(b.n_grad_slots for b in plans)
    padded = []
    for b in plans:
        table = np.zeros((ticks, *b.table.shape[1:]), np.int32)
        table[: b.table.shape[0]] = b.table
        for names, old, new in (
            (("f_slot", "b_slot", "recv_f_slot"), b.n_input_slots, n_in),
            (("b_grad_slot", "recv_b_slot"), b.n_grad_slots, n_grad),
        ):
            for name in names:
                column = table[:, :, COLUMNS.index(name)]
                column[column == old] = new  # the scratch slot moves to the end
                column[b.table.shape[0] :] = new
        padded.append(BufferPlan(table, n_in, n_grad))
    return padded


# ----------------------------------------------------------------------------- time model


def theoretical_bubble(n_devices: int, n_microbatches: int, n_virtual: int = 1) -> float:
    """(p - 1) / (v·m + p - 1): the idle share of a pipeline whose stages take equal time."""
    p, m, v = n_devices, n_microbatches, n_virtual
    return (p - 1) / (v * m + p - 1)


def simulated_bubble(schedule: Schedule, forward_cost: float = 1.0, backward_cost: float = 2.0) -> float:
    """Idle share of the busiest device when every stage costs the same: a tick lasts as long as the slowest
    device's F plus B in it. A B recomputes its stage forward (`forward_cost + backward_cost`)."""
    busy_f = schedule.forward[:, :, 0] != IDLE
    busy_b = schedule.backward[:, :, 0] != IDLE
    per_device = busy_f * forward_cost + busy_b * (forward_cost + backward_cost)
    total = per_device.max(axis=1).sum()
    return float(1.0 - per_device.sum(axis=0).max() / total)
