"""Rotary positions for MLA's decoupled key/query part, with YaRN long-context scaling.

YaRN keeps fast-rotating frequencies (short wavelengths, extrapolation), divides slow ones by `factor`
(interpolation) with a linear ramp in between, scales cos/sin by `attention_factor`, and corrects the
softmax scale by mscale(factor, mscale_all_dim)², as in DeepSeek-V2/V3.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdeep.config import RopeScalingConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """0.1·mscale·ln(factor) + 1 for factor > 1, else 1."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, theta: float, max_positions: int) -> float:
    """The (fractional) dim index whose frequency makes `rotations` turns over `max_positions`."""
    return dim * math.log(max_positions / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def inverse_frequencies(dim: int, theta: float, scaling: RopeScalingConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [dim/2] as float32, cos/sin magnitude factor)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base_freqs = np.float32(theta) ** exponents  # float32, as the reference computes them
    extrapolated = 1.0 / base_freqs
    if scaling.type == "none":
        return extrapolated.astype(np.float32), 1.0
    factor = scaling.factor
    low = _correction_dim(scaling.beta_fast, dim, theta, scaling.original_max_position_embeddings)
    high = _correction_dim(scaling.beta_slow, dim, theta, scaling.original_max_position_embeddings)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp  # 1 = extrapolate (keep the original frequency), 0 = interpolate
    interpolated = 1.0 / (factor * base_freqs)
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    if scaling.mscale and scaling.mscale_all_dim:
        magnitude = yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, scaling.mscale_all_dim)
    else:
        magnitude = yarn_mscale(factor)
    return inv_freq.astype(np.float32), float(magnitude)


def softmax_scale(qk_head_dim: int, scaling: RopeScalingConfig) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)² under YaRN."""
    scale = qk_head_dim**-0.5
    if scaling.type == "yarn" and scaling.mscale_all_dim:
        scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
    return scale


def rope_tables(seq_len: int, dim: int, theta: float, scaling: RopeScalingConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin [seq, dim/2] (float32) for positions 0..seq_len-1, magnitude factor included."""
    inv_freq, magnitude = inverse_frequencies(dim, theta, scaling)
    angles_th = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(angles_th) * magnitude, jnp.sin(angles_th) * magnitude


def apply_rope(x_btnh: jax.Array, cos_th: jax.Array, sin_th: jax.Array, interleave: bool) -> jax.Array:
    """Rotate the last axis. `interleave`: pairs are (x0, x1), (x2, x3), ...; else (x_i, x_{i+dim/2}).

    The output always comes in the half layout [rotated firsts, rotated seconds]: queries and keys get the
    same layout, so their dot products are those of the interleaved rotation.
    """
    x = x_btnh.astype(jnp.float32)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos_th[None, :, None, :], sin_th[None, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)
