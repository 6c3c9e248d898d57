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
