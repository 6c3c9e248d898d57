"""Timing jitted device work for the benchmark scripts in this folder (run as scripts, so `import timing` works).

`median_seconds` queues `inner` calls back to back and synchronises once per sample, so host dispatch and the
synchronisation gap stay out of kernels that take well under a millisecond; the median over `reps` samples
drops clock dips.

`device_seconds` reads the GPU's own kernel times from a profiler trace instead: no host dispatch, launch
gaps or synchronisation in the figure at all, for kernels of a few microseconds."""

from __future__ import annotations

import pathlib
import re
import statistics
import tempfile
import time

import jax


def median_seconds(fn, *args, reps: int, warmup: int = 2, inner: int = 10) -> float:
    """Median over `reps` samples of the mean seconds of one call of `fn(*args)`."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def try_time(fn, *args, reps: int, warmup: int = 2, inner: int = 10, device: bool = False) -> float | str:
    """Seconds, or a one-line reason when the call cannot run (for example out of memory). `device`: the GPU's busy
    time over `reps` calls (`device_seconds`) instead of the host clock."""
    try:
        if device:
            return device_seconds(fn, *args, calls=reps)
        return median_seconds(fn, *args, reps=reps, warmup=warmup, inner=inner)
    except Exception as e:  # XLA and Triton errors alike: the row says why
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"


def busy_ns(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, duration) intervals: time during which at least one of them ran."""
    total, end = 0.0, float("-inf")
    for start, duration in sorted(intervals):
        stop = start + duration
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def gpu_events(fn, *args, calls: int = 20) -> dict[str, list[tuple[str, float, float]]]:
    """(kernel name, start ns, duration ns) of every event on a CUDA stream line of each GPU plane of a profiler
    trace of `calls` calls of `fn(*args)`, after one call outside the trace (compilation)."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmpdir:
        with jax.profiler.trace(tmpdir):
            out = None
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        paths = sorted(pathlib.Path(tmpdir).rglob("*.xplane.pb"))
        if not paths:
            raise RuntimeError(f"the profiler wrote no *.xplane.pb under {tmpdir}")
        per_device: dict[str, list[tuple[str, float, float]]] = {}
        for path in paths:
            data = jax.profiler.ProfileData.from_file(str(path))
            for plane in data.planes:
                if not plane.name.startswith("/device:GPU:"):
                    continue
                events = per_device.setdefault(plane.name, [])
                for line in plane.lines:
                    if "Stream" in line.name:
                        events.extend((event.name, event.start_ns, event.duration_ns) for event in line.events)
    if not any(per_device.values()):
        raise RuntimeError("no GPU stream events in the profiler trace (did fn run on a GPU?)")
    return per_device


def device_seconds(fn, *args, calls: int = 20) -> float:
    """Device seconds of one call of `fn(*args)`: the time the GPU was busy during `calls` calls, divided by
    `calls`.

    Busy time is the union of the events on every line whose name contains "Stream" (the kernels and copies each
    CUDA stream ran) of a plane whose name starts with "/device:GPU:" (`gpu_events`), so work that overlaps on two
    streams counts once; with several GPUs, the busiest one counts. Raises RuntimeError when the trace holds no
    such events (for example when `fn` ran on a CPU). The profiler itself slows short kernels slightly, so this can
    exceed an unprofiled host-clock time of a program that keeps the GPU busy throughout.
    """
    return busy_seconds(gpu_events(fn, *args, calls=calls), calls)


def busy_seconds(per_device: dict[str, list[tuple[str, float, float]]], calls: int) -> float:
    """Busy seconds per call of the busiest GPU in `gpu_events`' result (see `device_seconds`)."""
    busiest = max(busy_ns([(start, duration) for _, start, duration in events]) for events in per_device.values())
    return busiest * 1e-9 / calls


def kernel_totals(per_device: dict[str, list[tuple[str, float, float]]], calls: int) -> dict[str, tuple[float, int]]:
    """Kernel name -> (ns per call, launches per call), over all GPUs of `gpu_events`' result."""
    totals: dict[str, list[float]] = {}
    for events in per_device.values():
        for name, _, duration in events:
            totals.setdefault(name, []).append(duration)
    return {name: (sum(d) / calls, len(d) // calls) for name, d in totals.items()}


# One instruction of an optimised HLO module: name, result type, opcode, operands, the rest of the line.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z-]*)\((.*?)\)(.*)$")
_JAX_OP = re.compile(r'op_name="([^"]*)"')


def _argument_name(parameter: str) -> str:
    """A dotted path for an entry parameter of a jitted function, which XLA names after the argument's path:
    `params__moe_blocks____mlp____experts____gate_up_proj___0_.1` -> `moe_blocks.mlp.experts.gate_up_proj.0`."""
    parts = re.findall(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*", parameter.rsplit(".", 1)[0])
    return ".".join(parts[1:] or parts)


def kernel_descriptions(hlo_text: str) -> dict[str, str]:
    """Kernel name in a GPU profile -> what it computes, from the optimised HLO of the program that ran it
    (`jax.jit(f).lower(...).compile().as_text()`): its output type, the jitted function's arguments it reads (a
    weight names its layer) and the JAX operation it came from. A profile names each of XLA's kernels after an
    instruction, with "." written "_" (the instruction `input_reduce_fusion.150` runs as `input_reduce_fusion_150`).
    The instructions of fused computations are left out: they run inside their fusion's kernel."""
    computations: list[tuple[str, list[re.Match]]] = []
    arguments: dict[str, str] = {}  # the entry computation's parameters, by instruction name
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):  # a computation's header
            entry = line.startswith("ENTRY")
            computations.append((line.removeprefix("ENTRY ").split()[0].lstrip("%"), []))
        elif computations and (match := _INSTRUCTION.match(line)):
            computations[-1][1].append(match)
            if entry and match.group(3) == "parameter":
                arguments[match.group(1)] = _argument_name(match.group(1))
    fused = {
        called
        for _, instructions in computations
        for m in instructions
        if m.group(3) == "fusion"
        for called in re.findall(r"calls=%?([\w.\-]+)", m.group(5))
    }
    described: dict[str, str] = {}
    for computation, instructions in computations:
        if computation in fused:
            continue
        for m in instructions:
            name, result, opcode, operands, rest = m.groups()
            if opcode in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
                continue
            read = [arguments[o] for o in re.findall(r"%([^\s,#]+)", operands) if o in arguments]
            text = f"{opcode} {re.sub(r'{[^}]*}', '', result)}"
            if read:
                text += " of " + ", ".join(read)
            if jax_op := _JAX_OP.search(rest):
                text += f" ({jax_op.group(1).rsplit('/', 1)[-1]})"
            described[name.replace(".", "_")] = text
    return described
