"""``mlfabric sim ...``: experiments on the deterministic simulator, with JSON output for scripts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mlfabric.config import PRESETS, FailureConfig, OverlayConfig


class ProgressBar:
    """One updating line on stderr: phase, a bar, and the elapsed wall time."""

    def __init__(self, stream: Any = sys.stderr, width: int = 30) -> None:
        self.stream, self.width = stream, width
        self._t0 = time.perf_counter()
        self._last = ""

    def __call__(self, phase: str, fraction: float) -> None:
        fraction = min(1.0, max(0.0, fraction))
        if not self.stream.isatty():  # logs and pipes: one line per phase, no carriage returns
            if phase != self._last:
                self.stream.write(f"{phase} ({time.perf_counter() - self._t0:.1f}s)\n")
                self.stream.flush()
                self._last = phase
            return
        filled = int(fraction * self.width)
        line = (f"\r{phase:<11} [{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:5.1f}%"
                f"  {time.perf_counter() - self._t0:6.1f}s")
        if line != self._last:
            self.stream.write(line)
            self.stream.flush()
            self._last = line

    def close(self) -> None:
        if self._last and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


def _overlay(preset: str) -> OverlayConfig:
    return OverlayConfig(**PRESETS[preset].get("overlay", {}))


def _failure(preset: str) -> FailureConfig:
    return FailureConfig(**PRESETS[preset].get("failure", {}))


_TABLE = [
    ("detection_delay_median_s", "delay median s"),
    ("detection_delay_p99_s", "delay p99 s"),
    ("keepalive_msgs_per_node_s", "keep-alive msg/node/s"),
    ("propagation_msgs_per_failure", "propagation msg/failure"),
    ("nodes_notified_per_failure", "nodes notified/failure"),
    ("true_holders_per_failure", "true holders/failure"),
    ("missed_holders", "missed holders"),
    ("false_positives", "false positives"),
    ("estimation_precision", "estimate precision"),
    ("estimation_recall", "estimate recall"),
    ("lookup_failure_rate", "lookup failure rate"),
    ("wall_s", "wall s"),
]


def comparison_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table, one column per scheme (also used by docs/failure.md)."""
    head = ["metric", *(r["scheme"] for r in results)]
    rows = [head]
    for key, label in _TABLE:
        rows.append([label, *("-" if r.get(key) is None else f"{r[key]:g}" for r in results)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths,
             strict=True))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_failure(args: argparse.Namespace) -> int:
    from mlfabric.sim.failure import SCHEMES, run_failure

    if args.nodes < 3 or not 0 <= args.failures < args.nodes:
        print("mlfabric: need --nodes >= 3 and 0 <= --failures < --nodes", file=sys.stderr)
        return 2
    if not 0.0 <= args.loss < 1.0 or args.churn < 0:
        print("mlfabric: --loss must be in [0, 1) and --churn at least 0", file=sys.stderr)
        return 2
    schemes = list(SCHEMES) if args.scheme == "all" else [args.scheme]
    results = []
    for scheme in schemes:
        bar = None if args.json else ProgressBar()
        try:
            results.append(run_failure(args.nodes, args.seed, args.failures, scheme, progress=bar,
                                       loss=args.loss, churn=args.churn, overlay=_overlay(args.preset),
                                       failure=_failure(args.preset), window=args.window))
        finally:
            if bar is not None:
                bar.close()
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"schemes": results}))
    else:
        r = results[0]
        print(f"{r['nodes']} nodes, {r['failures']} crashes over {r['window_virtual_s']} virtual s, "
              f"seed {r['seed']}, loss {r['loss']}, churn {r['churn']}/s")
        print(comparison_table(results))
    return 0


