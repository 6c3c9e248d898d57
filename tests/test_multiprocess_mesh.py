"""The mesh across several jax processes (2 x 4 simulated CPU devices, gloo), and the launcher itself."""

import json

import numpy as np
import pytest

from tests.multihost import MultiprocessError, run_processes

MESH_SNIPPET = """
import json
import numpy as np
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from meshes import AXES, Topology, build_mesh

mesh = build_mesh({"data": 2, "tensor": -1}, Topology.auto())
shape = (4, 8)
full = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
sharding = NamedSharding(mesh, P("data", "tensor"))
# Each process fills only the shards of its own devices, as a real multi-host input pipeline would.
x = jax.make_array_from_callback(shape, sharding, lambda index: full[index])
total = jax.jit(lambda a: jnp.sum(a * a), out_shardings=NamedSharding(mesh, P()))(x)
row_sums = jax.jit(lambda a: jnp.sum(a, axis=1), out_shardings=NamedSharding(mesh, P()))(x)
print(json.dumps({
    "process": jax.process_index(),
    "axis_names": list(mesh.axis_names),
    "shape": [int(mesh.shape[a]) for a in AXES],
    "process_of": [[d.process_index for d in np.asarray(mesh.devices)[i].flat] for i in range(2)],
    "device_ids": [d.id for d in mesh.devices.flat],
    "local_shards": len(x.addressable_shards),
    "total": float(total),
    "row_sums": np.asarray(row_sums).tolist(),
    "tiers": [t.name for t in Topology.auto().tiers],
}))
"""


def test_two_processes_build_the_same_global_mesh_and_reduce_across_it():
    outputs = run_processes(MESH_SNIPPET, n_processes=2, devices_per_process=4, timeout=180)
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    full = np.arange(32, dtype=np.float32).reshape(4, 8)
    for process_id, result in enumerate(results):
        assert result["process"] == process_id
        assert result["axis_names"] == ["data", "pipeline", "fsdp", "expert", "tensor"]
        assert result["shape"] == [2, 1, 1, 1, 4]
        # data slice i holds exactly process i's devices: tensor traffic never leaves a process.
        assert result["process_of"] == [[0, 0, 0, 0], [1, 1, 1, 1]]
        assert result["local_shards"] == 4
        assert result["total"] == pytest.approx(float(np.sum(full * full)))
        np.testing.assert_allclose(result["row_sums"], full.sum(axis=1))
        assert result["tiers"] == ["local", "network"]
    # Every process sees one global mesh in one device order.
    assert results[0]["device_ids"] == results[1]["device_ids"]


def test_launcher_reports_the_failing_process_and_its_error():
    code = "if PROCESS_ID == 1:\n    raise ValueError('boom from one')\nimport time\ntime.sleep(60)\n"
    with pytest.raises(MultiprocessError) as caught:
        run_processes(code, n_processes=2, devices_per_process=1, timeout=60)
    message = str(caught.value)
    assert "process 1 of 2 failed" in message
    assert "ValueError: boom from one" in message


@pytest.mark.slow
def test_launcher_times_out_and_shows_every_process():
    with pytest.raises(MultiprocessError) as caught:
        run_processes("import time\ntime.sleep(120)\n", n_processes=2, devices_per_process=1, timeout=5)
    message = str(caught.value)
    assert "did not finish within 5 s" in message
    assert "process 0" in message and "process 1" in message


@pytest.mark.slow
def test_launcher_gives_each_process_its_own_device_count():
    code = "print(jax.process_index(), jax.local_device_count(), jax.device_count(), NUM_PROCESSES)"
    outputs = run_processes(code, n_processes=3, devices_per_process=2, timeout=120)
    assert [out.split() for out in outputs] == [[str(i), "2", "6", "3"] for i in range(3)]


@pytest.mark.slow
def test_launcher_retries_when_the_coordinator_port_is_taken(monkeypatch):
    import socket

    from tests import multihost

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        real_free_port = multihost.free_port
        chosen = []

        def first_taken_then_free() -> int:
            chosen.append(ports.pop() if ports else real_free_port())
            return chosen[-1]

        monkeypatch.setattr(multihost, "free_port", first_taken_then_free)
        outputs = run_processes("print(jax.process_index())", n_processes=2, devices_per_process=1, timeout=60)
        assert outputs == ["0\n", "1\n"]
        assert len(chosen) == 2 and chosen[0] == taken.getsockname()[1]
        ports.append(taken.getsockname()[1])
        with pytest.raises(MultiprocessError, match="process 0 of 2 failed"):
            run_processes("print(1)", n_processes=2, devices_per_process=1, timeout=60, port_retries=0)
