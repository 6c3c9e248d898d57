"""Pipeline bubble, collective-matmul overlap and step time / MFU per layout, on the local devices.

    python experiments/benchmarks/bench_pipeline.py bubble  experiments/dense_1b.yaml --pipeline 4
    python experiments/benchmarks/bench_pipeline.py overlap --tensor 4 --rows 16384 --dim 8192 --ffn 32768
    python experiments/benchmarks/bench_pipeline.py layouts experiments/dense_1b.yaml
    python experiments/benchmarks/bench_pipeline.py bubble experiments/quickstart.yaml --cpu-devices 8 --pipeline 2

bubble: for each schedule, the pipelined loss-and-gradients at several microbatch counts m (microbatches of a fixed
size). Step time is linear in m, t(m) = a + b·m, where b is the cost of one more microbatch with the pipeline
full; the measured bubble at m is 1 - b·m / t(m), printed beside the theory (p-1)/(v·m+p-1).
overlap: y = all_gather(x) @ w over the tensor axis, timed as the matmul alone (on gathered input), all-gather
then matmul, and the collective matmul ring; hidden share = (plain - ring) / (plain - matmul alone).
layouts: the real train step (`make_train_step`) for every data × tensor × pipeline layout of the devices.

Timings: warm-up calls, then the median of timed calls, each synchronised. JSON lines go to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time


def _setup_devices(cpu_devices: int) -> None:
    if cpu_devices:  # before jax starts
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={cpu_devices}"
        )
        os.environ["JAX_PLATFORMS"] = "cpu"


def _time(fn, args, warmup: int, repeats: int) -> float:
    import jax
    import numpy as np

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _config(path: str | None, overrides: list[str]):
    from jaxdeep.config import load_config

    return load_config(path, overrides)


def _tokens(cfg, rows: int, sharding):
    import jax
    import numpy as np

    data = np.random.default_rng(0).integers(1, cfg.model.vocab_size, (rows, cfg.data.seq_len + 1)).astype(np.int32)
    return jax.device_put(data, sharding)


def bench_bubble(args) -> list[dict]:
    import jax
    import numpy as np

    from jaxdeep.parallel.schedules import simulated_bubble, theoretical_bubble
    from jaxdeep.sharding import use_rules
    from jaxdeep.train.loop import mesh_from_config
    from jaxdeep.train.pipeline_step import build_pipeline, make_pipeline_loss_and_grads
    from jaxdeep.train.state import build_setup, init_train_state
    from jaxdeep.train.step import batch_sharding

    p, n = args.pipeline, len(jax.devices())
    records = []
    for schedule in args.schedules:
        v = 1 if schedule in ("gpipe", "1f1b") else args.virtual
        times = {}
        for factor in args.factors:
            m = factor * p
            overrides = [
                *args.set,
                f"mesh.pipeline={p}",
                f"mesh.data={n // p}",
                f"parallel.schedule={schedule}",
                f"parallel.virtual_stages={v}",
                f"parallel.microbatches={m}",
                f"data.global_batch_size={m * args.microbatch * (n // p)}",
            ]
            cfg = _config(args.config, overrides)
            mesh, _ = mesh_from_config(cfg)
            setup = build_setup(cfg, mesh)
            params = init_train_state(setup)["params"]
            loss_and_grads = make_pipeline_loss_and_grads(setup)

            def run(params, tokens, cfg=cfg, mesh=mesh, fn=loss_and_grads):
                with use_rules(cfg.sharding.rules, mesh):
                    return fn(params, tokens)

            step = jax.jit(run, in_shardings=(setup.state_shardings["params"], batch_sharding(setup)))
            tokens = _tokens(cfg, cfg.data.global_batch_size, batch_sharding(setup))
            times[m] = _time(step, (params, tokens), args.warmup, args.repeats)
            pipe = build_pipeline(setup)
            records.append(
                {
                    "bench": "bubble",
                    "schedule": schedule,
                    "p": p,
                    "v": v,
                    "m": m,
                    "step_s": times[m],
                    "theory": theoretical_bubble(p, m, v),
                    "table_model": simulated_bubble(pipe.schedule),
                    "stage_layers": list(pipe.plan.layers),
                }
            )
        ms = np.array(sorted(times), float)
        per_microbatch, overhead = np.polyfit(ms, [times[int(m)] for m in ms], 1)
        for record in records[-len(ms) :]:
            record["per_microbatch_s"] = float(per_microbatch)
            record["fit_overhead_s"] = float(overhead)
            record["measured"] = float(1.0 - per_microbatch * record["m"] / record["step_s"])
    return records


def bench_overlap(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxdeep.parallel.collective_matmul import ring_allgather_apply

    tp = args.tensor
    mesh = Mesh(np.array(jax.devices()[:tp]), ("tensor",))
    dtype = jnp.dtype(args.dtype)
    x = jax.device_put(jnp.ones((args.rows, args.dim), dtype), NamedSharding(mesh, P("tensor", None)))
    w = jax.device_put(jnp.ones((args.dim, args.ffn), dtype), NamedSharding(mesh, P(None, "tensor")))
    x_full = jax.device_put(jnp.ones((args.rows, args.dim), dtype), NamedSharding(mesh, P()))
    smap = lambda f, specs: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P(None, "tensor")))
    alone = smap(lambda x, w: x @ w, (P(), P(None, "tensor")))
    plain = smap(lambda x, w: jax.lax.all_gather(x, "tensor", tiled=True) @ w, (P("tensor", None), P(None, "tensor")))
    ring = smap(
        lambda x, w: ring_allgather_apply(x, lambda c: c @ w, "tensor", 0), (P("tensor", None), P(None, "tensor"))
    )
    t_alone = _time(alone, (x_full, w), args.warmup, args.repeats)
    t_plain = _time(plain, (x, w), args.warmup, args.repeats)
    t_ring = _time(ring, (x, w), args.warmup, args.repeats)
    hidden = (t_plain - t_ring) / (t_plain - t_alone) if t_plain > t_alone else float("nan")
    shape = {"rows": args.rows, "dim": args.dim, "ffn": args.ffn, "dtype": args.dtype}
    times = {"matmul_s": t_alone, "plain_s": t_plain, "ring_s": t_ring, "hidden": hidden}
    return [{"bench": "overlap", "tensor": tp, **shape, **times}]


def bench_layouts(args) -> list[dict]:
    import jax

    from jaxdeep.model import flops_per_token
    from jaxdeep.train.loop import mesh_from_config
    from jaxdeep.train.metrics import device_peak_flops
    from jaxdeep.train.state import build_setup, init_train_state
    from jaxdeep.train.step import batch_sharding, make_train_step

    n = len(jax.devices())
    records = []
    for data, tensor, pipe in itertools.product(range(1, n + 1), repeat=3):
        if data * tensor * pipe != n:
            continue
        sizes = [f"mesh.data={data}", f"mesh.tensor={tensor}", f"mesh.pipeline={pipe}", "mesh.fsdp=1"]
        record = {"bench": "layout", "data": data, "tensor": tensor, "pipeline": pipe}
        try:
            cfg = _config(args.config, [*args.set, *sizes])
            mesh, _ = mesh_from_config(cfg)
            setup = build_setup(cfg, mesh)
            state = init_train_state(setup)
            step = make_train_step(setup)
            tokens = _tokens(cfg, cfg.data.global_batch_size, batch_sharding(setup))
            # The step donates its state: thread it through.
            holder = [state]

            def run(tokens, step=step, holder=holder):
                holder[0], metrics = step(holder[0], tokens)
                return metrics

            step_s = _time(run, (tokens,), args.warmup, args.repeats)
        except Exception as err:  # a layout the config cannot take (divisibility, memory): say why, go on
            records.append(record | {"error": f"{type(err).__name__}: {err}"[:300]})
            continue
        tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        peak = device_peak_flops(mesh.devices.flat[0].device_kind, cfg.train.peak_tflops)
        flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
        record |= {"step_s": step_s, "tokens_per_s": tokens_per_step / step_s}
        if peak:
            record["mfu"] = flops / step_s / (peak * n)
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bench", choices=["bubble", "overlap", "layouts"])
    parser.add_argument("config", nargs="?", help="experiment YAML (bubble, layouts)")
    parser.add_argument("--set", action="append", default=[], help="a config override, e.g. model.n_layers=8")
    parser.add_argument("--cpu-devices", type=int, default=0, help="simulated CPU devices (0 = real devices)")
    parser.add_argument("--pipeline", type=int, default=4, help="bubble: pipeline devices")
    parser.add_argument("--virtual", type=int, default=2, help="bubble: virtual stages of circular / interleaved")
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "circular", "interleaved"])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8], help="bubble: m = factor × p")
    parser.add_argument("--microbatch", type=int, default=1, help="bubble: sequences per microbatch per data shard")
    parser.add_argument("--tensor", type=int, default=4, help="overlap: tensor-parallel devices")
    parser.add_argument("--rows", type=int, default=16384, help="overlap: rows of x (tokens)")
    parser.add_argument("--dim", type=int, default=8192, help="overlap: contracted dimension")
    parser.add_argument("--ffn", type=int, default=32768, help="overlap: output columns (split over tensor)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="append JSON lines here")
    args = parser.parse_args(argv)
    _setup_devices(args.cpu_devices)
    if args.bench in ("bubble", "layouts") and not args.config:
        parser.error(f"{args.bench} needs an experiment config")
    import jax

    records = {"bubble": bench_bubble, "overlap": bench_overlap, "layouts": bench_layouts}[args.bench](args)
    device = jax.devices()[0]
    versions = {"device": device.device_kind, "devices": len(jax.devices()), "jax": jax.__version__}
    with open(args.out, "a") if args.out else open(os.devnull, "w") as out:
        for record in records:
            record |= versions
            out.write(json.dumps(record) + "\n")
            print(json.dumps(record), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
