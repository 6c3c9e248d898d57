"""Run a snippet of Python in several jax processes on one machine, joined by `jax.distributed`.

Each process gets its own simulated CPU devices and talks to the others through gloo, as hosts of a cluster
would through their network. Use it to check that multi-host code paths agree with single-process runs:

    outputs = run_processes("print(jax.process_index(), jax.device_count())", 2, 4)

Inside the snippet `jax`, `PROCESS_ID` and `NUM_PROCESSES` are defined, and `jax.distributed` is
already initialised.
Return values travel through stdout (print JSON for anything structured).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# What each process runs around the snippet. Environment variables carry the per-process settings, so
# this text is the same for every process.
_PREAMBLE = """\
import faulthandler, os, sys
# If the run hangs, show where each process was stuck before the launcher kills it.
faulthandler.dump_traceback_later(float(os.environ["MP_DUMP_AFTER_S"]), exit=False)

import jax

try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
except AttributeError:
    pass  # newer jax: gloo is the only/default CPU implementation and the option may be gone

PROCESS_ID = int(os.environ["MP_PROCESS_ID"])
NUM_PROCESSES = int(os.environ["MP_NUM_PROCESSES"])
jax.distributed.initialize(
    coordinator_address=os.environ["MP_COORDINATOR"],
    coordinator_bind_address=os.environ["MP_COORDINATOR"],  # loopback only, not every interface
    num_processes=NUM_PROCESSES,
    process_id=PROCESS_ID,
    initialization_timeout=int(os.environ["MP_INIT_TIMEOUT_S"]),
)
_path = os.environ["MP_SNIPPET"]
try:
    with open(_path) as _f:
        _code = compile(_f.read(), _path, "exec")
    _names = {"__name__": "__main__", "jax": jax, "PROCESS_ID": PROCESS_ID, "NUM_PROCESSES": NUM_PROCESSES}
    exec(_code, _names)
except BaseException:
    import traceback
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip exit handlers: jax's shutdown barrier would wait for the healthy processes until the timeout.
    os._exit(1)
sys.stdout.flush()
jax.distributed.shutdown()
"""

# Messages that mean another program took the coordinator port between choosing it and binding it.
_PORT_CLASH = re.compile(r"address already in use|failed to bind|failed to add port|no address added", re.IGNORECASE)


class MultiprocessError(RuntimeError):
    """A process failed or the run timed out; the message holds the relevant stderr."""


def free_port() -> int:
    """A TCP port that is free now (another program may still take it before the coordinator binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _xla_flags(devices_per_process: int) -> str:
    # Drop any device count inherited from the parent (tests/conftest.py sets 8) before adding ours.
    inherited = os.environ.get("XLA_FLAGS", "")
    kept = [flag for flag in inherited.split() if not flag.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices_per_process}"])


def _tail(text: str, max_chars: int = 6000) -> str:
    return text if len(text) <= max_chars else "...\n" + text[-max_chars:]


def _stop(procs: list[subprocess.Popen]) -> None:
    # SIGKILL straight away: jax.distributed handles SIGTERM itself (preemption notice) and would linger.
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait()


def _launch_once(
    code: str,
    n_processes: int,
    devices_per_process: int,
    timeout: float,
    env: Mapping[str, str] | None,
    workdir: Path,
) -> tuple[list[str], list[str], list[int | None], bool]:
    """Run once; returns (stdouts, stderrs, exit codes with None for killed, timed_out)."""
    snippet = workdir / "snippet.py"
    snippet.write_text(textwrap.dedent(code))
    preamble = workdir / "preamble.py"
    preamble.write_text(_PREAMBLE)
    base_env = dict(os.environ)
    base_env.update(
        {
            "XLA_FLAGS": _xla_flags(devices_per_process),
            "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "MP_COORDINATOR": f"127.0.0.1:{free_port()}",
            "MP_NUM_PROCESSES": str(n_processes),
            "MP_SNIPPET": str(snippet),
            "MP_INIT_TIMEOUT_S": str(max(10, int(timeout))),
            "MP_DUMP_AFTER_S": str(max(1.0, timeout - 3)),
        }
    )
    base_env.update(env or {})
    procs: list[subprocess.Popen] = []
    files = []
    try:
        for process_id in range(n_processes):
            out = open(workdir / f"stdout.{process_id}", "w+")  # closed in the finally below
            err = open(workdir / f"stderr.{process_id}", "w+")
            files.append((out, err))
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(preamble)],
                    stdout=out,
                    stderr=err,
                    stdin=subprocess.DEVNULL,
                    env={**base_env, "MP_PROCESS_ID": str(process_id)},
                    cwd=str(REPO_ROOT),
                )
            )
        deadline = time.monotonic() + timeout
        timed_out = False
        # Poll rather than wait on one process: the first failure should stop the others at once, since they
        # would otherwise block in a collective until the timeout.
        while True:
            codes = [proc.poll() for proc in procs]
            if all(code is not None for code in codes) or any(code not in (None, 0) for code in codes):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.05)
        codes = [proc.poll() for proc in procs]
    finally:
        _stop(procs)
        outputs = []
        for out, err in files:
            out.seek(0)
            err.seek(0)
            outputs.append((out.read(), err.read()))
            out.close()
            err.close()
    return [o for o, _ in outputs], [e for _, e in outputs], codes, timed_out


def run_processes(
    code: str,
    n_processes: int,
    devices_per_process: int,
    timeout: float = 180.0,
    env: Mapping[str, str] | None = None,
    port_retries: int = 2,
) -> list[str]:
    """Run `code` in `n_processes` jax processes with `devices_per_process` CPU devices each.

    Returns each process's stdout, indexed by process id. Raises MultiprocessError naming the failing process
    with its stderr (the first process to fail; the others are then killed), or every process's stderr on a
    timeout. `env` adds or overrides environment variables for the processes.
    """
    if n_processes < 1 or devices_per_process < 1:
        raise ValueError("n_processes and devices_per_process must be positive")
    for attempt in range(port_retries + 1):
        with tempfile.TemporaryDirectory(prefix="jaxdeep_mp_") as tmp:
            stdouts, stderrs, codes, timed_out = _launch_once(
                code, n_processes, devices_per_process, timeout, env, Path(tmp)
            )
        if timed_out:
            states = ["still running" if c is None else f"exit code {c}" for c in codes]
            report = "\n".join(
                f"--- process {i} ({states[i]}) stderr:\n{_tail(stderrs[i], 3000)}"
                f"\n--- process {i} stdout:\n{_tail(stdouts[i], 1000)}"
                for i in range(n_processes)
            )
            raise MultiprocessError(f"{n_processes} processes did not finish within {timeout:g} s\n{report}")
        failed = [i for i, code in enumerate(codes) if code != 0]
        if not failed:
            return stdouts
        if attempt < port_retries and any(_PORT_CLASH.search(stderrs[i]) for i in failed):
            continue  # another program took the port; try a fresh one
        # Report the process that died on its own (not one we killed after the first failure).
        first = next((i for i in failed if codes[i] is not None), failed[0])
        others = "; ".join(
            f"process {i} " + ("was stopped" if codes[i] is None else f"exited with {codes[i]}")
            for i in range(n_processes)
            if i != first
        )
        raise MultiprocessError(
            f"process {first} of {n_processes} failed with exit code {codes[first]} ({others})\n"
            f"--- process {first} stderr:\n{_tail(stderrs[first])}\n"
            f"--- process {first} stdout:\n{_tail(stdouts[first], 2000)}"
        )
    raise AssertionError("unreachable")
