"""A real slow link, CI-sized: two JAX processes in separate network namespaces joined by tc-shaped veth links
(1 Gbit/s) train the same small model dense and with hierarchical top-k compression.

The full-sized benchmark is experiments/benchmarks/bench_compression_slow_link.py (same harness); this test checks
that compressed training runs across the link, sends far fewer bytes over it than the dense all-reduce, and that
the bytes the interface counted match the byte accounting in the metrics. Step times are printed, not asserted:
a shared CI machine makes them noisy.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "experiments" / "benchmarks" / "bench_compression_slow_link.py"


def _harness():
    spec = importlib.util.spec_from_file_location("bench_compression_slow_link", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = [
    "model.d_model=64",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.head_dim=32",
    "model.d_ff=1024",
    "model.dtype=float32",
    "data.max_bytes=200000",
    "data.seq_len=16",
    "data.global_batch_size=4",
    "optim.warmup_steps=2",
    "train.eval_batches=1",
    "mesh.data=-1",
    "mesh.topology=auto",
    "optim.topk.min_size=256",
]


@pytest.mark.slow
def test_compressed_training_over_a_shaped_link_sends_far_fewer_bytes():
    harness = _harness()
    reason = harness.netns_unavailable()
    if reason:
        pytest.skip(f"no network namespaces here: {reason}")
    spec = {
        "config": None,
        "overrides": SMALL,
        "variants": [
            {"name": "dense", "overrides": []},
            {"name": "topk_hierarchical", "overrides": ["optim.compression=topk_hierarchical"]},
        ],
        "steps": 6,
        "warmup": 2,
        "loss_window": 1,
    }
    devices_per_host = 2
    with harness.slow_network(2, "1gbit", "1ms") as hosts:
        records = {r["variant"]: r for r in harness.run_workers(hosts, devices_per_host, spec, timeout=600)}
    dense, compressed = records["dense"], records["topk_hierarchical"]
    shown = ("step_time_s", "tx_bytes_per_step", "eval_loss")
    print(json.dumps({name: {k: r[k] for k in shown} for name, r in records.items()}))
    for record in records.values():
        assert record["processes"] == 2 and record["devices"] == 4
        assert all(math.isfinite(x) for x in record["losses"])
    # data=4 = 2 devices per process (dense, local tier) x 2 processes (top-k, network tier).
    assert "data_network=2" in compressed["plan"] and "data_local=2" in compressed["plan"]
    assert compressed["tx_bytes_per_step"] * 4 < dense["tx_bytes_per_step"]
    # What the interface sent per step is what the accounting says both devices of the host send on the network
    # tier, plus TCP/IP framing and the coordinator's heartbeats.
    modelled = devices_per_host * compressed["comm_bytes_network"]
    assert modelled <= compressed["tx_bytes_per_step"] <= 1.3 * modelled + 20_000
