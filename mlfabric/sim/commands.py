"""``mlfabric sim ...``: experiments on the deterministic simulator, with JSON output for scripts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from mlfabric.config import PRESETS, OverlayConfig


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
