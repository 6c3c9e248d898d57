"""experiments/hybrid_4x2x2.yaml (data 4 × tensor 2 × pipeline 2) on 16 simulated CPU devices takes the same
train step as one device. The session's other tests hold 8 devices, so this runs in its own process."""

import json

from tests.multihost import REPO_ROOT, run_processes

SNIPPET = """
import json
import numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from jaxdeep.config import load_config
from jaxdeep.train.loop import mesh_from_config
from jaxdeep.train.state import build_setup, init_train_state
from jaxdeep.train.step import make_train_step
from tests.helpers import max_rel_error

tiny = ["model.d_model=32", "model.n_heads=2", "model.head_dim=16", "model.d_ff=64", "data.seq_len=16"]
cfg = load_config(CONFIG, tiny)
mesh, _ = mesh_from_config(cfg)
one_cfg = load_config(CONFIG, [*tiny, "mesh.data=1", "mesh.tensor=1", "mesh.pipeline=1", "mesh.topology=auto"])
one_mesh, _ = mesh_from_config(one_cfg, jax.devices()[:1])
one = build_setup(one_cfg, one_mesh)
state = jax.device_get(init_train_state(one))
tokens = np.random.default_rng(0).integers(1, 256, (cfg.data.global_batch_size, 17)).astype(np.int32)
want = jax.device_get(make_train_step(one)(state, tokens))
hybrid = build_setup(cfg, mesh)
got = jax.device_get(make_train_step(hybrid)(jax.device_put(state, hybrid.state_shardings), tokens))
print("RESULT " + json.dumps({
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "devices": jax.device_count(),
    "loss": max_rel_error(got[1]["loss"], want[1]["loss"]),
    "params": max_rel_error(got[0]["params"], want[0]["params"]),
    "opt_state": max_rel_error(got[0]["opt_state"], want[0]["opt_state"]),
    "moved": max_rel_error(got[0]["params"], state["params"]),
}))
"""


def test_hybrid_4x2x2_on_16_devices_matches_one_device():
    code = SNIPPET.replace("CONFIG", repr(str(REPO_ROOT / "experiments" / "hybrid_4x2x2.yaml")))
    fast = "--xla_force_host_platform_device_count=16 --xla_backend_optimization_level=0"  # see fast_compile.py
    (out,) = run_processes(code, 1, 16, timeout=400, env={"XLA_FLAGS": fast})
    (line,) = [line for line in out.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line[len("RESULT ") :])
    assert result["devices"] == 16
    assert result["mesh"] == {"data": 4, "pipeline": 2, "fsdp": 1, "expert": 1, "tensor": 2}
    for key in ("loss", "params", "opt_state"):
        assert result[key] <= 1e-5, f"{key} differ from one device by {result[key]:.2e}"
    assert result["moved"] > 1e-4  # the step changed the parameters: the comparison is not vacuous
