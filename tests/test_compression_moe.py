"""Compression in the DeepSeek (MoE) train step: at ratio 1 it trains exactly like the uncompressed MoE step
(parameters, optimizer state, selection biases, losses) with gradient accumulation, with experts split over
`expert` and `tensor` inside each data replica; a sparse step keeps the data replicas identical; refusals."""

import jax
import numpy as np
import pytest

from jaxdeep.config import ConfigError
from jaxdeep.train.state import build_setup, make_init
from jaxdeep.train.step import batch_sharding, make_train_step
from tests.fast_compile import compiled
from tests.helpers import layout, max_rel_error
from tests.test_deepseek_train import DEEPSEEK

OVERRIDES = (*DEEPSEEK, "data.global_batch_size=16", "optim.topk.min_size=100", "optim.grad_accum_steps=2")
# Two steps at ratio 1 (a one-stage sparsity warm-up), then 5%: one compiled step serves both tests.
COMPRESSED = (
    "optim.compression=topk",
    "optim.topk.ratio=0.05",
    "optim.topk.warmup_steps=2",
    "optim.topk.warmup_start_ratio=1.0",
    "optim.topk.warmup_stages=1",
)
LAYOUT = dict(data=2, expert=2, tensor=2)  # expert all-to-all and tensor-split experts inside each data replica


def _tokens(step: int) -> np.ndarray:
    return np.random.default_rng(100 + step).integers(1, 256, (16, 17)).astype(np.int32)


class Run:
    """A train state stepped through `_tokens(0), _tokens(1), ...` by a step compiled once."""

    def __init__(self, initial: dict, *overrides: str):
        cfg, mesh = layout(*OVERRIDES, *overrides, **LAYOUT)
        self.setup = build_setup(cfg, mesh)
        start = initial if self.setup.compression else {**initial, "opt_state": initial["opt_state"][1]}
        self.state = jax.device_put(start, self.setup.state_shardings)
        self.step = compiled(make_train_step(self.setup), self.state, self._batch(0))
        self.steps = 0

    def _batch(self, i: int) -> jax.Array:
        return jax.device_put(_tokens(i), batch_sharding(self.setup))

    def advance(self, n: int) -> tuple[dict, dict]:
        """The state after n more steps and the last step's metrics, on the host."""
        for _ in range(n):
            self.state, metrics = self.step(self.state, self._batch(self.steps))
            self.steps += 1
        return jax.device_get(self.state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def initial():
    """One initial train state on the host, with the compression state; every run starts from it."""
    cfg, mesh = layout(*OVERRIDES, *COMPRESSED, **LAYOUT)
    setup = build_setup(cfg, mesh)
    return jax.device_get(compiled(make_init(setup), out_shardings=setup.state_shardings)())


@pytest.fixture(scope="module")
def compressed(initial):
    return Run(initial, *COMPRESSED)


def test_ratio_one_trains_like_the_uncompressed_moe_step(initial, compressed):
    dense, dense_metrics = Run(initial).advance(2)
    state, metrics = compressed.advance(2)
    assert compressed.setup.compression.plan.replica_axes == ("data",)  # expert and tensor split parameters
    assert metrics["comm_density"] == 1.0 and metrics["comm_bytes_local"] > 0
    # fp32, two steps of AdamW with two accumulated microbatches each: only summation order differs.
    assert max_rel_error(state["params"], dense["params"]) <= 1e-5
    assert max_rel_error(state["opt_state"][1], dense["opt_state"]) <= 1e-5
    # The selection biases follow the expert counts of the whole batch (both replicas), as without compression.
    assert max_rel_error(state["model_state"], dense["model_state"]) == 0.0
    assert np.abs(np.concatenate([np.ravel(b) for b in jax.tree.leaves(state["model_state"])])).max() > 0
    for key in ("loss", "total_loss", "mtp_loss", "moe_balance_loss", "moe_max_load", "moe_min_load"):
        assert metrics[key] == pytest.approx(dense_metrics[key], rel=1e-6), key
    assert metrics["grad_norm"] == pytest.approx(dense_metrics["grad_norm"], rel=1e-5)
    assert metrics["moe_dropped_tokens"] == dense_metrics["moe_dropped_tokens"] == 0.0
    assert "comm_bytes_local" not in dense_metrics


def test_sparse_moe_step_keeps_replicas_identical(compressed):
    if compressed.steps < 2:
        compressed.advance(2 - compressed.steps)  # through the ratio-1 stage
    before = jax.device_get(compressed.state["params"])
    host, metrics = compressed.advance(2)
    state = compressed.state
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["total_loss"])
    assert metrics["comm_density"] == pytest.approx(0.05)
    assert metrics["comm_compression_ratio"] > 5 and metrics["comm_bytes_local"] < metrics["comm_dense_bytes_local"]
    assert max_rel_error(host["params"], before) > 1e-4, "the parameters moved"
    comp_state = host["opt_state"][0]
    assert int(comp_state.count) == 4
    residual = np.asarray(comp_state.residual["moe_blocks"]["mlp"]["experts"]["gate_up_proj"])
    assert residual.shape[0] == 2 and np.abs(residual).sum() > 0, "error feedback holds the unsent entries"
    # Parameters (experts split over expert and tensor, the rest replicated) are the same on both data replicas.
    for leaf in (state["params"]["moe_blocks"]["mlp"]["experts"]["down_proj"], state["params"]["embed"]):
        by_index = {}
        for shard in leaf.addressable_shards:
            by_index.setdefault(str(shard.index), []).append(np.asarray(shard.data))
        assert by_index and all(len(copies) % 2 == 0 for copies in by_index.values())
        for copies in by_index.values():
            for copy in copies[1:]:
                np.testing.assert_array_equal(copy, copies[0])


def test_moe_compression_refusals():
    # Experts split over every device leave no data replica to compress over.
    cfg, mesh = layout(*DEEPSEEK, "optim.compression=topk", expert=8)
    with pytest.raises(ConfigError, match="optim.compression=topk: no axis to compress over.*mesh.data"):
        build_setup(cfg, mesh)
    # Pipeline parallelism is not available for the DeepSeek model, with or without compression.
    with pytest.raises(ConfigError, match="mesh.pipeline=2: .*model.kind=dense only.*set mesh.pipeline=1"):
        layout(*DEEPSEEK, "optim.compression=topk_hierarchical", data=2, pipeline=2)
