"""The models' projections in the compute dtype or in FP8, as `precision.matmul` chooses.

Every projection of the models contracts the trailing axes of an activation with the leading axes of a weight
(`btd,dnh->btnh`, `btnh,nhd->btd`, ...). With "bf16" `project` is exactly that `jnp.einsum`; with "fp8" it
views the operands as x [..., K] and w [K, N] (K and N the products of the contracted and the kept weight
axes) and calls `kernels.fp8.fp8_linear`. Merging axes there only joins an axis with the ones after it, so a
sharded leading axis (heads, mlp, embed) stays the major part of the merged axis and keeps its split.
The routed experts' grouped matmuls switch likewise in `grouped`. The choice comes as a `KernelChoice`:
`matmul` (config `precision.matmul`) picks the precision, `fp8` (config `kernels.fp8`) the FP8 kernels
(`kernels.fp8`: "auto" takes the Triton kernels where they can run), `gmm` (config `kernels.gmm`) the grouped
matmul in the compute dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxdeep import sharding
from jaxdeep.model.kernel_choice import DEFAULT_KERNELS, KernelChoice, Matmul
from kernels import fp8
from kernels.fp8.grouped import fp8_cached_gmm, fp8_gmm
from kernels.gmm import gmm

PROJECTION_OUTPUT = "projection_output"  # checkpoint name of an FP8 projection's output (see remat_policy)


def _contracted(subscripts: str) -> int:
    """How many trailing axes of x meet the leading axes of w; an error for any other contraction."""
    inputs, out = subscripts.replace(" ", "").split("->")
    x_axes, w_axes = inputs.split(",")
    n = 0
    while n < len(w_axes) and w_axes[n] in x_axes:
        n += 1
    if n == 0 or x_axes[len(x_axes) - n :] != w_axes[:n] or out != x_axes[: len(x_axes) - n] + w_axes[n:]:
        raise ValueError(f"{subscripts!r}: an FP8 projection contracts x's trailing axes with w's leading axes")
    return n


def projection_impl(fp8_impl: str) -> str:
    """The FP8 implementation a projection uses. A kernel call is opaque to the SPMD partitioner, which would gather
    its operands onto every device, so on a mesh of several devices "auto" takes the pure-JAX reference
    (partitioned like any XLA op); "triton" still forces the kernels. The routed experts run per device inside
    `shard_map` and keep the kernels."""
    if fp8_impl == "auto" and sharding.active_spec(()) is not None:
        return "reference"
    return fp8_impl


_SERVING_LAYOUT: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("serving_layout", default=frozenset())


@contextlib.contextmanager
def serving_layout(groups: Iterable[str]):
    """While tracing inside, the weights of `groups` ("projections": `project`'s; "experts": the routed experts')
    are stored with their contracted axes minor, the serving layout (`jaxdeep/serve/layout.py`), and the products
    adapt: single-row products run as `single_row_product`, a row reduction that streams such a weight; the
    routed experts' grouped matmuls read their weights transposed, in place. On the model's own layout the same
    reduction would walk each weight with a stride, and an einsum is faster."""
    token = _SERVING_LAYOUT.set(frozenset(groups))
    try:
        yield
    finally:
        _SERVING_LAYOUT.reset(token)


_DECODE_KERNELS: contextvars.ContextVar[str] = contextvars.ContextVar("decode_kernels", default="xla")


@contextlib.contextmanager
def decode_kernels(impl: str):
    """While tracing inside: single-token work that has a serving kernel (`kernels.decode`) runs on it with
    implementation `impl` ("pallas" or "interpret"; "xla" keeps the model's code). Set by the serving runner."""
    token = _DECODE_KERNELS.set(impl)
    try:
        yield
    finally:
        _DECODE_KERNELS.reset(token)


def decode_kernel() -> str:
    """The `kernels.decode` implementation single-token work runs on here (`decode_kernels`), or "xla"."""
    return _DECODE_KERNELS.get()


def in_serving_layout(group: str) -> bool:
    """Whether the weights of `group` are stored in the serving layout here (`serving_layout`)."""
    return group in _SERVING_LAYOUT.get()


def single_row_product(subscripts: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(subscripts, x, w)` for an x of one row (batch-1 decode) as a multiply and a float32 sum over the
    contracted axes. XLA runs that as one row reduction, which streams a weight stored with its contracted axes
    minor (the serving layout, `jaxdeep/serve/layout.py`) at about 3 TB/s on an H200, where a dot ran at 1.1-2.1
    (experiments/benchmarks/RESULTS.md)."""
    n = _contracted(subscripts)
    batch, kept = x.shape[: x.ndim - n], w.shape[n:]
    # The contracted axes go last in the logical order too, so the fusion reduces its minor dimensions whatever
    # layouts XLA picks for its intermediates (a gather of expert weights, say).
    w_out_in = jnp.moveaxis(w, tuple(range(n)), tuple(range(w.ndim - n, w.ndim)))
    x_in = x.reshape(x.shape[x.ndim - n :]).astype(jnp.float32)
    y = jnp.sum(w_out_in.astype(jnp.float32) * x_in, axis=tuple(range(w.ndim - n, w.ndim)))
    return y.reshape(*batch, *kept).astype(jnp.result_type(x, w))


def project(subscripts: str, x: jax.Array, w: jax.Array, kernels: KernelChoice = DEFAULT_KERNELS) -> jax.Array:
    """`jnp.einsum(subscripts, x, w)` for a projection, in FP8 when `kernels.matmul` is "fp8" (same shape and
    dtype); a single row as `single_row_product` inside `serving_layout(["projections"])`."""
    if kernels.matmul == "bf16":
        if in_serving_layout("projections") and math.prod(x.shape[: x.ndim - _contracted(subscripts)]) == 1:
            return single_row_product(subscripts, x, w)
        return jnp.einsum(subscripts, x, w)
    impl = projection_impl(kernels.fp8)
    return _fp8_projection(subscripts, (x,), w, lambda xs, w2d: fp8.fp8_linear(xs[0], w2d, impl=impl))


def _fp8_projection(subscripts: str, xs: Sequence[jax.Array], w: jax.Array, layer: Callable) -> jax.Array:
    """`layer(xs as [..., K], w as [K, N])` for the projection `subscripts` (K and N the products of the contracted
    and the kept weight axes), its output reshaped back and named for the remat policy."""
    n = _contracted(subscripts)
    batch, kept = xs[0].shape[: xs[0].ndim - n], w.shape[n:]
    k = math.prod(w.shape[:n])
    y = layer(tuple(x.reshape(*batch, k) for x in xs), w.reshape(k, math.prod(kept)))
    return checkpoint_name(y.reshape(*batch, *kept), PROJECTION_OUTPUT)


def project_shared(
    subscripts: str, x: jax.Array, weights: Sequence[jax.Array], kernels: KernelChoice = DEFAULT_KERNELS
) -> tuple[jax.Array, ...]:
    """`project(subscripts, x, w)` for several weights applied to one input (q/k/v, gate/up, MLA's two down
    projections).

    In FP8 the weights are joined into one (stacked right after their first kept axis when their shapes agree,
    so a sharded heads/mlp axis stays major; else concatenated along their single kept axis) and x is quantised
    once: one FP8 copy of x is saved for the backward instead of one per weight. A 128 x 128 weight block may
    then span two of the joined weights, which is as valid a block as any other.
    """
    if kernels.matmul == "bf16" or len(weights) == 1:
        return tuple(project(subscripts, x, w, kernels) for w in weights)
    n = _contracted(subscripts)
    batch = x.shape[: x.ndim - n]
    k = math.prod(x.shape[x.ndim - n :])
    shapes = {w.shape for w in weights}
    if len(shapes) == 1:
        kept = weights[0].shape[n:]
        joined = jnp.stack(weights, axis=n + 1)  # [K..., kept0, G, kept1...]
        y = fp8.fp8_linear(x.reshape(*batch, k), joined.reshape(k, -1), impl=projection_impl(kernels.fp8))
        y = y.reshape(*batch, kept[0], len(weights), *kept[1:])
        # Static slices: their gradients are pads that XLA sums in one pass, where `jnp.take` is a gather whose
        # gradient is a scatter-add (a pad and then an in-place update per weight, each a pass over dy).
        outs = tuple(jax.lax.index_in_dim(y, g, axis=len(batch) + 1, keepdims=False) for g in range(len(weights)))
    else:
        if any(w.ndim != n + 1 for w in weights):
            raise ValueError(f"project_shared: weights of different shapes {shapes} need a single kept axis")
        widths = [w.shape[n] for w in weights]
        joined = jnp.concatenate([w.reshape(k, -1) for w in weights], axis=1)
        y = fp8.fp8_linear(x.reshape(*batch, k), joined, impl=projection_impl(kernels.fp8))
        outs = tuple(jnp.split(y, list(itertools.accumulate(widths))[:-1], axis=-1))
    return tuple(checkpoint_name(o, PROJECTION_OUTPUT) for o in outs)


def grouped(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, kernels: KernelChoice = DEFAULT_KERNELS
) -> jax.Array:
    """The routed experts' grouped matmul: `kernels.gmm.gmm` with the choice's `gmm` implementation, or, when its
    `matmul` is "fp8", `fp8_gmm` with its `fp8` implementation. Inside `serving_layout(["experts"])` the weights
    [E, K, N] are stored [E, N, K]-major, and the product reads them so (as a Triton kernel's operand the
    transposed view is the buffer itself; the model's order would make XLA copy every expert first)."""
    if kernels.matmul == "bf16":
        if in_serving_layout("experts"):
            return gmm(lhs, jnp.swapaxes(rhs, 1, 2), group_sizes, impl=kernels.gmm, transpose_rhs=True)
        return gmm(lhs, rhs, group_sizes, impl=kernels.gmm)
    return fp8_gmm(lhs, rhs, group_sizes, impl=kernels.fp8)


def cached_activation(
    fn: Callable[..., jax.Array],
    *xs: jax.Array,
    row_scale: jax.Array | None = None,
    kernels: KernelChoice = DEFAULT_KERNELS,
):
    """`fn(*xs)` for the elementwise function between two projections (GELU, SwiGLU), whose backward keeps only xs
    and recomputes the rest: in FP8 1 x 128 tiles when `kernels.matmul` is "fp8" (DeepSeek-V3's cache of the
    SwiGLU input, `kernels.fp8.fp8_cached`), else as they are. Autodiff of `fn` itself would keep several of its
    intermediates, in float32 for GELU, each as wide as the MLP's hidden layer. `row_scale` (one value per row,
    kept as it is) multiplies the output in float32: the routed experts' weights, applied before the down
    projection so that the combine after it needs nothing from the forward.

    This is what a block keeps with `model.remat: none`. Under a remat policy the block's backward recomputes its
    forward from what the policy saves (with "save_matmuls" the projection outputs, this one's inputs among them),
    so the cache then saves no memory; it is made and read within the backward."""
    if kernels.matmul == "fp8":
        return fp8.fp8_cached(fn)(*xs, row_scale=row_scale)
    return jax.checkpoint(lambda scale, *a: fp8.times_rows(fn(*a), scale))(row_scale, *xs)


def activated_project(
    subscripts: str,
    fn: Callable[..., jax.Array],
    xs: Sequence[jax.Array],
    w: jax.Array,
    kernels: KernelChoice = DEFAULT_KERNELS,
) -> jax.Array:
    """`project(subscripts, cached_activation(fn, *xs), w)`: an MLP's activation and down projection.

    In FP8 with `fp8_down_input` "recompute" the two are one layer (`kernels.fp8.fp8_cached_linear`) whose
    backward keeps only the activation's inputs in FP8 and recomputes its output for the weight gradient; with
    "keep" the projection also keeps its own FP8 copy of the output, one byte per hidden unit and token."""
    if kernels.matmul == "bf16" or kernels.fp8_down_input == "keep":
        return project(subscripts, cached_activation(fn, *xs, kernels=kernels), w, kernels)
    impl = projection_impl(kernels.fp8)
    return _fp8_projection(subscripts, xs, w, lambda flat, w2d: fp8.fp8_cached_linear(fn, flat, w2d, impl=impl))


def activated_grouped(
    fn: Callable[..., jax.Array],
    xs: Sequence[jax.Array],
    rhs: jax.Array,
    group_sizes: jax.Array,
    kernels: KernelChoice = DEFAULT_KERNELS,
    *,
    row_scale: jax.Array | None = None,
) -> jax.Array:
    """`grouped(cached_activation(fn, *xs, row_scale=row_scale), rhs, group_sizes)`: the routed experts' SwiGLU and
    down projection, in FP8 with "recompute" as one layer (`kernels.fp8.grouped.fp8_cached_gmm`; see
    `activated_project`)."""
    if kernels.matmul == "bf16" or kernels.fp8_down_input == "keep":
        h = cached_activation(fn, *xs, row_scale=row_scale, kernels=kernels)
        return grouped(h, rhs, group_sizes, kernels)
    return fp8_cached_gmm(fn, tuple(xs), rhs, group_sizes, row_scale=row_scale, impl=kernels.fp8)


def silu_gate(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SwiGLU's gating: silu(gate) * up."""
    return jax.nn.silu(gate) * up


def remat_policy(remat: str, matmul: Matmul = "bf16"):
    """The `jax.checkpoint` policy of `model.remat` ("full" or "save_matmuls") for the blocks.

    "save_matmuls" keeps the outputs of the projections so the backward recomputes only the cheap rest. Its
    bf16 policy (every dot without batch dimensions) would, in FP8, keep the per-128-chunk float32 partial
    products inside the block-scaled GEMM instead: K/128 float32 copies of each output, many times the bf16
    bytes. In FP8 it therefore keeps the projection outputs by name, the same bytes as in bf16; the FP8
    operands the backward needs are quantised again from the recomputed inputs.
    """
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    if remat == "save_matmuls":
        if matmul == "fp8":
            return jax.checkpoint_policies.save_only_these_names(PROJECTION_OUTPUT)
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"model.remat must be full or save_matmuls here, got {remat!r}")
