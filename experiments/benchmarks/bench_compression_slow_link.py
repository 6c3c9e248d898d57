"""Dense against compressed training over a real slow link: JAX processes in separate network namespaces.

Each process is a "host" with its own simulated CPU devices, in its own network namespace, joined to the others
through veth links and a bridge, every link shaped with `tc` (tbf: rate, and netem delay where the kernel has it).
Collectives between processes travel as TCP (gloo) over those links; inside a process they stay in memory/loopback.
So `topology: auto` sees two tiers: `local` (one process) and `network` (the shaped links).

    sudo python experiments/benchmarks/bench_compression_slow_link.py --rate 100mbit --devices 1 --steps 300 \\
        --variant dense= --variant "topk_rms=optim.compression=topk,optim.topk.precondition=rms,optim.b1=0"

For each variant every process trains the same model from the same seed on the same data, and reports per step:
wall time (median over the timed steps), bytes its network interface sent (tx counter of the namespace's veth),
and the model's byte accounting (`comm_*` metrics); at the end the training loss and the held-out loss.
Needs root (CAP_NET_ADMIN) and `ip`/`tc` (iproute2); `netns_unavailable()` says why not when it cannot run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts

# A model whose gradient is large next to its compute: the regime where the gradient exchange dominates a step.
DEFAULT_CONFIG = REPO / "experiments" / "compression_slow_link.yaml"


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def netns_unavailable() -> str | None:
    """None when network namespaces, veth links and tbf shaping work here; otherwise the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    for tool in ("ip", "tc", "unshare", "hostname"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (apt-get install iproute2 util-linux)"
    name = f"jdprobe{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", name)
    except subprocess.CalledProcessError as err:
        return f"'ip netns add' is not permitted here: {err.stderr.strip()}"
    try:
        _run("ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        _run("tc", "-n", name, "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "1gbit", "burst", "128kb",
             "latency", "50ms")  # fmt: skip
    except subprocess.CalledProcessError as err:
        return f"veth links or tc shaping are not permitted here: {err.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", name, check=False)
    return None