def _cmd_ring(args: argparse.Namespace) -> int:
    from mlfabric.sim.ring import run_ring

    if args.nodes < 1 or args.lookups < 0:
        print("mlfabric: --nodes must be at least 1 and --lookups at least 0", file=sys.stderr)
        return 2
    bar = None if args.json else ProgressBar()
    try:
        result = run_ring(args.nodes, args.seed, args.lookups, cfg=_overlay(args.preset),
                          join_window=args.join_window, wire=args.wire, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(result))
        return 0 if result["converged"] else 1
    conv = (f"{result['converged_virtual_s']} s after the last join" if result["converged"]
            else "NOT converged within the limit")
    print(f"ring of {result['nodes']} nodes (seed {result['seed']}), joined over "
          f"{result['join_window_virtual_s']} virtual s, converged {conv}")
    print(f"lookups: {result['lookups']}, correct {result['correct_fraction'] * 100:.2f}%, "
          f"mean hops {result['mean_hops']:.2f} (½·log2 N = {result['half_log2_n']:.2f}), "
          f"p99 {result['p99_hops']}, max {result['max_hops']}")
    print(f"messages: {result['messages']:,}; wall time {result['wall_s']} s")
    return 0 if result["converged"] else 1


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from mlfabric.sim.aggregate import AggregateRun, run_aggregate

    if args.nodes < 2 or args.parents < 1 or args.rounds < 1 or args.shards < 1:
        print("mlfabric: need --nodes >= 2, --parents >= 1, --rounds >= 1, --shards >= 1", file=sys.stderr)
        return 2
    if not 0 <= args.kill_aggregators < args.nodes:
        print("mlfabric: --kill-aggregators must be in [0, --nodes)", file=sys.stderr)
        return 2
    run = AggregateRun(nodes=args.nodes, parents=args.parents, kill_aggregators=args.kill_aggregators,
                       rounds=args.rounds, seed=args.seed, shards=args.shards, replicas=args.replicas,
                       detect_delay=args.detect_delay, straggler_fraction=args.stragglers,
                       repair=None if args.repair == "auto" else args.repair == "on")
    bar = None if args.json else ProgressBar()
    try:
        r = run_aggregate(run, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(r))
    else:
        mode = f"skip mesh, {r['parents']} parents" if r["parents"] > 1 else "plain tree (1 parent)"
        print(f"{r['nodes']} nodes, {mode}, repair {'on' if r['repair'] else 'off'}, {r['shards']} shards, "
              f"{r['rounds']} rounds, {r['killed']} aggregators killed mid-round, seed {r['seed']}")
        print(f"contributions: expected {r['contributions_expected']}, counted {r['contributions_counted']}, "
              f"lost {r['lost']}, duplicated {r['duplicated']}, corrupt {r['corrupt']} "
              f"(dead members included whole: {r['dead_included']})")
        print(f"rounds completed {r['rounds_completed']}/{r['rounds']}, round time median "
              f"{r['round_time_median_s']} s (max {r['round_time_max_s']} s), {r['messages_per_round']:g} "
              f"messages/round, {r['repair_requests']} repair requests; wall {r['wall_s']} s")
    # Exit 1 on a broken guarantee: anything counted twice or corrupted, or (with repair on, where the
    # protocol promises it) a live contribution lost. The plain tree's losses are its expected result.
    broken = r["duplicated"] or r["corrupt"] or (r["repair"] and r["lost"])
    return 1 if broken else 0


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("sim", help="experiments on the deterministic simulator")
    ssub = sim.add_subparsers(dest="sim_command", required=True, metavar="EXPERIMENT")
    ring = ssub.add_parser("ring", help="build a ring through the join protocol, then measure lookups")
    ring.add_argument("--nodes", type=int, required=True, help="number of nodes")
    ring.add_argument("--seed", type=int, default=1, help="seed for ids, join times, latencies and keys")
    ring.add_argument("--lookups", type=int, default=1000, help="lookups from random nodes for random keys")
    ring.add_argument("--preset", choices=sorted(PRESETS), default="lan", help="overlay timers (default lan)")
    ring.add_argument("--join-window", type=float, default=None,
                      help="virtual seconds over which nodes join (default max(5, N/200))")
    ring.add_argument("--wire", action="store_true", help="encode and decode every message (slower)")
    ring.add_argument("--json", action="store_true", help="print one JSON object")
    ring.set_defaults(func=_cmd_ring)

    fail = ssub.add_parser("failure", help="crash nodes in a settled ring; measure detection and propagation")
    fail.add_argument("--nodes", type=int, required=True, help="number of nodes")
    fail.add_argument("--seed", type=int, default=1, help="seed for ids, victims, crash times, latencies, loss")
    fail.add_argument("--failures", type=int, required=True, help="nodes crashed (fail-stop) at random times")
    fail.add_argument("--scheme", choices=["stateless", "stateful", "stabilize", "all"], default="stateless",
                      help="propagation scheme; 'all' runs the three on the same seed and compares them")
    fail.add_argument("--loss", type=float, default=0.0, help="message loss probability during the failures")
    fail.add_argument("--churn", type=float, default=0.0,
                      help="churn events per virtual second during the failures (a join or a graceful leave)")
    fail.add_argument("--window", type=float, default=None,
                      help="virtual seconds over which the crashes happen (default max(30, 0.3 * F))")
    fail.add_argument("--preset", choices=sorted(PRESETS), default="lan", help="timers (default lan)")
    fail.add_argument("--json", action="store_true", help="print JSON (one object per scheme under 'schemes' "
                      "with --scheme all)")
    fail.set_defaults(func=_cmd_failure)

    agg = ssub.add_parser("aggregate", help="skip-mesh aggregation rounds with aggregators killed mid-round; "
                          "checks every live contribution is counted exactly once")
    agg.add_argument("--nodes", type=int, required=True, help="number of nodes (all contribute every round)")
    agg.add_argument("--parents", type=int, default=2, help="parents per node (1: the plain-tree baseline)")
    agg.add_argument("--kill-aggregators", type=int, default=0,
                     help="inner nodes killed mid-round, spread evenly over the rounds")
    agg.add_argument("--rounds", type=int, default=10)
    agg.add_argument("--shards", type=int, default=2, help="shards per model (one mesh and root each)")
    agg.add_argument("--replicas", type=int, default=2, help="root candidates per shard (owner + replicas)")
    agg.add_argument("--detect-delay", type=float, default=2.0,
                     help="virtual seconds from a crash to every node's failure verdict")
    agg.add_argument("--stragglers", type=float, default=0.05,
                     help="fraction of nodes that train 4x slower in a round")
    agg.add_argument("--repair", choices=["auto", "on", "off"], default="auto",
                     help="root asks missing contributors directly (auto: on with >= 2 parents)")
    agg.add_argument("--seed", type=int, default=1)
    agg.add_argument("--json", action="store_true", help="print one JSON object")
    agg.set_defaults(func=_cmd_aggregate)
