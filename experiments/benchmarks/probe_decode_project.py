"""Probe: a dense 1B layer's projections (attention replaced by a sum of q, k and v) over LAYERS distinct layers of
random weights, XLA against kernels.decode.project at several tile configurations: GPU µs per layer in all and
per kernel, and the largest difference from XLA's output relative to its largest value.

    python experiments/benchmarks/probe_decode_project.py LAYERS ROWS SECONDS fma|dot
"""

import collections
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "experiments/benchmarks")
import timing  # noqa: E402

from kernels.decode import project as P  # noqa: E402

LAYERS, D, F = int(sys.argv[1]) if len(sys.argv) > 1 else 12, 2048, 8192
ROWS = int(sys.argv[2]) if len(sys.argv) > 2 else 1
key = jax.random.split(jax.random.PRNGKey(0), 16)


def w(k, n, kk, std=0.02):
    return (jax.random.normal(k, (LAYERS, n, kk), jnp.float32) * std).astype(jnp.bfloat16)


params = dict(
    wq=w(key[0], D, D), wk=w(key[1], D, D), wv=w(key[2], D, D), wo=w(key[3], D, D),
    w_in=w(key[4], F, D), w_out=w(key[5], D, F),
    s1=1 + 0.1 * jax.random.normal(key[6], (LAYERS, D)), b1=0.1 * jax.random.normal(key[7], (LAYERS, D)),
    s2=1 + 0.1 * jax.random.normal(key[8], (LAYERS, D)), b2=0.1 * jax.random.normal(key[9], (LAYERS, D)),
)  # fmt: skip
x0 = jax.random.normal(key[10], (ROWS, D), jnp.float32).astype(jnp.bfloat16)


def xla_norm(x, scale, bias):  # as jaxdeep.serve.extend._decode_layer_norm
    x32 = x.astype(jnp.float32)
    shifted = x32 - x32[..., :1]
    mean = jnp.mean(shifted, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(shifted * shifted, axis=-1, keepdims=True) - mean * mean, 0.0)
    z = (shifted - mean) * jax.lax.rsqrt(var + 1e-5)
    return (z * scale + bias).astype(x.dtype)


def mm(x, w):
    return jnp.einsum("bk,nk->bn", x, w)


@jax.jit
def xla_chain(p, x):
    for i in range(LAYERS):
        h = xla_norm(x, p["s1"][i], p["b1"][i])
        q, k, v = mm(h, p["wq"][i]), mm(h, p["wk"][i]), mm(h, p["wv"][i])
        o = q + k + v  # stands in for attention
        x = x + mm(o, p["wo"][i])
        h = xla_norm(x, p["s2"][i], p["b2"][i])
        x = x + mm(jax.nn.gelu(mm(h, p["w_in"][i]), approximate=False), p["w_out"][i])
    return x


def kernel_chain(cfg):
    if cfg[0] == "fma":
        opts = dict(block_n=cfg[1], block_k=cfg[2], num_warps=cfg[3], tile_sums=cfg[4])
    else:
        opts = dict(products="dot", block_n=cfg[1], block_k=cfg[2], num_warps=cfg[3], num_stages=cfg[4])

    @jax.jit
    def run(p, x):
        for i in range(LAYERS):
            li = jnp.int32(i)
            n1 = P.Norm("layer", p["s1"], p["b1"], 1e-5)
            q, k, v = P.project(x, (p["wq"], p["wk"], p["wv"]), n1, layer=li, name="qkv", **opts)
            o = q + k + v
            (x,) = P.project(o, (p["wo"],), residual_bn=x, layer=li, name="wo", **opts)
            n2 = P.Norm("layer", p["s2"], p["b2"], 1e-5)
            (h,) = P.project(x, (p["w_in"],), n2, "gelu", layer=li, name="w_in", **opts)
            (x,) = P.project(h, (p["w_out"],), residual_bn=x, layer=li, name="w_out", **opts)
        return x

    return run


def profile(fn):
    events = timing.gpu_events(fn, params, x0, calls=10)
    busy = timing.busy_seconds(events, 10) / LAYERS * 1e6
    per_name = collections.defaultdict(float)
    for evs in events.values():
        for name, _, dur in evs:
            per_name[name] += dur / 10 / LAYERS / 1e3
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:8]
    return busy, top


ref = np.asarray(xla_chain(params, x0), np.float32)
busy, top = profile(xla_chain)
print(f"rows {ROWS} XLA: {busy:.2f} us/layer;", ", ".join(f"{n[:40]} {t:.2f}" for n, t in top), flush=True)
if sys.argv[4] == "fma":
    configs = [("fma", bn, bk, wp, True) for bn in (4, 8, 16) for bk in (512, 1024, 2048) for wp in (4, 8)]
    configs += [("fma", bn, bk, wp, False) for bn in (8, 16, 32) for bk in (512, 1024) for wp in (4, 8)]
    if ROWS > 1:
        configs = [c for c in configs if c[1] * c[2] <= 8192]
else:
    configs = [("fma", 8, 2048, 4, True)] if ROWS == 1 else []
    configs += [("dot", bn, bk, 4, st) for bn in (16, 32, 64) for bk in (128, 256, 512) for st in (2, 3, 4)]
    configs += [("dot", 16, 256, 8, 3), ("dot", 32, 256, 8, 3), ("dot", 64, 256, 8, 3), ("dot", 16, 1024, 4, 2)]
    if ROWS > 1:
        configs = [c for c in configs if c[2] == 256 or c[1] == 16]
start = time.time()
for cfg in configs:
    if time.time() - start > (float(sys.argv[3]) if len(sys.argv) > 3 else 240):
        print("time's up")
        break
    fn = kernel_chain(cfg)
    try:
        out = np.asarray(fn(params, x0), np.float32)
        busy, top = profile(fn)
    except Exception as e:  # noqa: BLE001
        print(cfg, "failed:", type(e).__name__, str(e)[:200], flush=True)
        continue
    err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
    print(
        f"{cfg}: {busy:.2f} us/layer, rel err {err:.1e};",
        ", ".join(f"{n[:12]} {t:.2f}" for n, t in top[:6]),
        flush=True,
    )