def netem_available() -> bool:
    name = f"jdnetem{os.getpid() % 100000}"
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        netem = ("tc", "-n", name, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms")
        return _run(*netem, check=False).returncode == 0
    finally:
        _run("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def slow_network(n_hosts: int, rate: str, delay: str | None) -> Iterator[list[dict]]:
    """`n_hosts` namespaces on one bridge, each link shaped both ways; yields [{ns, ip, hostname, iface}]."""
    tag = f"{os.getpid() % 10000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    bridge = f"jdbr{tag}"
    hosts = [
        {"ns": f"jd{tag}h{i}", "ip": f"{subnet}.{i + 1}", "hostname": f"jdhost{i}", "iface": "eth0"}
        for i in range(n_hosts)
    ]
    shaping = ["tbf", "rate", rate, "burst", "256kb", "latency", "100ms"]
    use_netem = bool(delay) and netem_available()
    try:
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "link", "set", bridge, "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h['ip']} {h['hostname']}\n" for h in hosts)
        for i, host in enumerate(hosts):
            ns, outside = host["ns"], f"jd{tag}b{i}"
            _run("ip", "netns", "add", ns)
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(hosts_file)
            _run("ip", "link", "add", outside, "type", "veth", "peer", "name", f"jd{tag}i{i}")
            _run("ip", "link", "set", f"jd{tag}i{i}", "netns", ns)
            _run("ip", "-n", ns, "link", "set", f"jd{tag}i{i}", "name", host["iface"])
            _run("ip", "-n", ns, "addr", "add", f"{host['ip']}/24", "dev", host["iface"])
            _run("ip", "-n", ns, "link", "set", host["iface"], "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "link", "set", outside, "master", bridge)
            _run("ip", "link", "set", outside, "up")
            for where, dev in ((["-n", ns], host["iface"]), ([], outside)):
                if use_netem:
                    _run("tc", *where, "qdisc", "add", "dev", dev, "root", "netem", "delay", delay, "rate", rate)
                else:
                    _run("tc", *where, "qdisc", "add", "dev", dev, "root", *shaping)
        yield [{**h, "netem": use_netem} for h in hosts]
    finally:
        for host in hosts:
            _run("ip", "netns", "del", host["ns"], check=False)
            shutil.rmtree(NETNS_ETC / host["ns"], ignore_errors=True)
        _run("ip", "link", "del", bridge, check=False)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only if nothing else lives there


def run_workers(hosts: list[dict], devices_per_host: int, spec: dict, timeout: float) -> list[dict]:
    """Start one worker per namespace; return the RESULT records of process 0 (every process reports)."""
    port = 17000 + os.getpid() % 2000
    with tempfile.TemporaryDirectory(prefix="jaxdeep_slowlink_") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        procs, logs = [], []
        for i, host in enumerate(hosts):
            env = {
                **os.environ,
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_host}",
                "JAX_PLATFORMS": "cpu",
                "PYTHONPATH": str(REPO),
                "JD_PROCESS_ID": str(i),
                "JD_NUM_PROCESSES": str(len(hosts)),
                "JD_COORDINATOR": f"{hosts[0]['ip']}:{port}",
                "JD_IFACE": host["iface"],
                "JD_SPEC": str(spec_path),
            }
            log = open(Path(tmp) / f"log.{i}", "w+")  # closed below
            logs.append(log)
            inner = f"hostname {host['hostname']} && exec {sys.executable} {Path(__file__).resolve()} --worker"
            cmd = ["ip", "netns", "exec", host["ns"], "unshare", "--uts", "sh", "-c", inner]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            first = failed[0]
            raise RuntimeError(f"worker {first} failed (exit {procs[first].returncode}):\n{outputs[first][-6000:]}")
    records = [json.loads(line[7:]) for line in outputs[0].splitlines() if line.startswith("RESULT ")]
    return records


# ----------------------------------------------------------------------------- worker (inside a namespace)


def _tx_bytes(iface: str) -> int:
    return int(Path(f"/sys/class/net/{iface}/statistics/tx_bytes").read_text())


def worker() -> None:
    import jax
    import numpy as np

    jax.distributed.initialize(
        coordinator_address=os.environ["JD_COORDINATOR"],
        num_processes=int(os.environ["JD_NUM_PROCESSES"]),
        process_id=int(os.environ["JD_PROCESS_ID"]),
        initialization_timeout=120,
    )
    from jaxdeep.config import load_config
    from jaxdeep.data import to_global_array
    from jaxdeep.train.loop import evaluate, make_data, mesh_from_config
    from jaxdeep.train.state import build_setup, init_train_state
    from jaxdeep.train.step import batch_sharding, make_eval_step, make_train_step

    spec = json.loads(Path(os.environ["JD_SPEC"]).read_text())
    iface = os.environ["JD_IFACE"]
    for variant in spec["variants"]:
        cfg = load_config(spec.get("config"), [*spec["overrides"], *variant["overrides"]])
        mesh, topology = mesh_from_config(cfg)
        setup = build_setup(cfg, mesh, topology)
        data = make_data(cfg)
        sharding = batch_sharding(setup)
        state = init_train_state(setup)
        step_fn = make_train_step(setup)
        times, losses, tx = [], [], []
        metrics = {}
        for _ in range(spec["steps"]):
            batch = to_global_array(next(data.train), sharding)
            tx_start, start = _tx_bytes(iface), time.perf_counter()
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))  # waits for the step
            times.append(time.perf_counter() - start)
            tx.append(_tx_bytes(iface) - tx_start)
        timed = slice(spec["warmup"], None)
        eval_loss = evaluate(setup, make_eval_step(setup), state["params"], data.eval, cfg.train.eval_batches)
        record = {
            "variant": variant["name"],
            "overrides": variant["overrides"],
            "process": jax.process_index(),
            "processes": jax.process_count(),
            "devices": jax.device_count(),
            "step_time_s": float(np.median(times[timed])),
            "step_times_s": times[timed],
            "tx_bytes_per_step": float(np.median(tx[timed])),
            "final_loss": float(np.mean(losses[-spec.get("loss_window", 1) :])),
            "eval_loss": eval_loss,
            "losses": losses,
            "plan": setup.compression.plan.describe() if setup.compression else "dense (GSPMD all-reduce)",
            **{k: float(v) for k, v in metrics.items() if k.startswith("comm_")},
        }
        print("RESULT " + json.dumps(record), flush=True)
    jax.distributed.shutdown()


# ----------------------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hosts", type=int, default=2, help="processes, one per network namespace")
    parser.add_argument("--devices", type=int, default=2, help="simulated CPU devices per process")
    parser.add_argument("--rate", default="1gbit", help="tc rate of every link, each direction")
    parser.add_argument("--delay", default="1ms", help="netem delay of every link (where the kernel has netem)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per variant (same for all)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timings")
    parser.add_argument("--loss-window", type=int, default=5, help="final loss = mean over the last N steps")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML (default: %(default)s)")
    parser.add_argument("--override", action="append", default=[], help="section.key=value for every variant")
    parser.add_argument("--variant", action="append", default=[], help="NAME=override[,override...]; NAME= for dense")
    parser.add_argument("--repeats", type=int, default=1, help="run all variants this many times, interleaved")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=None, help="append the JSON lines here too")
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    reason = netns_unavailable()
    if reason:
        sys.exit(f"cannot run: {reason}")
    variants = []
    for text in args.variant or ["dense=", "topk_hierarchical=optim.compression=topk_hierarchical"]:
        name, _, overrides = text.partition("=")
        variants.append({"name": name, "overrides": [o for o in overrides.split(",") if o]})
    spec = {
        "config": args.config,
        "overrides": args.override,
        "variants": variants,
        "steps": args.steps,
        "warmup": args.warmup,
        "loss_window": args.loss_window,
    }
    with slow_network(args.hosts, args.rate, args.delay) as hosts:
        netem = hosts[0]["netem"]
        print(f"# {args.hosts} namespaces x {args.devices} devices, links {args.rate}"
              + (f", delay {args.delay} (netem)" if netem else ", no added delay (netem not in this kernel)"),
              flush=True)  # fmt: skip
        for repeat in range(args.repeats):
            for record in run_workers(hosts, args.devices, spec, args.timeout):
                record.update({"repeat": repeat, "rate": args.rate, "delay": args.delay if netem else None})
                line = json.dumps({k: v for k, v in record.items() if k not in ("losses", "step_times_s")})
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
