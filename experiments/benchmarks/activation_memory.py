"""Activation memory of a config's train step: the bytes the forward keeps for the backward, per token.

    python experiments/benchmarks/activation_memory.py experiments/deepseek_fp8_accuracy.yaml \
        --variant precision.matmul=bf16 --variant precision.matmul=fp8 --by-source

The forward of the loss is traced (nothing is compiled or run) at batch B and at batch 2B with the config's
sequence length, and the residuals `jax.vjp` keeps are summed. Their difference over B · seq tokens is the
activation memory per token: what grows with the batch (parameters and their casts to the compute dtype do
not), every value the traced backward reads from the forward. XLA may fuse some of them away or allocate other
buffers; its temporaries are what `bench_train.py` reports as "temp". Kernel choices follow the machine the
script runs on (`auto` takes the GPU's kernels on a GPU, the pure-JAX references on a CPU); attention follows
`model.attention` (`auto`: cuDNN's on a GPU where it runs; XLA's, `model.attention=xla`, keeps the score matrices).

`--by-source` lists, for one block of each stack of layers, the residuals by the source line that made them
(JAX's own `saved_residuals`; a private helper, so the listing may change with JAX versions).
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxdeep.config import load_config
from jaxdeep.train.loop import mesh_from_config
from jaxdeep.train.state import build_setup, init_train_state


def _nbytes(a) -> int:
    return int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize


def residual_bytes(setup, batch: int) -> int:
    """Bytes of everything `jax.vjp` of the mean next-token loss keeps at this batch size (traced, not run)."""
    cfg = setup.cfg
    state = jax.eval_shape(lambda: init_train_state(setup))
    tokens = jax.ShapeDtypeStruct((batch, cfg.data.seq_len + 1), jnp.int32)

    def residuals(params, model_state, tokens_bs):
        def loss(p):
            logits = setup.apply(p, tokens_bs[:, :-1], model_state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_bs[:, 1:]).mean()

        return jax.tree.leaves(jax.vjp(loss, params)[1])

    leaves = jax.eval_shape(residuals, state["params"], state.get("model_state"), tokens)
    return sum(_nbytes(a) for a in leaves)


def activation_memory(config: str, overrides: list[str], batch: int) -> dict:
    cfg = load_config(config, overrides)
    mesh, topology = mesh_from_config(cfg)
    setup = build_setup(cfg, mesh, topology)
    small, large = residual_bytes(setup, batch), residual_bytes(setup, 2 * batch)
    tokens = batch * cfg.data.seq_len
    return {
        "overrides": overrides,
        "backend": jax.default_backend(),
        "batch": batch,
        "seq_len": cfg.data.seq_len,
        "residual_mib_at_batch": round(small / 2**20, 2),
        "activation_bytes_per_token": round((large - small) / tokens, 1),
    }


def _stacks(model, cfg):
    """(name, stacked module, call arguments after x) of each stack of layers of the model."""
    seq = cfg.data.seq_len
    if cfg.model.kind == "deepseek":
        from jaxdeep.model.deepseek.rope import rope_tables

        ds = cfg.model.deepseek
        cos, sin = rope_tables(seq, ds.qk_rope_head_dim, cfg.model.rope_theta, ds.rope_scaling)
        names = [n for n in ("dense_blocks", "moe_blocks") if hasattr(model, n)]
        return [(n, getattr(model, n), (cos, sin)) for n in names]
    return [("blocks", model.blocks, (jnp.arange(seq)[None, :],))]


def by_source(config: str, overrides: list[str], batch: int, top: int) -> None:
    from jax._src.ad_checkpoint import saved_residuals  # private: prints only

    from jaxdeep.model import build_model

    cfg = load_config(config, overrides)
    model = build_model(cfg, nnx.Rngs(0))
    dtype = jnp.dtype(cfg.model.dtype)
    for name, stack, args in _stacks(model, cfg):
        graphdef, state = nnx.split(stack)
        layer = jax.tree.map(lambda a: a[0], state)
        x = jnp.zeros((batch, cfg.data.seq_len, cfg.model.d_model), dtype)

        def block_sum(layer_state, x_btd, graphdef=graphdef, args=args):
            out = nnx.merge(graphdef, layer_state)(x_btd, *args)
            y = out[0] if isinstance(out, tuple) else out
            return jnp.sum(y.astype(jnp.float32))

        rows: collections.Counter = collections.Counter()
        for aval, source in saved_residuals(block_sum, layer, x):
            if not source.startswith("from the argument"):  # parameters and the block's input
                rows[f"{aval.str_short()}  {source.split(' from ')[-1]}"] += _nbytes(aval)
        total = sum(rows.values())
        print(f"  {name}, one layer, batch {batch}: {total / 2**20:.2f} MiB")
        for row, nbytes in rows.most_common(top):
            print(f"    {nbytes / 2**20:8.3f} MiB  {row}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--variant", action="append", default=[], help="space-separated overrides, one variant each")
    p.add_argument("--batch", type=int, default=2, help="the smaller of the two traced batch sizes")
    p.add_argument("--by-source", action="store_true", help="list one block's residuals by source line")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", help="append one JSON line per variant")
    args = p.parse_args()
    results = []
    for variant in args.variant or [""]:
        overrides = shlex.split(variant)
        r = activation_memory(args.config, overrides, args.batch)
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.by_source:
            by_source(args.config, overrides, args.batch, args.top)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"config": args.config, **r}) + "\n")
    if len(results) > 1:
        base = results[0]["activation_bytes_per_token"]
        for r in results:
            ratio = r["activation_bytes_per_token"] / base
            name = " ".join(r["overrides"]) or "(config)"
            print(f"{name}: {r['activation_bytes_per_token']:.0f} B/token ({ratio:.3f}x)")


if __name__ == "__main__":
    main()
