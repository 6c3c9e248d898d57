"""Every script in experiments/benchmarks imports against the current code (they run only on GPUs, so nothing
else would notice a name they use going away)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_script_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import `timing` from their own folder
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # top level only: `main()` runs under `if __name__ == "__main__"`
    assert callable(getattr(module, "main", None)) or path.stem == "timing"


def test_trace_summaries_count_overlap_once_and_kernels_per_call(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import timing

    # Two calls on one GPU; kernel b overlaps a by 5 ns on another stream each time.
    events = {"/device:GPU:0": [("a", 0, 10.0), ("b", 5, 10.0), ("a", 20, 10.0), ("a", 40, 10.0), ("b", 45, 10.0)]}
    events["/device:GPU:0"].append(("a", 60, 10.0))
    assert timing.busy_seconds(events, calls=2) * 1e9 == pytest.approx(25.0)  # (15 + 10 + 15 + 10) / 2
    assert timing.kernel_totals(events, calls=2) == {"a": (20.0, 2), "b": (10.0, 1)}


def test_kernel_descriptions_name_what_each_kernel_of_a_decode_step_reads(monkeypatch):
    """The optimised HLO of a tiny model's decode step, compiled here: every kernel-level instruction is described
    under its profile name ("." as "_"), with the weights it reads named by their paths; the instructions inside
    fused computations are not kernels of their own."""
    import re

    import numpy as np

    from jaxdeep.serve.runner import CacheGeometry, ModelRunner
    from tests.test_serve_engine import CHUNK, CONTEXT, _loaded

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import timing

    runner = ModelRunner.from_loaded(_loaded("dense"), CacheGeometry(2, CONTEXT, CHUNK))
    zeros = np.zeros(2, np.int32)
    batch = runner.decode_batch(np.array([1, 2], np.int32), np.array([3, 4]), zeros, zeros, np.ones(2), zeros, zeros)
    hlo = runner.decode_steps_hlo(runner.new_cache(), batch, 2, "greedy")
    described = timing.kernel_descriptions(hlo)
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    kernels = {
        m.replace(".", "_")
        for m in re.findall(r"^\s*(?:ROOT )?%(\S+) = .*? (?:fusion|custom-call|copy)\(", entry, re.M)
    }
    assert kernels and kernels <= set(described)  # every fusion, custom call and copy of the program
    assert not any(name.startswith("param_") for name in described)  # fused computations' parameters
    reads = " ".join(described.values())
    for weight in ("blocks.attn.wq", "blocks.mlp.w_in", "blocks.mlp.w_out", "embed"):
        assert f" of {weight}" in reads or f", {weight}" in reads, weight
