"""optim.topk.precondition=rms: each replica clips its gradient and divides it by its own RMS before the top-k
exchange, and the optimizer after it is momentum alone. Checked against NumPy on random gradients over 8
simulated devices (data 4 × fsdp 2; hierarchical mode reduces pairs of replicas densely first)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdeep.config import ConfigError, OptimConfig, TopkConfig, load_config
from jaxdeep.optim import TopkOptions
from jaxdeep.train.optimizer import learning_rate_schedule, make_optimizer
from tests.test_compression_exchange import SHAPES, R, _grads, _setup

B2, EPS, CLIP = 0.95, 1e-8, 40.0  # the random gradients have norm ~100 per replica: the clip acts


def _rms_reference(raw_steps, group_size: int):
    """NumPy: clip each replica's gradient (norm over all its leaves) to CLIP, average each fast group, divide by
    the group's bias-corrected RMS. Returns per step {leaf: [groups, *shape]} of normalised group gradients."""
    groups = R // group_size
    moment = {k: np.zeros((groups, *s)) for k, s in SHAPES.items()}
    out = []
    for t, raw in enumerate(raw_steps, start=1):
        norms = np.sqrt(sum((raw[k].reshape(R, -1).astype(np.float64) ** 2).sum(1) for k in SHAPES))
        scale = np.minimum(1.0, CLIP / norms)
        step = {}
        for k in SHAPES:
            g = raw[k] * scale.reshape((R,) + (1,) * len(SHAPES[k]))
            g = g.reshape(groups, group_size, *SHAPES[k]).mean(1)
            moment[k] = B2 * moment[k] + (1 - B2) * g**2
            step[k] = g / (np.sqrt(moment[k] / (1 - B2**t)) + EPS)
        out.append(step)
    return out


def _options(**extra):
    return dict(precondition="rms", b2=B2, eps=EPS, clip_norm=CLIP, **extra)


@pytest.mark.parametrize("mode", ["topk", "topk_hierarchical"])
def test_ratio_one_is_the_mean_of_the_normalised_gradients(mode):
    reduction, update, state = _setup(mode, ratio=1.0, **_options())
    group_size = reduction.plan.fast_size
    raw_steps, outputs = [], []
    for step in range(3):
        grads, raw = _grads(reduction, 70 + step)
        mean, state = update(grads, state)
        raw_steps.append(raw)
        outputs.append(mean)
    for got, want in zip(outputs, _rms_reference(raw_steps, group_size), strict=True):
        for k in SHAPES:
            np.testing.assert_allclose(np.asarray(got[k]), want[k].mean(0), rtol=2e-5, atol=2e-6, err_msg=k)
    assert state.second_moment["w"].shape == (R, *SHAPES["w"]), "one second moment per replica"


@pytest.mark.parametrize("mode", ["topk", "topk_hierarchical"])
def test_error_feedback_conserves_the_normalised_mass(mode):
    """What the groups sent, plus what they hold back, is the sum of their normalised gradients; and at 5% most
    of it is held back after a few steps (the check can fail)."""
    reduction, update, state = _setup(mode, ratio=0.05, **_options())
    group_size = reduction.plan.fast_size
    groups = R // group_size
    raw_steps, sent = [], {k: np.zeros(s) for k, s in SHAPES.items()}
    for step in range(4):
        grads, raw = _grads(reduction, 80 + step)
        mean, state = update(grads, state)
        raw_steps.append(raw)
        for k in SHAPES:
            sent[k] += groups * np.asarray(mean[k], np.float64)
    normalised = _rms_reference(raw_steps, group_size)
    for k in ("w", "r"):  # compressed
        total = sum(step[k].sum(0) for step in normalised)
        kept = np.asarray(state.residual[k], np.float64).sum(0)
        np.testing.assert_allclose(sent[k] + kept, total, rtol=1e-4, atol=1e-4, err_msg=k)
        assert np.abs(kept).sum() > 0.5 * np.abs(total).sum(), f"{k}: at 5% most should still be held back"
    total_b = sum(step["b"].sum(0) for step in normalised)  # the small tensor went dense
    np.testing.assert_allclose(sent["b"], total_b, rtol=1e-4, atol=1e-5)


def test_options_and_config_refusals():
    with pytest.raises(ValueError, match="precondition"):
        TopkOptions(precondition="adam")
    with pytest.raises(ValueError, match="b2"):
        TopkOptions(precondition="rms", b2=1.0)
    with pytest.raises(ConfigError, match="momentum"):
        load_config(None, ["optim.topk.precondition=rms", "optim.topk.momentum=0.9"])
    with pytest.raises(ConfigError, match="freeze_variance_after"):
        load_config(None, ["optim.compression=topk", "optim.topk.precondition=rms", "optim.freeze_variance_after=5"])
    from jaxdeep.optim.build import topk_options

    cfg = load_config(None, ["optim.topk.precondition=rms", "optim.b2=0.9", "optim.clip_norm=2"])
    opts = topk_options(cfg.optim)
    assert (opts.precondition, opts.b2, opts.clip_norm, opts.eps) == ("rms", 0.9, 2.0, cfg.optim.eps)


def test_optimizer_after_the_exchange_is_momentum_weight_decay_and_learning_rate():
    cfg = OptimConfig(lr=0.1, warmup_steps=2, b1=0.8, weight_decay=0.5, compression="topk")
    cfg.topk = TopkConfig(precondition="rms")
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "norm": jnp.ones((3,))}
    mask = {"w": True, "norm": False}
    opt = make_optimizer(cfg, total_steps=10, decay_mask=mask)
    state = opt.init(params)
    schedule = learning_rate_schedule(cfg, 10)
    m = {k: np.zeros(v.shape) for k, v in params.items()}
    for step in range(3):
        g = {k: np.full(v.shape, float(step + 1)) for k, v in params.items()}
        updates, state = opt.update(jax.tree.map(jnp.asarray, g), state, params)
        for k in params:
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
            want = m[k] / (1 - cfg.b1 ** (step + 1)) + (cfg.weight_decay * np.asarray(params[k]) if mask[k] else 0)
            np.testing.assert_allclose(np.asarray(updates[k]), -float(schedule(step)) * want, rtol=1e-5, err_msg=k)
