"""Two processes × 4 devices (jax.distributed, gloo) train exactly like one process × 8 devices."""

import json

import pytest

from tests.multihost import run_processes

SNIPPET = """
import json, sys
import numpy as np
from jax.experimental import multihost_utils
from jaxdeep.train.loop import train
from tests.helpers import tiny_config

cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=3", "train.checkpoint_every=2")
result = train(cfg, sys.argv_run_dir)
params = multihost_utils.process_allgather(result.state["params"], tiled=True)
sums = [float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(params)]
print("RESULT " + json.dumps({"loss": result.last_loss, "eval": result.eval_loss, "sums": sums,
      "step": int(result.state["step"]), "processes": jax.process_count(), "devices": jax.device_count()}))
"""


def _results(outputs):
    lines = [line for out in outputs for line in out.splitlines() if line.startswith("RESULT ")]
    return [json.loads(line[len("RESULT ") :]) for line in lines]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    def run(n_proc, n_dev, name):
        code = SNIPPET.replace("sys.argv_run_dir", repr(str(tmp_path / name)))
        return _results(run_processes(code, n_proc, n_dev, timeout=300))

    (single,) = run(1, 8, "one")
    multi = run(2, 4, "two")
    assert len(multi) == 2
    assert single["processes"] == 1 and {r["processes"] for r in multi} == {2}
    assert {r["devices"] for r in multi} == {8} and single["devices"] == 8
    for r in multi:
        assert r["step"] == single["step"] == 3
        assert r["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert r["eval"] == pytest.approx(single["eval"], rel=1e-5)
        assert r["sums"] == pytest.approx(single["sums"], rel=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "3").is_dir()
