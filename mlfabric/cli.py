"""The ``mlfabric`` command: node, status, lookup, cluster up/down, demo, and (when present) sim.

Settings come from one place (config.load_settings: preset < TOML file < environment < flags); flags
left unset are not passed, so they never override the file or the environment. A configuration error
prints ``mlfabric: <one line>`` on stderr and exits with code 2, never a traceback.
Heavy modules are imported inside the subcommands, and torch never is.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from mlfabric import __version__
from mlfabric.errors import ConfigError, MlfabricError

EXIT_CONFIG = 2
DEFAULT_WORKDIR = "./mlfabric-cluster"


# -------------------------------------------------------------------- node


def _cmd_node(args: argparse.Namespace) -> int:
    from mlfabric.config import load_settings
    from mlfabric.runtime.daemon import Daemon, configure_logging
    from mlfabric.runtime.driver import run

    settings = load_settings(
        args.config,
        args.preset,
        listen=args.listen,
        advertise=args.advertise,
        seeds=args.seed,
        data_dir=args.data_dir,
        control=args.control,
        cluster_key_file=args.cluster_key_file,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    settings.key_bytes()  # an unreadable key file is a configuration error: report it before logging starts
    configure_logging(settings.log_level, settings.log_format)
    run(Daemon(settings).run())
    return 0


# -------------------------------------------------------------------- status and lookup


def _control_address(args: argparse.Namespace) -> str:
    if args.node:
        return str(args.node)
    data_dir = Path(args.data_dir) if args.data_dir else None
    if data_dir is None:
        from mlfabric.config import load_settings

        data_dir = load_settings().data_dir
    path = Path(data_dir) / "control"
    try:
        return path.read_text().strip()
    except OSError:
        raise ConfigError(f"no running node found in {data_dir} ({path} missing); use --node HOST:PORT") from None


def _get(address: str, path: str, timeout: float) -> tuple[int, Any]:
    import asyncio

    from mlfabric.runtime.control import get_json

    return asyncio.run(get_json(address, path, timeout))


def _peer(p: dict[str, Any] | None) -> str:
    return "-" if p is None else f"{p['id']:016x}  {p['address']}"


def format_status(s: dict[str, Any]) -> str:
    lines = [
        f"node         {_peer(s)}",
        f"state        {'joined' if s.get('joined') else 'joining'}, up {s.get('uptime_s', 0):.1f}s, "
        f"pid {s.get('pid')}, torch {'loaded' if s.get('torch_loaded') else 'not loaded'}",
        f"predecessor  {_peer(s.get('predecessor'))}",
    ]
    for i, succ in enumerate(s.get("successors", [])):
        lines.append(f"{'successors' if i == 0 else '':<12} {i + 1:>2}. {_peer(succ)}")
    fingers = s.get("fingers", [])
    start = 0
    for i in range(1, len(fingers) + 1):  # group runs of equal fingers: "0-5  <peer>"
        if i == len(fingers) or fingers[i] != fingers[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            lines.append(f"{'fingers' if start == 0 else '':<12} {span:>5} {_peer(fingers[start])}")
            start = i
    counters = s.get("counters", {})
    lines.append("counters     " + " ".join(f"{k}={v}" for k, v in counters.items()))
    transport = {k: v for k, v in s.get("transport", {}).items() if v}
    lines.append("transport    " + (" ".join(f"{k}={v}" for k, v in transport.items()) or "-"))
    lines.append(f"connections  {s.get('open_connections', 0)} open, {len(s.get('peers', []))} peers")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    address = _control_address(args)
    code, body = _get(address, "/status", args.timeout)
    if code != 200:
        print(f"mlfabric: {address} answered {code}: {body.get('error', body)}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2) if args.json else format_status(body))
    return 0


def _parse_key(text: str) -> int:
    from mlfabric.core.ring import BITS, ring_id

    try:
        key = int(text, 0)
    except ValueError:
        return ring_id(text)  # any other text names a key by its hash
    if not 0 <= key < 1 << BITS:
        raise ConfigError(f"key {text} outside 0..2^{BITS}-1")
    return key


def _cmd_lookup(args: argparse.Namespace) -> int:
    key = _parse_key(args.key)
    address = _control_address(args)
    code, body = _get(address, f"/lookup?key={key}", args.timeout)
    if args.json:
        print(json.dumps(body, indent=2))
    elif code == 200:
        node = body["node"]
        print(f"key {key:016x} -> node {node['id']:016x} at {node['address']} "
              f"({body['hops']} hops, {body['elapsed_s'] * 1000:.2f} ms)")
    else:
        print(f"mlfabric: lookup of {key:016x} failed: {body.get('error', code)}", file=sys.stderr)
    return 0 if code == 200 else 1


# -------------------------------------------------------------------- jobs


def _cmd_job_submit(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    params = {"job_id": args.job_id or f"{args.task.split(':')[-1]}-{int(time.time())}", "task": args.task,
              "rounds": args.rounds, "local_epochs": args.local_epochs, "nodes_per_round": args.nodes_per_round,
              "lr": args.lr, "batch_size": args.batch_size, "seed": args.job_seed}
    query = urlencode({k: v for k, v in params.items() if v is not None})
    address = _control_address(args)
    code, body = _get(address, f"/job/submit?{query}", args.timeout)
    if code != 200:
        print(f"mlfabric: job not submitted: {body.get('error', code)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body))
    else:
        coord = body["coordinator"]
        print(f"job {body['job']} submitted ({body['rounds']} rounds); coordinator {coord['id']:016x} at "
              f"{coord['address']}")
        print(f"follow it with: mlfabric job status --job {body['job']} --node {address}")
    return 0


def _metric(value: Any, fmt: str, scale: float = 1.0) -> str:
    return "-" if not isinstance(value, int | float) else format(value * scale, fmt)


def format_job(j: dict[str, Any]) -> str:
    spec = j.get("spec", {})
    hist = j.get("history", [])
    host = j.get("host", {})
    lines = [f"job {j['job']}: {j.get('status', '?')} ({j.get('role')}), task {spec.get('task', '?')}, "
             f"{len(hist)}/{spec.get('rounds', '?')} rounds recorded, model version {host.get('model_version', 0)} "
             f"here, attempt {j.get('attempt', 0)}"]
    if hist:
        lines.append(f"  {'round':>5} {'updates':>7} {'members':>7} {'test loss':>9} {'accuracy':>8} {'seconds':>7}")
        for h in hist[-10:]:
            lines.append(f"  {h['round']:>5} {h.get('updates', 0):>7} {h.get('members', 0):>7} "
                         f"{_metric(h.get('test_loss'), '9.4f'):>9} {_metric(h.get('test_accuracy'), '7.2f', 100):>7}% "
                         f"{h.get('seconds', 0.0):>7.2f}")
    for e in j.get("events", []):
        lines.append(f"  coordinator {e.get('node')} from round {e.get('round')}, attempt {e.get('attempt')}: "
                     f"{e.get('event')}")
    return "\n".join(lines)


def _cmd_job_status(args: argparse.Namespace) -> int:
    address = _control_address(args)
    path = "/jobs" + (f"?job={args.job}" if args.job else "")
    code, body = _get(address, path, args.timeout)
    if code != 200:
        print(f"mlfabric: {address} answered {code}: {body.get('error', body)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    jobs = body.get("jobs", {})
    if not jobs:
        print("no jobs known to this node" + (f" named {args.job}" if args.job else ""))
        return 1 if args.job else 0
    print("\n".join(format_job(j) for j in jobs.values()))
    return 0


# -------------------------------------------------------------------- cluster and demo


def _cmd_cluster_up(args: argparse.Namespace) -> int:
    from mlfabric.config import PRESETS
    from mlfabric.runtime.cluster import cluster_up

    if args.preset not in PRESETS:
        raise ConfigError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    if args.nodes < 1:
        raise ConfigError("--nodes must be at least 1")
    cluster = cluster_up(args.workdir, args.nodes, preset=args.preset, extra_args=args.node_arg or [],
                         timeout=args.timeout)
    if args.json:
        print(json.dumps(cluster.summary()))
    else:
        for n in cluster.nodes:
            print(f"node{n.index:<4} {n.id:016x}  {n.address:<22} control {n.control:<22} pid {n.pid}")
        print(f"{len(cluster.nodes)} nodes listening; stop with: mlfabric cluster down --workdir {args.workdir}")
    return 0


def _cmd_cluster_down(args: argparse.Namespace) -> int:
    from mlfabric.runtime.cluster import cluster_down

    result = cluster_down(args.workdir, timeout=args.timeout)
    print(f"stopped {result['terminated']} node(s) with SIGTERM, killed {result['killed']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mlfabric.runtime.demo import run_demo

    return run_demo(nodes=args.nodes, workdir=args.workdir, seed=args.seed, rounds=args.rounds,
                    kill_round=None if args.kill_round is None else args.kill_round - 1, plot=args.plot)


# -------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlfabric", description="Peer-to-peer daemon for training neural "
                                     "networks across many servers.")
    parser.add_argument("--version", action="version", version=f"mlfabric {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = sub.add_parser("node", help="run a node (the daemon)")
    node.add_argument("--config", metavar="FILE", help="TOML settings file (also MLFABRIC_CONFIG)")
    node.add_argument("--preset", choices=["local", "lan", "wan"], help="timer preset (default lan)")
    node.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (port 0: any free port)")
    node.add_argument("--advertise", metavar="HOST:PORT", help="address other nodes use to reach this one")
    node.add_argument("--seed", action="append", metavar="HOST:PORT", help="a node already in the ring "
                      "(repeatable); none creates a new ring")
    node.add_argument("--data-dir", metavar="DIR", help="node identity and state")
    node.add_argument("--control", metavar="HOST:PORT", help="local JSON control endpoint")
    node.add_argument("--cluster-key-file", metavar="FILE", help="shared secret for mutual authentication")
    node.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    node.add_argument("--log-format", choices=["text", "json"])
    node.set_defaults(func=_cmd_node)

    def where(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--node", metavar="HOST:PORT", help="the node's control endpoint address")
        group.add_argument("--data-dir", metavar="DIR", help="find the control endpoint in DIR/control")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the node")

    status = sub.add_parser("status", help="show a node's ring state and counters")
    where(status)
    status.set_defaults(func=_cmd_status)

    lookup = sub.add_parser("lookup", help="find the node responsible for KEY")
    lookup.add_argument("key", metavar="KEY", help="integer (decimal or 0x-hex), or any text (hashed)")
    where(lookup)
    lookup.set_defaults(func=_cmd_lookup)

    job = sub.add_parser("job", help="submit a federated training job, follow its rounds")
    jsub = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    submit = jsub.add_parser("submit", help="store a job on the ring; every node takes part")
    submit.add_argument("--task", default="digits", help="'digits' (built in) or package.module:attr")
    submit.add_argument("--rounds", type=int, default=None, help="default: the task's")
    submit.add_argument("--local-epochs", type=int, default=None, help="default: the task's")
    submit.add_argument("--nodes-per-round", type=int, default=None, help="trainers sampled per round (default all)")
    submit.add_argument("--lr", type=float, default=None, help="default: the task's")
    submit.add_argument("--batch-size", type=int, default=None, help="default: the task's")
    submit.add_argument("--job-seed", type=int, default=None, help="model init and data split seed (default 0)")
    submit.add_argument("--job-id", default=None, help="job name (default TASK-<unix time>)")
    where(submit)
    submit.set_defaults(func=_cmd_job_submit)
    jstatus = jsub.add_parser("status", help="round, participants, loss and accuracy, failures survived")
    jstatus.add_argument("--job", default=None, help="only this job")
    where(jstatus)
    jstatus.set_defaults(func=_cmd_job_status)

    cluster = sub.add_parser("cluster", help="a local multi-process cluster on loopback addresses")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    up = csub.add_parser("up", help="start N daemons and wait until all listen")
    up.add_argument("--nodes", type=int, required=True)
    up.add_argument("--workdir", default=DEFAULT_WORKDIR)
    up.add_argument("--preset", default="local")
    up.add_argument("--json", action="store_true", help='print {"nodes":[{"address","pid","control"}...]}')
    up.add_argument("--timeout", type=float, default=None, help="seconds to wait for all (default 30 + N/2)")
    up.add_argument("--node-arg", action="append", metavar="ARG", help="extra argument for every node "
                    "(repeatable, e.g. --node-arg=--log-level=debug)")
    up.set_defaults(func=_cmd_cluster_up)
    down = csub.add_parser("down", help="SIGTERM the cluster's daemons (SIGKILL after --timeout)")
    down.add_argument("--workdir", default=DEFAULT_WORKDIR)
    down.add_argument("--timeout", type=float, default=10.0)
    down.set_defaults(func=_cmd_cluster_down)

    demo = sub.add_parser("demo", help="the main job: local daemons train a CNN together, one aggregator is "
                          "SIGKILLed mid-training, compared with a failure-free run")
    demo.add_argument("--nodes", type=int, default=8)
    demo.add_argument("--workdir", default=None, help="keep the clusters' files and logs here (default: a temp dir)")
    demo.add_argument("--seed", type=int, default=1, help="the job's seed (model init, data split)")
    demo.add_argument("--rounds", type=int, default=None, help="training rounds (default 15)")
    demo.add_argument("--kill-round", type=int, default=None, help="round (1-based) in which to SIGKILL an "
                      "aggregator (default: a third of the way)")
    demo.add_argument("--plot", default=None, help="PNG to write (default ./mlfabric-demo.png)")
    demo.set_defaults(func=_cmd_demo)

    try:  # the simulator adds "sim ..." when its module exists
        sim_commands = importlib.import_module("mlfabric.sim.commands")
    except ModuleNotFoundError as exc:
        if exc.name not in ("mlfabric.sim", "mlfabric.sim.commands"):
            raise
    else:
        sim_commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mlfabric: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except MlfabricError as exc:
        print(f"mlfabric: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
