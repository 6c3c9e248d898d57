"""Projection weights stored with their input dimensions minor, the memory layout a decode step reads best.

A decode step multiplies a few rows by every weight matrix. With the model's own layout, [in, out], each output
sums down a column of the weight, which XLA ran at a quarter to a half of the copy bandwidth on an H200. Stored
[out, in] (input dimensions minor), each output is a contiguous row, and a row reduction streams the weight at
about 3 TB/s (experiments/benchmarks/RESULTS.md). Only the physical layout changes: shapes, logical axes,
shardings and the model code stay as they are, and XLA adapts its prefill GEMMs to the layout; the routed
experts' grouped Triton matmul reads them transposed, in place. FP8 weights, which other kernels read row-major,
are left as they are (`relaid_groups`). The routed experts may also be split into one array per layer
(`split_layers`), which the serving runner stacks again inside its jitted steps, and the shared experts appended
to them for one token's decode (`with_shared_experts`). The runner finally holds every re-laid weight transposed
into its physical order, in the default layout (`in_default_layout`), which JAX dispatches without a call into
Python per weight; its steps transpose them back (`from_default_layout`) and XLA folds that into the layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding, PartitionSpec

# Projection name -> (dimensions of one matrix, how many of them are inputs). Leading dimensions beyond these
# (the layer stack, the experts) stay major. The output head is left alone, as it already streams at the copy
# rate; so is kv_b_proj, which absorbed MLA reads along both of its ends. The MoE router's `gate.weight`
# ([embed, experts]) is small, but read down its columns it took 5 µs a layer on an H200, 3-4 times its row
# reduction.
PROJECTIONS: dict[str, tuple[int, int]] = {
    # dense transformer
    "wq": (3, 1),
    "wk": (3, 1),
    "wv": (3, 1),
    "wo": (3, 2),
    "w_in": (2, 1),
    "w_out": (2, 1),
    # DeepSeek: MLA, dense and shared MLPs, routed experts
    "q_proj": (3, 1),
    "q_a_proj": (2, 1),
    "q_b_proj": (3, 1),
    "kv_a_proj_with_mqa": (2, 1),
    "o_proj": (3, 2),
    "gate_proj": (2, 1),
    "up_proj": (2, 1),
    "down_proj": (2, 1),
    "gate_up_proj": (3, 1),
}
ROUTER = ("gate", "weight")


def _matrix(keys) -> tuple[int, int] | None:
    """(dimensions of one matrix, input dimensions) of the parameter at these keys, if it is re-laid at all."""
    if tuple(keys[-2:]) == ROUTER:
        return 2, 1
    return PROJECTIONS.get(keys[-1]) if keys else None


def inputs_minor(ndim: int, matrix_dims: int, input_dims: int) -> tuple[int, ...]:
    """major_to_minor order that keeps the leading (stack) dimensions major, then the outputs, then the inputs."""
    lead = ndim - matrix_dims
    if lead < 0 or not 0 < input_dims < matrix_dims:
        raise ValueError(f"a {ndim}-d array cannot hold a {matrix_dims}-d matrix with {input_dims} input dims")
    inputs = tuple(range(lead, lead + input_dims))
    return tuple(range(lead)) + tuple(range(lead + input_dims, ndim)) + inputs


GROUPS = ("projections", "experts")  # the routed experts' weights sit under a module named `experts`


def _keys(path) -> list:
    return [getattr(entry, "key", None) for entry in path]


def weight_group(path) -> str | None:
    """The group of the parameter at `path` in the tree: "experts", "projections", or None (never re-laid)."""
    keys = _keys(path)
    if _matrix(keys) is None:
        return None
    return "experts" if "experts" in keys[:-1] else "projections"


def decode_formats(params, groups=GROUPS) -> object:
    """For each leaf of a placed parameter tree: its Format with the input dimensions minor when it is a
    projection of one of `groups` (`weight_group`), else its current format."""

    def one(path, leaf):
        if weight_group(path) not in groups:
            return leaf.format
        matrix_dims, input_dims = _matrix(_keys(path))
        return Format(Layout(major_to_minor=inputs_minor(leaf.ndim, matrix_dims, input_dims)), leaf.sharding)

    return jax.tree_util.tree_map_with_path(one, params)


def relaid_groups(kernels) -> tuple[str, ...]:
    """The weight groups decode re-lays out: every projection in the compute dtype. FP8 projections go through
    kernels that take their weights row-major, and XLA would copy a re-laid weight back before every call, so
    nothing is re-laid in FP8. The routed experts' grouped Triton matmul reads re-laid experts as they are
    (`kernels.gmm.gmm(..., transpose_rhs=True)`)."""
    return GROUPS if kernels.matmul == "bf16" else ()


def to_decode_layout(params, groups=GROUPS, donate: bool = False):
    """(params laid out by `decode_formats`, their formats for a jit's in_shardings). Leaves that keep their layout
    are shared with the caller's tree. The others are copies; with `donate` each original is freed as soon as its
    copy exists (the caller's tree is then spent), so memory peaks at one weight more instead of twice them."""
    formats = decode_formats(params, groups)

    def one(leaf, fmt):
        return leaf if fmt == leaf.format else jax.device_put(leaf, fmt, donate=donate)

    return jax.tree.map(one, params, formats), formats


def split_layers(params, formats, keep=frozenset()):
    """(params, formats) with each routed expert weight that is stacked over layers ([L, E, ...]) held as a list of
    L arrays, each its own buffer, in the same layout. XLA hands a custom call whole buffers, so a kernel reading
    one layer's slice of a stack gets a copy of it first: with the grouped Triton matmul, 1.6 ms per 256-token
    prefill chunk of deepseek_2b on an H200 (experiments/benchmarks/RESULTS.md). Inside a jitted step
    `stacked_layers` stacks the lists again, and with the layers laid out straight XLA folds each layer's slice of
    that stack back to the layer's own buffer. Each stacked original is freed once split; one in `keep` (ids of
    arrays the caller still owns) is left stacked instead, so splitting never holds the experts twice."""

    def one(path, leaf):
        if weight_group(path) != "experts" or id(leaf) in keep:
            return leaf
        order = tuple(d - 1 for d in leaf.format.layout.major_to_minor if d)
        sharding = leaf.sharding  # a named one loses the layer axis; one device holds any shape
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
        take = jax.jit(lambda a, i: a[i], out_shardings=Format(Layout(major_to_minor=order), sharding))
        layers = [take(leaf, i) for i in range(leaf.shape[0])]
        leaf.delete()
        return layers

    split = jax.tree_util.tree_map_with_path(one, params)
    layer_formats = lambda a, fmt: [layer.format for layer in a] if _is_layers(a) else fmt  # noqa: E731
    return split, jax.tree.map(layer_formats, split, formats, is_leaf=_is_layers)


def _is_layers(x) -> bool:
    return isinstance(x, list)


def stacked_layers(params):
    """The tree of `split_layers` with each list of per-layer arrays stacked again (inside a jitted step)."""
    return jax.tree.map(lambda a: jnp.stack(a) if _is_layers(a) else a, params, is_leaf=_is_layers)


def in_default_layout(params, formats, keep=frozenset()):
    """(params, in_shardings, perms) with each leaf in a layout other than the default replaced by its transpose
    into that layout's dimension order: the same bytes, now in the default layout, sharded alike. `perms` holds, for
    `from_default_layout` inside a jitted step, each such leaf's permutation back (None elsewhere). JAX's dispatch
    calls back into Python for every argument in another layout, on every call (about 1 µs each on an H200's host,
    JAX 0.11.2: experiments/benchmarks/RESULTS.md); in the default layout it does not. Each original is freed,
    but those in `keep` (ids of arrays the caller still owns)."""

    def one(leaf, fmt):
        order = tuple(leaf.format.layout.major_to_minor)
        if order == tuple(range(leaf.ndim)):
            return leaf, fmt, None
        sharding = leaf.sharding
        if isinstance(sharding, NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*(spec[d] for d in order)))
        stored = jax.jit(lambda a: jnp.transpose(a, order), out_shardings=sharding)(leaf)
        if id(leaf) not in keep:
            leaf.delete()
        return stored, sharding, tuple(order.index(d) for d in range(leaf.ndim))

    triples = jax.tree.map(one, params, formats)
    is_triple = lambda x: isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], jax.Array)  # noqa: E731
    return tuple(jax.tree.map(lambda t, i=i: t[i], triples, is_leaf=is_triple) for i in range(3))


