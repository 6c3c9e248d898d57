"""AdamW with linear warm-up, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

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


def make_optimizer(cfg: OptimConfig, total_steps: int, decay_mask) -> optax.GradientTransformation:
    """`decay_mask`: pytree of bools like the params, True where weight decay applies."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
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
