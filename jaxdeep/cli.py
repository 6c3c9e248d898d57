"""`jaxdeep` command line: train, eval, mesh, convert, serve, bench serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from jaxdeep.config import ConfigError, ExperimentConfig, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxdeep", description="Train, evaluate and serve models on named device meshes."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_compilation_cache(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--compilation-cache",
            metavar="DIR",
            help="keep compiled XLA programs in DIR and load them in later runs instead of compiling again "
            "(JAX's persistent compilation cache; JAX_COMPILATION_CACHE_DIR does the same)",
        )

    def add_common(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("config", help=f"experiment YAML (e.g. experiments/quickstart.yaml){what}")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100 mesh.data=-1")
        add_compilation_cache(p)
        dist = p.add_argument_group("several hosts (jax.distributed)")
        dist.add_argument("--coordinator", help="host:port of process 0; enables multi-process mode")
        dist.add_argument("--num-processes", type=int, help="processes in the job")
        dist.add_argument("--process-id", type=int, help="this process's index")

    train = sub.add_parser("train", help="train an experiment")
    add_common(train, "")
    train.add_argument("--run-dir", help="where checkpoints, metrics and the resolved config go (default runs/NAME)")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="require a checkpoint in the run dir and continue it")
    mode.add_argument("--fresh", action="store_true", help="refuse to start if the run dir already has a checkpoint")

    ev = sub.add_parser("eval", help="held-out loss of a run's checkpoint")
    add_common(ev, ", or a run directory holding config.yaml")
    ev.add_argument("--run-dir", help="run directory with checkpoints (default: CONFIG if it is a directory)")
    ev.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    ev.add_argument("--batches", type=int, help="held-out batches (default: train.eval_batches)")

    mesh = sub.add_parser("mesh", help="print the mesh: axes, tiers crossed, device placement")
    add_common(mesh, "")

    convert = sub.add_parser("convert", help="convert between Hugging Face DeepSeek checkpoints and jaxdeep runs")
    convert.add_argument(
        "direction",
        choices=["from-hf", "to-hf"],
        help="from-hf: HF_DIR -> RUN_DIR (step-0 checkpoint + config.yaml); to-hf: RUN_DIR -> HF_DIR",
    )
    convert.add_argument("source", help="HF directory (from-hf) or run directory with config.yaml (to-hf)")
    convert.add_argument("dest", help="run directory (from-hf) or HF directory to write (to-hf)")
    convert.add_argument("overrides", nargs="*", help="section.key=value overrides of the run config, e.g. mesh.*")
    convert.add_argument("--step", type=int, help="to-hf: checkpoint step (default: the latest)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16"], help="to-hf: tensor dtype (default: params')")
    convert.set_defaults(coordinator=None, num_processes=None, process_id=None)

    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (with /metrics)")
    serve.add_argument("target", help="experiment YAML, run directory (latest checkpoint) or Hugging Face directory")
    serve.add_argument("overrides", nargs="*", help="section.key=value overrides of the model config")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--served-model-name", help="model name clients send and /v1/models lists")
    add_compilation_cache(serve)
    engine = serve.add_argument_group("engine (defaults: the engine's own)")
    engine.add_argument("--num-slots", type=int, help="sequences decoded together (KV-cache slots)")
    engine.add_argument("--max-context", type=int, help="prompt + new tokens must fit in this many positions")
    engine.add_argument("--max-waiting", type=int, help="requests queued for a slot before new ones get HTTP 429")
    engine.add_argument("--prefill-chunk", type=int, help="prompt tokens per prefill step, for each prompt")
    engine.add_argument("--prefill-rows", type=int, help="prompts one prefill step takes at most (a chunk each)")
    engine.add_argument(
        "--decode-steps",
        type=int,
        help="decode steps per launch while no request waits or reads its prompt (tokens stream in bursts)",
    )
    engine.add_argument(
        "--decode-all-slots",
        action="store_true",
        help="decode every slot each step: a request's tokens never depend on the others (a lone one runs slower)",
    )
    engine.add_argument(
        "--concurrent-kernels",
        choices=["on", "off"],
        default="off",
        help="on: a step's independent GPU kernels may run side by side (xla_gpu_command_buffer_scheduling_mode="
        "CONCURRENT for the serving steps, whatever XLA_FLAGS says); off (default): as XLA schedules them",
    )
    serve.set_defaults(coordinator=None, num_processes=None, process_id=None)

    from jaxdeep.serve import bench

    bench_parser = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench_parser.add_subparsers(dest="bench_command", required=True)
    bench.add_arguments(
        bench_sub.add_parser(
            "serve",
            help="load an OpenAI-compatible server and report throughput, latency and goodput",
            description=bench.__doc__.split("\n\n")[1],
        )
    )
    bench_parser.set_defaults(overrides=[])
    return parser


def _load(path: str, overrides: list[str]) -> tuple[ExperimentConfig, Path | None]:
    p = Path(path)
    if p.is_dir():
        return load_config(p / "config.yaml", overrides), p
    return load_config(p, overrides), None


def _start_jax(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    """Device set-up that must happen before jax is first imported."""
    if cfg.mesh.cpu_devices:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cfg.mesh.cpu_devices}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    _use_compilation_cache(args)
    if args.coordinator or args.num_processes:
        if cfg.mesh.cpu_devices:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )


def _use_compilation_cache(args: argparse.Namespace) -> None:
    """Point JAX's persistent compilation cache at --compilation-cache, if given (before anything compiles). Every
    program is stored unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise: by default JAX skips those
    that compile in under a second, and a server has dozens."""
    if getattr(args, "compilation_cache", None):
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path(args.compilation_cache).expanduser()))
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come after options (`train CONFIG --run-dir D a.b=1`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "bench" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
    if args.command == "convert":
        return _convert(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "bench":
        from jaxdeep.serve import bench

        return bench.main(args)
    try:
        cfg, cfg_dir = _load(args.config, args.overrides)
    except ConfigError as e:
        print(f"jaxdeep: config error: {e}", file=sys.stderr)
        return 2
    _start_jax(cfg, args)

    import meshes
    from jaxdeep.train import loop

    try:
        if args.command == "mesh":
            mesh, topology = loop.mesh_from_config(cfg)
            print(meshes.describe_mesh(mesh, topology))
        elif args.command == "train":
            run_dir = Path(args.run_dir or Path("runs") / cfg.name)
            resume = True if args.resume else False if args.fresh else None
            result = loop.train(cfg, run_dir, resume=resume)
            step = int(result.state["step"])
            if result.last_loss is None:
                print(f"nothing to do: the run in {run_dir} is already at step {step} of {cfg.train.steps}")
            else:
                print(
                    f"done: step {step}, first logged loss {result.first_loss:.4f}, last {result.last_loss:.4f}, "
                    f"eval {result.eval_loss:.4f}; run dir {run_dir}"
                )
        elif args.command == "eval":
            run_dir = args.run_dir or cfg_dir
            if run_dir is None:
                print("jaxdeep eval: pass --run-dir or a run directory as CONFIG", file=sys.stderr)
                return 2
            print(json.dumps(loop.evaluate_checkpoint(cfg, run_dir, args.batches, args.step)))
    except (ConfigError, meshes.MeshError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"jaxdeep: error: {e}", file=sys.stderr)
        return 2
    return 0


def _convert(args: argparse.Namespace) -> int:
    """`jaxdeep convert from-hf HF_DIR RUN_DIR` or `jaxdeep convert to-hf RUN_DIR HF_DIR`."""
    try:
        if args.direction == "from-hf":
            from jaxdeep.hf.runs import run_config_for_hf

            cfg = run_config_for_hf(args.source, args.dest, args.overrides)
        else:
            cfg, _ = _load(args.source, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"jaxdeep: config error: {e}", file=sys.stderr)
        return 2
    _start_jax(cfg, args)
    import meshes
    from jaxdeep.hf import runs

    try:
        if args.direction == "from-hf":
            n = runs.import_hf(args.source, args.dest, cfg)
            print(f"converted {args.source} ({n / 1e6:.1f}M parameters) into run {args.dest} at step 0")
        else:
            step = runs.export_hf(cfg, args.source, args.dest, args.step, args.dtype)
            print(f"wrote step {step} of {args.source} to {args.dest} (Hugging Face DeepSeek format)")
    except (ConfigError, meshes.MeshError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"jaxdeep: error: {e}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> int:
    """`jaxdeep serve TARGET [overrides]`: load the engine, then serve until Ctrl-C."""
    names = ("num_slots", "max_context", "max_waiting", "prefill_chunk", "prefill_rows", "decode_steps")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    for name, value in options.items():
        if value < 1:
            print(f"jaxdeep: error: --{name.replace('_', '-')} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.decode_all_slots:
        options["decode_all_slots"] = True
    if args.concurrent_kernels == "on":
        options["concurrent_kernels"] = True
    target = Path(args.target)
    if not target.exists():
        print(
            f"jaxdeep: error: {target} does not exist (expected an experiment YAML, run or HF directory)",
            file=sys.stderr,
        )
        return 2
    if target.is_file() or (target / "config.yaml").is_file():  # our configs say how many CPU devices to fake
        try:
            cfg, _ = _load(args.target, args.overrides)
        except ConfigError as e:
            print(f"jaxdeep: config error: {e}", file=sys.stderr)
            return 2
        _start_jax(cfg, args)
    else:  # a Hugging Face directory
        _use_compilation_cache(args)
    import meshes
    from jaxdeep.serve.loading import load_engine
    from jaxdeep.serve.server import OpenAIServer, run_server

    try:
        engine = load_engine(args.target, args.overrides, **options)
    except (ConfigError, meshes.MeshError, FileNotFoundError, ValueError) as e:
        print(f"jaxdeep: error: {e}", file=sys.stderr)
        return 2
    server = OpenAIServer(engine, served_model_name=args.served_model_name)
    logging.getLogger(__name__).info("serving %r at http://%s:%d/v1", server.model_name, args.host, args.port)
    run_server(server, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