def from_default_layout(params, perms):
    """`in_default_layout`'s params in their logical order again (inside a jitted step XLA folds these transposes
    into the layout, so no weight moves)."""
    back = lambda perm, a: a if perm is None else jnp.transpose(a, perm)  # noqa: E731
    return jax.tree.map(back, perms, params, is_leaf=lambda x: x is None or isinstance(x, tuple))


def with_shared_experts(params, formats, n_shared: int):
    """(params, formats) with each MoE layer's shared experts appended to its routed experts' stack as `n_shared`
    more experts (the shared hidden units cut into n_shared experts' widths; SwiGLU acts unit by unit, so the sum
    of their outputs is the shared MLP's), for `split_layers`' per-layer lists in the serving layout. One token's
    decode then reads its chosen experts and the shared ones in one gather (`moe.MoE`). The shared MLP's own
    weights stay for the other paths: each layer holds its shared weights twice."""
    mlp = params.get("moe_blocks", {}).get("mlp")
    if not n_shared or mlp is None or not _is_layers(mlp["experts"]["gate_up_proj"]):
        return params, formats
    shared = mlp["shared_experts"]
    gate_up, down = mlp["experts"]["gate_up_proj"], mlp["experts"]["down_proj"]
    e, d, _, f = gate_up[0].shape

    def extend(layer, routed_gu, routed_down, shared_gate, shared_up, shared_down):
        gate, up = (w[layer].reshape(d, n_shared, f).transpose(1, 0, 2) for w in (shared_gate, shared_up))
        gu = jnp.concatenate([routed_gu, jnp.stack([gate, up], axis=2).astype(routed_gu.dtype)])
        dn = jnp.concatenate([routed_down, shared_down[layer].reshape(n_shared, f, d).astype(routed_down.dtype)])
        return gu, dn

    new_gu, new_down = [], []
    for layer, (gu, dn) in enumerate(zip(gate_up, down, strict=True)):
        # The layer goes in as a value, not baked in: every layer reuses one compiled program.
        put = jax.jit(extend, out_shardings=(gu.format, dn.format))
        gu2, dn2 = put(jnp.int32(layer), gu, dn, shared["gate_proj"], shared["up_proj"], shared["down_proj"])
        new_gu.append(gu2), new_down.append(dn2)
        gu.delete(), dn.delete()
    mlp["experts"]["gate_up_proj"], mlp["experts"]["down_proj"] = new_gu, new_down
    f_mlp = formats["moe_blocks"]["mlp"]["experts"]
    f_mlp["gate_up_proj"], f_mlp["down_proj"] = [a.format for a in new_gu], [a.format for a in new_down]
    return params, formats
