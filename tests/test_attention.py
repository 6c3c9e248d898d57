"""The attention dispatcher (jaxdeep/model/attention.py): what "auto" takes, and that it falls back to XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxdeep.model import attention
from jaxdeep.model.attention import causal_attention, cudnn_unavailable_reason
from jaxdeep.sharding import use_rules
from tests.helpers import max_rel_error, tiny_config


def _qkv(dtype=jnp.bfloat16, batch=2, seq=16, heads=4, width=32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return [jax.random.normal(k, (batch, seq, heads, width), jnp.float32).astype(dtype) for k in keys]


def _loss_and_grads(implementation):
    def loss(q, k, v):
        return jnp.sum(causal_attention(q, k, v, implementation=implementation).astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _hlo(implementation, qkv) -> str:
    return _loss_and_grads(implementation).lower(*qkv).as_text()


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def _as_on_a_hopper_gpu(monkeypatch):
    monkeypatch.setattr(attention, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(attention, "_compute_capability", lambda: (9, 0))


def test_auto_is_xla_without_a_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is visible")
    qkv = _qkv(jnp.float32)
    assert "no GPU" in cudnn_unavailable_reason(qkv[0])
    _assert_same(_loss_and_grads("auto")(*qkv), _loss_and_grads("xla")(*qkv))
    expected = jax.nn.dot_product_attention(*qkv, is_causal=True)
    np.testing.assert_allclose(causal_attention(*qkv), expected, rtol=0, atol=0)


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="'flash'"):
        causal_attention(*_qkv(), implementation="flash")


def test_auto_needs_half_precision_and_an_unsplit_sequence(monkeypatch):
    _as_on_a_hopper_gpu(monkeypatch)
    assert "float32" in cudnn_unavailable_reason(_qkv(jnp.float32)[0])
    q = _qkv(jnp.bfloat16)[0]
    assert cudnn_unavailable_reason(q) is None
    monkeypatch.setattr(attention, "_compute_capability", lambda: (7, 5))  # a Turing GPU
    assert "compute capability 8.0" in cudnn_unavailable_reason(q)
    monkeypatch.setattr(attention, "_compute_capability", lambda: (9, 0))
    rules = tiny_config().sharding.rules
    axes = ("data", "pipeline", "fsdp", "expert", "tensor")
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(2, 1, 1, 1, 1), axes)
    with use_rules({**rules, "batch": [], "act_seq": ["data"]}, mesh):
        assert "sequence axis is split" in cudnn_unavailable_reason(q)
    with use_rules({**rules, "batch": ["data"], "act_seq": []}, mesh):
        assert cudnn_unavailable_reason(q) is None
    with use_rules({**rules, "batch": [], "act_seq": ["fsdp", "data"]}, mesh):  # several axes, one of them split
        assert "sequence axis is split" in cudnn_unavailable_reason(q)


def test_auto_takes_xla_inside_a_shard_map_over_part_of_the_mesh(monkeypatch):
    """A pipeline stage runs in a shard_map over the pipeline axis only; cuDNN's partitioning rule then sees no
    mesh, so "auto" takes XLA's attention there. A shard_map over every axis runs per device: cuDNN may."""
    _as_on_a_hopper_gpu(monkeypatch)
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(2, 1), ("pipeline", "data"))
    reasons = {}

    def stage(name):
        def body(x):
            reasons[name] = cudnn_unavailable_reason(x)
            return x

        return body

    x = jnp.zeros((2, 16, 4, 32), jnp.bfloat16)
    spec = jax.sharding.PartitionSpec("pipeline")
    jax.shard_map(stage("part"), mesh=mesh, in_specs=spec, out_specs=spec, axis_names={"pipeline"})(x)
    jax.shard_map(stage("whole"), mesh=mesh, in_specs=spec, out_specs=spec)(x)
    assert "shard_map over mesh axes ['pipeline'] only" in reasons["part"]
    assert reasons["whole"] is None


def test_auto_falls_back_to_xla_when_jax_refuses_cudnn(monkeypatch):
    """Where JAX refuses the cuDNN call at trace time (on a CPU: no cuDNN at all), "auto" runs XLA's instead."""
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN can run here")
    _as_on_a_hopper_gpu(monkeypatch)
    qkv = _qkv(jnp.bfloat16)
    with pytest.raises(RuntimeError):
        causal_attention(*qkv, implementation="cudnn")
    _assert_same(_loss_and_grads("auto")(*qkv), _loss_and_grads("xla")(*qkv))


@pytest.mark.gpu
def test_auto_takes_cudnn_on_a_gpu_for_bf16():
    qkv = _qkv(jnp.bfloat16, batch=2, seq=256, heads=4, width=64)
    assert cudnn_unavailable_reason(qkv[0]) is None
    assert "cudnn" in _hlo("auto", qkv).lower()
    assert "cudnn" not in _hlo("xla", qkv).lower()
    assert _hlo("auto", qkv) == _hlo("cudnn", qkv)  # the same program (cuDNN's backward need not be deterministic)
    # XLA's attention in float32 on the same (bf16) values agrees within bf16's error
    loss_auto, grads_auto = _loss_and_grads("auto")(*qkv)
    loss_ref, grads_ref = _loss_and_grads("xla")(*[a.astype(jnp.float32) for a in qkv])
    assert max_rel_error(loss_auto, loss_ref) < 1e-2
    assert max_rel_error(grads_auto, grads_ref) < 3e-2


@pytest.mark.gpu
def test_auto_takes_xla_on_a_gpu_for_float32():
    qkv = _qkv(jnp.float32, seq=64)
    assert "float32" in cudnn_unavailable_reason(qkv[0])
    assert "cudnn" not in _hlo("auto", qkv).lower()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "deepseek"])
def test_models_take_cudnn_under_auto_on_a_gpu(kind):
    """Both models' gradients in bf16 run cuDNN attention under "auto" (MLA's q/k and v widths padded to one)."""
    from flax import nnx

    from jaxdeep.model import DeepSeekModel, Transformer
    from tests.test_deepseek_train import DEEPSEEK

    overrides = ["model.dtype=bfloat16", "model.attention=auto", "model.head_dim=16"]
    if kind == "deepseek":
        overrides += [*DEEPSEEK, "model.deepseek.num_nextn_predict_layers=0"]
    cfg = tiny_config(*overrides).model
    model = (DeepSeekModel if kind == "deepseek" else Transformer)(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((2, 64), jnp.int32)

    def loss(params):
        out = nnx.merge(graphdef, params).forward(tokens) if kind == "deepseek" else nnx.merge(graphdef, params)(tokens)
        logits = out[0] if isinstance(out, tuple) else out
        return jnp.mean(logits.astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).as_text().lower()
    assert "cudnn" in hlo
