"""Dropless routed-expert computation: sort token copies by expert, grouped matmuls, unsort, combine.

On a mesh the whole computation runs per shard inside `jax.shard_map`: each device sorts only its own
tokens; expert weights split over FSDP axes are gathered; weights split over the `mlp` axes give partial
outputs that are summed; and when experts are split over mesh axes (expert parallelism) token copies
travel to the devices holding their experts by all-to-all and come back the same way. Nothing is dropped:
each device's send buffer has room for all of its token copies going to any one device.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxdeep import sharding
from jaxdeep.model.kernel_choice import DEFAULT_KERNELS, KernelChoice
from jaxdeep.model.matmul import activated_grouped, grouped, in_serving_layout, silu_gate
from kernels.gmm import auto_impl

TOKENS = ("batch", "act_seq", None)
GATE_UP = ("expert", "embed", None, "mlp")  # [E, d, 2, F]: gate and up projections side by side
DOWN = ("expert", "mlp", "embed")  # [E, F, d]


def expert_mlp(
    x_sd: jax.Array,
    group_sizes: jax.Array,
    gate_up_edcf: jax.Array,
    down_efd: jax.Array,
    kernels: KernelChoice = DEFAULT_KERNELS,
    *,
    weights_s: jax.Array | None = None,
):
    """SwiGLU experts over rows sorted by expert; rows past sum(group_sizes) give zeros. Both grouped matmuls run
    on the `gmm` implementation of `kernels`, or, when its `matmul` is "fp8", in FP8 on its `fp8` implementation
    (then `gmm` is not used): the gate/up product through `kernels.fp8.grouped.fp8_gmm`, the SwiGLU and the down
    product through `fp8_cached_gmm` (`matmul.activated_grouped`, which follows `fp8_down_input`).

    `weights_s` (each row's routing weight) scales the SwiGLU output before the down projection, which is linear,
    so each row comes out weighted and summing a token's rows is the combine. The weights' gradient then comes from
    the SwiGLU's backward, which recomputes it from its cached input anyway; weighting after the down projection
    would keep every row's output for that gradient instead (2 bytes per model dimension per row)."""
    e, d, _, f = gate_up_edcf.shape
    h_s2f = grouped(x_sd, gate_up_edcf.reshape(e, d, 2 * f), group_sizes, kernels).reshape(-1, 2, f)
    gate_up = (h_s2f[:, 0], h_s2f[:, 1])
    return activated_grouped(silu_gate, gate_up, down_efd, group_sizes, kernels, row_scale=weights_s)


def _sum_copies(y_weighted_sd: jax.Array, k: int) -> jax.Array:
    """float32 [T, d]: the sum of each token's k weighted copies (kept in token order, k per token)."""
    return y_weighted_sd.reshape(-1, k, y_weighted_sd.shape[-1]).astype(jnp.float32).sum(axis=1)


@jax.checkpoint  # the backward keeps y in the compute dtype, not its float32 copy
def _combine(y_copies_sd: jax.Array, weights_tk: jax.Array) -> jax.Array:
    t, k = weights_tk.shape
    y_tkd = y_copies_sd.reshape(t, k, -1).astype(jnp.float32)
    return jnp.einsum("tkd,tk->td", y_tkd, weights_tk.astype(jnp.float32))


def gathered_experts(x_td, experts_tk, weights_tk, gate_up_edcf, down_efd):
    """Each token copy multiplied by its own expert's weights, gathered: for one token's copies (decode at batch 1,
    as row reductions in the serving layout), or a few tokens' where only XLA's `ragged_dot` would run the grouped
    matmul, which reads every expert's weights (`gathers_experts`). Returns as `local_experts`. Meant for
    inference: its SwiGLU is differentiated as written, without `cached_activation`."""
    t, k = experts_tk.shape
    if t == 1 and in_serving_layout("experts"):  # one token, experts in the serving layout: row reductions
        h_kcf = _chosen_expert_products(jnp.broadcast_to(x_td, (k, x_td.shape[-1])), gate_up_edcf, experts_tk[0])
        h_kf = jax.nn.silu(h_kcf[:, 0]) * h_kcf[:, 1]
        y_kd = _chosen_expert_products(h_kf, down_efd, experts_tk[0])
        return _combine(y_kd, weights_tk), jnp.int32(k)
    h_tkcf = jnp.einsum("td,tkdcf->tkcf", x_td, gate_up_edcf[experts_tk])
    h_tkf = jax.nn.silu(h_tkcf[:, :, 0]) * h_tkcf[:, :, 1]
    y_tkd = jnp.einsum("tkf,tkfd->tkd", h_tkf, down_efd[experts_tk])
    return _combine(y_tkd.reshape(t * k, -1), weights_tk), jnp.int32(t * k)


def _chosen_expert_products(x_ki: jax.Array, w: jax.Array, experts_k: jax.Array) -> jax.Array:
    """[k, out...]: each row x_ki[j] times the matrix of expert experts_k[j] in w ([E, in, out...], stored in the
    serving layout: the input axis minor), as one row reduction over the chosen experts' rows.

    Viewed in its stored order, w is [E·out, in] rows, and each expert's rows are a contiguous run of them, so
    gathering rows keeps every row contiguous and the sum streams the chosen weights. Per-expert slices (one
    reduction each, which XLA fused side by side) ran DeepSeek 2B's six experts at 3.0 TB/s on an H200, gathered
    rows at 3.6 (experiments/benchmarks/RESULTS.md); a gather of whole experts lets XLA lay them out anew and
    walk the sum with a stride (0.9 TB/s)."""
    e, n_in, out = w.shape[0], w.shape[1], w.shape[2:]
    n_out = math.prod(out)
    rows_i = jnp.moveaxis(w, 1, -1).reshape(e * n_out, n_in)  # the stored order: a view, not a copy
    rows = (experts_k[:, None] * n_out + jnp.arange(n_out, dtype=experts_k.dtype)).reshape(-1)
    w_koi = rows_i[rows].reshape(experts_k.shape[0], n_out, n_in)
    y_ko = jnp.sum(w_koi.astype(jnp.float32) * x_ki[:, None, :].astype(jnp.float32), axis=-1)
    return y_ko.reshape(experts_k.shape[0], *out).astype(jnp.result_type(x_ki, w))


def gathers_experts(experts_tk, n_experts: int, dtype, kernels: KernelChoice = DEFAULT_KERNELS) -> bool:
    """Whether `local_experts` multiplies each token copy by its gathered expert instead of sorting the copies for
    the grouped matmuls: with `kernels.gmm` "auto" and `kernels.matmul` "bf16", for fewer copies than experts,
    when there is one token (its experts' products as row reductions) or no grouped kernel runs here. The grouped
    Triton kernel reads only the experts that have rows, where gathering the experts of a few tokens copies their
    weights first: on an H200 DeepSeek 2B's decode step of 2, 4 and 8 rows took 2.45, 4.17 and 7.90 ms gathered,
    0.65, 0.79 and 0.96 ms grouped (experiments/benchmarks/RESULTS.md)."""
    if kernels.gmm != "auto" or kernels.matmul != "bf16" or experts_tk.size >= n_experts:
        return False
    return experts_tk.shape[0] == 1 or auto_impl(dtype) == "reference"


def local_experts(x_td, experts_tk, weights_tk, gate_up_edcf, down_efd, kernels: KernelChoice = DEFAULT_KERNELS):
    """All experts on this device: one sort, two grouped matmuls (the weights applied between them), unsort, sum —
    or `gathered_experts` where `gathers_experts` says so.

    Returns the float32 output [T, d] and the number of token copies the experts computed."""
    n_experts, k = gate_up_edcf.shape[0], experts_tk.shape[1]
    if gathers_experts(experts_tk, n_experts, jnp.result_type(x_td, gate_up_edcf), kernels):
        return gathered_experts(x_td, experts_tk, weights_tk, gate_up_edcf, down_efd)
    flat = experts_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    inverse = _inverse(order)
    group_sizes = jnp.bincount(flat, length=n_experts)
    weights_sorted = _permute_rows(weights_tk.reshape(-1), order, inverse)
    y_sorted = expert_mlp(x_td[order // k], group_sizes, gate_up_edcf, down_efd, kernels, weights_s=weights_sorted)
    return _sum_copies(_permute_rows(y_sorted, inverse, order), k), group_sizes.sum()


def _inverse(order: jax.Array) -> jax.Array:
    """The inverse of the permutation `order`."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype), unique_indices=True)


@jax.custom_vjp
def _permute_rows(y: jax.Array, rows: jax.Array, inverse_rows: jax.Array) -> jax.Array:
    """y[rows] for a permutation `rows` whose inverse is `inverse_rows`: a gather whose backward gathers with the
    inverse and keeps nothing else. (Autodiff of the scatter that says the same keeps a mask and copies of y, and
    that of a plain gather builds a zero buffer for a scatter-add, which `shard_map`'s check of varying axes
    rejects under the per-replica `vmap` of compressed training.)"""
    return y.at[rows].get(unique_indices=True)


def _permute_rows_forward(y, rows, inverse_rows):
    return _permute_rows(y, rows, inverse_rows), inverse_rows


def _permute_rows_backward(inverse_rows, dy):
    return dy.at[inverse_rows].get(unique_indices=True), None, None


_permute_rows.defvjp(_permute_rows_forward, _permute_rows_backward)


def _all_to_all(x_pcd: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Block p of the leading axis goes to device p of `axes`; block s of the result came from device s."""
    return jax.lax.all_to_all(x_pcd, axes, 0, 0, tiled=True)


def expert_parallel(
    x_td, experts_tk, weights_tk, gate_up_edcf, down_efd, ep_axes, ep_size, kernels: KernelChoice = DEFAULT_KERNELS
):
    """Experts split over `ep_axes` (this device holds E/ep_size of them, in order); returns as `local_experts`,
    the count being the copies this device's experts computed (for tokens of any device)."""
    t, k = experts_tk.shape
    d = x_td.shape[-1]
    local_e = gate_up_edcf.shape[0]
    copies = t * k  # room per destination: every copy of this device's tokens could go to one device
    flat = experts_tk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    inverse = _inverse(order)
    sorted_experts = flat[order]
    dest = sorted_experts // local_e
    per_dest = jnp.bincount(dest, length=ep_size)
    rank_in_dest = jnp.arange(copies) - (jnp.cumsum(per_dest) - per_dest)[dest]
    slot = dest * copies + rank_in_dest
    send_x = jnp.zeros((ep_size * copies, d), x_td.dtype).at[slot].set(x_td[order // k], unique_indices=True)
    weights_sorted = _permute_rows(weights_tk.reshape(-1), order, inverse)
    send_w = jnp.zeros((ep_size * copies,), weights_tk.dtype).at[slot].set(weights_sorted, unique_indices=True)
    # Local expert id travels with each row; empty slots carry `local_e`, which sorts after every expert.
    send_e = jnp.full((ep_size * copies,), local_e, jnp.int32)
    send_e = send_e.at[slot].set(sorted_experts % local_e, unique_indices=True)
    recv_x = _all_to_all(send_x.reshape(ep_size, copies, d), ep_axes).reshape(-1, d)
    recv_e = _all_to_all(send_e.reshape(ep_size, copies), ep_axes).reshape(-1)
    recv_w = _all_to_all(send_w.reshape(ep_size, copies), ep_axes).reshape(-1)

    order_here = jnp.argsort(recv_e, stable=True)
    inverse_here = _inverse(order_here)
    group_sizes = jnp.bincount(recv_e, length=local_e + 1)[:local_e]
    weights_here = _permute_rows(recv_w, order_here, inverse_here)
    y_sorted = expert_mlp(recv_x[order_here], group_sizes, gate_up_edcf, down_efd, kernels, weights_s=weights_here)
    y_recv = _permute_rows(y_sorted, inverse_here, order_here)

    y_back = _all_to_all(y_recv.reshape(ep_size, copies, d), ep_axes).reshape(-1, d)
    return _sum_copies(_permute_rows(y_back[slot], inverse, order), k), group_sizes.sum()


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def routed_experts(
    x_btd,
    experts_btk,
    weights_btk,
    gate_up_edcf,
    down_efd,
    kernels: KernelChoice = DEFAULT_KERNELS,
):
    """Routed-expert output [b, t, d] (float32) of tokens x with their chosen experts and weights, and the
    number of token copies the experts computed (b·t·K when nothing is dropped)."""
    b, t, d = x_btd.shape
    k = experts_btk.shape[-1]
    tokens = sharding.active_spec(TOKENS)
    if tokens is None:
        y_td, computed = local_experts(
            x_btd.reshape(-1, d),
            experts_btk.reshape(-1, k),
            weights_btk.reshape(-1, k),
            gate_up_edcf,
            down_efd,
            kernels,
        )
        return y_td.reshape(b, t, d), computed
    mesh, token_spec = tokens
    _, gate_up_spec = sharding.active_spec(GATE_UP)
    _, down_spec = sharding.active_spec(DOWN)
    ep_axes, embed_axes, mlp_axes = _axes(gate_up_spec[0]), _axes(gate_up_spec[1]), _axes(gate_up_spec[3])
    if _axes(down_spec[0]) != ep_axes or _axes(down_spec[1]) != mlp_axes or _axes(down_spec[2]) != embed_axes:
        raise ValueError(f"expert weights split inconsistently: gate_up {gate_up_spec}, down {down_spec}")
    ep_size = math.prod(mesh.shape[a] for a in ep_axes)

    def per_shard(x_btd, experts_btk, weights_btk, gate_up_edcf, down_efd):
        if embed_axes:  # FSDP: gather this layer's expert weights (their gradient is reduce-scattered back)
            gate_up_edcf = jax.lax.all_gather(gate_up_edcf, embed_axes, axis=1, tiled=True)
            down_efd = jax.lax.all_gather(down_efd, embed_axes, axis=2, tiled=True)
        bl, tl = x_btd.shape[:2]
        args = (x_btd.reshape(-1, d), experts_btk.reshape(-1, k), weights_btk.reshape(-1, k), gate_up_edcf, down_efd)
        if ep_size > 1:
            y_td, computed = expert_parallel(*args, ep_axes, ep_size, kernels)
        else:
            y_td, computed = local_experts(*args, kernels)
        if mlp_axes:  # each device holds a slice of every expert's hidden units: sum the partial outputs
            y_td = jax.lax.psum(y_td, mlp_axes)
        # Every copy is computed on exactly one device of the token axes (replicas over the rest agree).
        return y_td.reshape(bl, tl, d), jax.lax.psum(computed, token_axes)

    token_axes = tuple(a for entry in token_spec for a in _axes(entry))
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, gate_up_spec, down_spec),
        out_specs=(token_spec, PartitionSpec()),
    )(x_btd, experts_btk, weights_btk, gate_up_edcf, down_efd)
