"""AdamW with linear warm-up, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxdeep.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate of the update made at step index i (0-based): warm-up reaches the peak at
    i = warmup_steps - 1, so the first update already moves the weights."""
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.warmup_steps + decay_steps,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )
    return lambda step: base(step + 1)


def scale_by_adam_frozen_v(b1: float, b2: float, eps: float, freeze_after: int) -> optax.GradientTransformation:
    """optax.scale_by_adam whose second moment stops after `freeze_after` updates (1-bit Adam, Tang et al. 2021).

    Updates 1..freeze_after compute what scale_by_adam computes. From update freeze_after + 1 on, `nu` keeps its
    value and its bias correction stays 1 - b2**freeze_after, so the step is linear in the incoming gradient (the
    first moment and its bias correction go on as usual): error feedback on a compressed gradient then delays
    entries without changing how much of them the optimizer applies.
    """
    if freeze_after < 1:
        raise ValueError(f"freeze_after must be >= 1, got {freeze_after}")

    def init_fn(params):
        zeros = optax.tree.zeros_like
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(params), nu=zeros(params))

    def update_fn(updates, state, params=None):
        del params
        count_inc = optax.safe_increment(state.count)
        frozen = count_inc > freeze_after
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        nu = jax.tree.map(lambda new, old: jnp.where(frozen, old, new), nu, state.nu)
        mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
        nu_hat = optax.tree.bias_correction(nu, b2, jnp.minimum(count_inc, freeze_after))
        updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
        mu = optax.tree.cast_like(mu, state.mu)
        nu = optax.tree.cast_like(nu, state.nu)
        return updates, optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg: OptimConfig, total_steps: int, decay_mask) -> optax.GradientTransformation:
    """`decay_mask`: pytree of bools like the params, True where weight decay applies.

    With `optim.topk.precondition: rms` the replicas have already clipped their gradients and divided them by
    their RMS before the compressed exchange (jaxdeep/optim/topk.py), so what remains here is Adam's first moment
    (bias-corrected), weight decay and the learning rate.
    """
    if cfg.compression != "none" and cfg.topk.precondition == "rms":
        return optax.chain(
            optax.ema(cfg.b1, debias=True),
            optax.add_decayed_weights(cfg.weight_decay, decay_mask),
            optax.scale_by_learning_rate(learning_rate_schedule(cfg, total_steps)),
        )
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    if cfg.freeze_variance_after > 0:
        # adamw's own chain with scale_by_adam swapped for the frozen-variance version: the same state tree, so a
        # checkpoint resumes with freezing switched on or off (resumed past N, v freezes at once, corrected by N)
        parts.append(
            optax.chain(
                scale_by_adam_frozen_v(cfg.b1, cfg.b2, cfg.eps, cfg.freeze_variance_after),
                optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                optax.scale_by_learning_rate(learning_rate_schedule(cfg, total_steps)),
            )
        )
        return optax.chain(*parts)
    parts.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
