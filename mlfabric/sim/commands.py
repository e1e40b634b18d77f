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

    def __init__(self, stream: Any = None, width: int = 30) -> None:
        self.stream, self.width = stream if stream is not None else sys.stderr, width  # the current stderr
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
    print("mlfabric: 'sim aggregate' is gone: the aggregation runs inside whole jobs now; use 'mlfabric sim job "
          "--nodes N --rounds R --kill-aggregators F' (see 'mlfabric sim job --help')", file=sys.stderr)
    return 2


def _kill_round(value: str) -> int | str:
    if value == "spread":
        return value
    try:
        r = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("a round number or 'spread'") from None
    if r < 0:
        raise argparse.ArgumentTypeError("a round number is at least 0")
    return r


def job_summary(r: dict[str, Any]) -> str:
    """The human-readable result of ``sim job`` (the JSON's main fields)."""
    lines = [f"{r['nodes']} nodes ({r['ring']} ring), {r['rounds_completed']}/{r['rounds']} rounds, seed {r['seed']}"
             + (f", {r['nodes_per_round']} trainers per round" if r["nodes_per_round"] else "")
             + (f", {r['killed_aggregators']} aggregators killed" if r["killed_aggregators"] else "")
             + (f", churn {r['churn']}/s ({r['joiners']} joined, {r['leaves']} left)" if r["churn"] else ""),
             f"contributions: expected {r['contributions_expected']}, counted {r['contributions_counted']}, "
             f"lost {r['lost']}, duplicated {r['duplicated']}, unexpected {r['unexpected']} "
             f"(dead members included whole: {r['dead_included']})",
             f"round time median {r['round_time_median_s']} s (max {r['round_time_max_s']} s, virtual); job messages "
             f"per node and round: median {r['msgs_per_node_round_median']}, max {r['msgs_per_node_round_max']}; "
             f"bytes out max/median {r['bytes_out_max_over_median']}"]
    if r["coordinator_killed"]:
        lines.append(f"coordinator killed: taken over in {r['coordinator_takeover_s']} s; rounds recorded "
                     f"{r['rounds_recorded']}")
    if r["churn"]:
        lines.append(f"joiners held to training in a later round: {r['joiners_eligible']}, trained: "
                     f"{r['joiners_trained']}")
    lines.append(f"final model at {r['final_model_nodes']}/{r['live_nodes']} live nodes; {r['messages']:,} messages "
                 f"(overlay included) over {r['virtual_s']} virtual s; wall {r['wall_s']} s")
    return "\n".join(lines)


def job_broken(r: dict[str, Any]) -> bool:
    """A broken guarantee: an update lost, counted twice or out of nowhere, a round committed twice, or
    the job not finished."""
    return bool(r["lost"] or r["duplicated"] or r["unexpected"] or r["double_commits"]
                or r["rounds_completed"] < r["rounds"] or r["kill_precondition_failures"])


def _cmd_job(args: argparse.Namespace) -> int:
    from mlfabric.config import JobsConfig
    from mlfabric.sim.job import JobRun, run_job

    try:
        run = JobRun(nodes=args.nodes, rounds=args.rounds, seed=args.seed, ring=args.ring,
                     kill_aggregators=args.kill_aggregators, kill_round=args.kill_round,
                     kill_coordinator=args.kill_coordinator, churn=args.churn, nodes_per_round=args.nodes_per_round,
                     stragglers=args.stragglers, model_bytes=args.model_bytes, overlay=_overlay(args.preset),
                     failure=_failure(args.preset), jobs=JobsConfig(**PRESETS[args.preset].get("jobs", {})))
    except ValueError as exc:
        print(f"mlfabric: {exc}", file=sys.stderr)
        return 2
    bar = None if args.json else ProgressBar()
    try:
        r = run_job(run, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        r.pop("per_round")
        print(json.dumps(r))
    else:
        print(job_summary(r))
    return 1 if job_broken(r) else 0


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

    job = ssub.add_parser("job", help="a whole training job (the real job machine, exact tally payloads); checks "
                          "every live contribution is counted exactly once through kills, takeover and churn")
    job.add_argument("--nodes", type=int, required=True, help="number of nodes (all of them members)")
    job.add_argument("--rounds", type=int, default=10, help="rounds of the job (default 10)")
    job.add_argument("--seed", type=int, default=1, help="seed for ids, latencies, training times, victims, churn")
    job.add_argument("--ring", choices=["auto", "ideal", "protocol"], default="auto",
                     help="how the ring is made before the job: installed from the true ids (ideal) or through "
                     "the join protocol (protocol); auto: protocol up to 2,000 nodes, ideal above")
    job.add_argument("--kill-aggregators", type=int, default=0,
                     help="nodes with children in the round's tree crashed after forwarding its notice and "
                     "before sending their partial")
    job.add_argument("--kill-round", type=_kill_round, default=1,
                     help="the round of those kills (default 1), or 'spread' (evenly over the rounds)")
    job.add_argument("--kill-coordinator", type=int, default=None, metavar="ROUND",
                     help="crash the coordinator right after it opens this round")
    job.add_argument("--churn", type=float, default=0.0,
                     help="joins (through the join protocol) and graceful leaves per virtual second during the job, "
                     "half each")
    job.add_argument("--nodes-per-round", type=int, default=0, help="trainers sampled per round (0: every member)")
    job.add_argument("--stragglers", type=float, default=0.0,
                     help="fraction of a round's trainings that take 4x as long")
    job.add_argument("--model-bytes", type=int, default=1 << 20,
                     help="modelled size of a model and of a partial on the wire (default 1 MiB)")
    job.add_argument("--preset", choices=sorted(PRESETS), default="lan", help="timers (default lan)")
    job.add_argument("--json", action="store_true", help="print one JSON object")
    job.set_defaults(func=_cmd_job)

    gone = ssub.add_parser("aggregate", add_help=False, prefix_chars="\x00",
                           help="gone: use 'sim job' (aggregation runs inside whole jobs)")
    gone.add_argument("ignored", nargs="*")
    gone.set_defaults(func=_cmd_aggregate)
