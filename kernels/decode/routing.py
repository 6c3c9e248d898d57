"""A DeepSeek MoE layer's expert choice for a few tokens in one launch: scores (softmax or sigmoid of the router's
logits), the selection bias, and the greedy top-k.

XLA runs this as a softmax kernel and a sort of each token's scores, about 3.8 µs a layer on an H200 for one token;
this kernel took 2.3 (experiments/benchmarks/RESULTS.md). Here one program per token holds its E scores in
registers and takes the k largest one at a time: the maximum, then the lowest expert holding it, which is
`lax.top_k`'s order (ties to the lower index). Only the choice sees the bias; the weights are the chosen experts'
scores. Scores that do not compare (NaN) are never preferred, where `lax.top_k` ranks NaN first; the kernel still
returns k distinct experts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.decode import runtime

SCORINGS = ("softmax", "sigmoid")
MAX_EXPERTS = 1024  # one program holds a token's scores in registers


def _scoring_error(scoring: str) -> str | None:
    return None if scoring in SCORINGS else f"scoring must be one of {SCORINGS}, got {scoring!r}"


def scores_of(logits_te, scoring: str):
    if reason := _scoring_error(scoring):
        raise ValueError(f"route: {reason}")
    logits_te = logits_te.astype(jnp.float32)
    return jax.nn.softmax(logits_te, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits_te)


def route_reference(logits_te, bias_e, k: int, scoring: str):
    """(experts [t, k] int32, their scores [t, k] float32, scores [t, E] float32): the k experts of largest score
    plus bias (`bias_e` may be None), largest first."""
    scores_te = scores_of(logits_te, scoring)
    choice_te = scores_te if bias_e is None else scores_te + bias_e.astype(jnp.float32)
    _, experts_tk = jax.lax.top_k(choice_te, k)
    return experts_tk.astype(jnp.int32), jnp.take_along_axis(scores_te, experts_tk, axis=-1), scores_te


def check(logits_te, k: int, scoring: str) -> str | None:
    """Why the kernel cannot take these shapes or this scoring, or None."""
    e = logits_te.shape[-1]
    if logits_te.ndim != 2:
        return f"logits must be [tokens, experts], got shape {logits_te.shape}"
    if e & (e - 1) or e > MAX_EXPERTS:
        return f"{e} experts: the kernel takes a power of two up to {MAX_EXPERTS}"
    if not 0 < k <= e:
        return f"k = {k} for {e} experts"
    return _scoring_error(scoring)


def _kernel(logits_ref, bias_ref, experts_ref, weights_ref, scores_ref, *, k: int, scoring: str, experts: int):
    t = pl.program_id(0)
    logits = logits_ref[t, :].astype(jnp.float32)
    if scoring == "softmax":
        exp = jnp.exp(logits - jnp.max(logits))
        scores = exp / jnp.sum(exp)
    else:
        scores = 1.0 / (1.0 + jnp.exp(-logits))
    scores_ref[t, :] = scores
    choice = scores + bias_ref[:]
    index = jnp.arange(experts)
    taken = index < 0
    for r in range(k):  # k is small: the loop is laid out straight
        left = jnp.where(taken, -jnp.inf, choice)
        best = jnp.min(jnp.where((left == jnp.max(left)) & ~taken, index, experts))
        # Where no score compares (NaN), the lowest expert not yet taken: always k distinct, valid experts.
        best = jnp.where(best < experts, best, jnp.min(jnp.where(taken, experts, index)))
        picked = index == best
        experts_ref[t, r] = best
        weights_ref[t, r] = jnp.sum(jnp.where(picked, scores, 0.0))
        taken = taken | picked


def route(logits_te, bias_e, k: int, scoring: str, interpret: bool = False):
    """`route_reference` as one kernel launch, one program per token."""
    if reason := check(logits_te, k, scoring):
        raise ValueError(f"route: {reason}")
    t, e = logits_te.shape
    bias = jnp.zeros((e,), jnp.float32) if bias_e is None else bias_e.astype(jnp.float32)
    return runtime.call(
        functools.partial(_kernel, k=k, scoring=scoring, experts=e),
        grid=(t,),
        inputs=(logits_te.astype(jnp.float32), bias),
        out_shapes=(
            jax.ShapeDtypeStruct((t, k), jnp.int32),
            jax.ShapeDtypeStruct((t, k), jnp.float32),
            jax.ShapeDtypeStruct((t, e), jnp.float32),
        ),
        num_warps=1,
        interpret=interpret,
        poison=False,
    )
