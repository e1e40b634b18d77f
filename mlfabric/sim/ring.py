"""``mlfabric sim ring``: build a Chord ring through the real join protocol, then measure lookups.

Nodes join over a join window through a random node that joined earlier (no precomputed tables);
the network runs until every node's successor, predecessor and all 64 fingers equal the ideal ones
(``converged_virtual_s`` counts from the last join); then L lookups from random nodes for random keys
are checked against the true successor.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlfabric.config import FailureConfig, OverlayConfig
from mlfabric.core.events import Event, LookupDone
from mlfabric.core.node import NodeCore
from mlfabric.core.ring import BITS, ideal_routing, ring_id, successor_of
from mlfabric.sim.network import SimNetwork
from mlfabric.wire.messages import Peer

Progress = Callable[[str, float], None]


@dataclass
class RingSim:
    """A simulated ring of ``n`` nodes with deterministic ids and addresses."""

    n: int
    seed: int
    cfg: OverlayConfig = field(default_factory=OverlayConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    latency: tuple[float, float] = (0.001, 0.020)
    loss: float = 0.0
    wire: bool = False
    trace: bool = False
    # builds node i's core (default: a routing-only NodeCore); sim/job.py gives its nodes a job machine
    make_core: Callable[[Peer, int], NodeCore] | None = None

    def __post_init__(self) -> None:
        self.net = SimNetwork(self.seed, latency=self.latency, loss=self.loss, wire=self.wire, trace=self.trace)
        self.rng = random.Random(f"ring:{self.seed}")
        self.peers: list[Peer] = []
        seen: set[int] = set()
        for i in range(self.n):
            nid = ring_id(f"{self.seed}:{i}")
            while nid in seen:  # a 64-bit collision is astronomically rare, but never silently merge nodes
                nid = (nid + 1) & ((1 << BITS) - 1)
            seen.add(nid)
            self._add_node(i, nid)
        self.net.on_event = self._on_event
        self.lookup_results: dict[tuple[str, int], LookupDone] = {}
        self.last_join_at = 0.0
        self._unconverged: set[str] = set()

    def _add_node(self, i: int, nid: int) -> Peer:
        peer = Peer(nid, f"s{i}:7700")
        self.peers.append(peer)
        if self.make_core is not None:
            self.net.add(self.make_core(peer, i))
        else:
            self.net.add(NodeCore(peer, self.cfg, random.Random(f"{self.seed}:{i}"), failure=self.failure))
        return peer

    def _on_event(self, address: str, ev: Event) -> None:
        if isinstance(ev, LookupDone):
            self.lookup_results[(address, ev.token)] = ev

    def core(self, address: str) -> NodeCore:
        return self.net.nodes[address]

    def schedule_joins(self, window: float) -> None:
        """Node 0 creates the ring at t=0; the rest join at uniform random times within ``window``,
        each through a random node that started at least ``settle`` seconds earlier."""
        times = sorted(self.rng.uniform(0.0, window) for _ in range(self.n - 1))
        settle = 2 * self.cfg.stabilize_interval
        first = self.peers[0].address
        self.net.call_at(0.0, lambda: self._bootstrap(first, []))
        started: list[tuple[float, str]] = [(0.0, first)]
        for t, peer in zip(times, self.peers[1:], strict=True):
            eligible = [a for s, a in started if s <= t - settle] or [first]
            seed = eligible[self.rng.randrange(len(eligible))]
            self.net.call_at(t, lambda a=peer.address, s=seed: self._bootstrap(a, [s]))
            started.append((t, peer.address))
        self.last_join_at = times[-1] if times else 0.0

    def _bootstrap(self, address: str, seeds: list[str]) -> None:
        self.core(address).bootstrap(seeds, self.net.now)
        self.net.pump(address)

    # ------------------------------------------------------------------ convergence

    def _ideal(self) -> dict[str, tuple[int, int, list[int]]]:
        live = [c for c in self.net.live()]
        ids = sorted(c.me.id for c in live)
        return {c.me.address: ideal_routing(c.me.id, ids) for c in live}

    def node_converged(self, core: NodeCore, ideal: tuple[int, int, list[int]]) -> bool:
        c = core.chord
        pred, succ, fingers = ideal
        if c.predecessor is None or c.predecessor.id != pred or c.successor.id != succ:
            return False
        return all(f is not None and f.id == want for f, want in zip(c.fingers, fingers, strict=True))

    def converged(self, ideal: dict[str, tuple[int, int, list[int]]] | None = None, full: bool = False) -> bool:
        ideal = ideal or self._ideal()
        if full or not self._unconverged:
            self._unconverged = set(ideal)
        self._unconverged = {a for a in self._unconverged if not self.node_converged(self.core(a), ideal[a])}
        return not self._unconverged

    def run_until_converged(self, check_every: float, limit: float, progress: Progress | None = None) -> float | None:
        """Run until all live nodes hold the ideal routing state; the virtual time, or None at ``limit``."""
        ideal = self._ideal()
        self._unconverged = set(ideal)
        start = self.net.now
        while self.net.now - start < limit:
            self.net.run_until(self.net.now + check_every)
            if self.converged(ideal) and self.converged(ideal, full=True):
                return self.net.now
            if progress:
                progress("converging", 1 - len(self._unconverged) / max(1, len(ideal)))
        return None

    # ------------------------------------------------------------------ lookups

    def run_lookups(self, count: int, rate: float, progress: Progress | None = None) -> list[tuple[LookupDone, int]]:
        """Issue ``count`` lookups (random live node, random key) at ``rate`` per virtual second.
        Returns (result, true successor id) pairs."""
        live = self.net.live()
        ids = sorted(c.me.id for c in live)
        issued: list[tuple[str, int, int]] = []
        t0 = self.net.now
        for k in range(count):
            core = live[self.rng.randrange(len(live))]
            key = self.rng.getrandbits(BITS)

            def go(core: NodeCore = core, key: int = key) -> None:
                token = core.lookup(key, self.net.now)
                issued.append((core.me.address, token, key))
                self.net.pump(core.me.address)

            self.net.call_at(t0 + k / rate, go)
        end = t0 + count / rate + 10 * self.cfg.rpc_timeout * 4
        step = max(1.0, (end - t0) / 50)
        while self.net.now < end:
            self.net.run_until(min(end, self.net.now + step))
            if progress:
                progress("lookups", len(self.lookup_results) / max(1, count))
            if len(issued) == count and all((a, t) in self.lookup_results for a, t, _ in issued):
                break
        out = []
        for address, token, key in issued:
            res = self.lookup_results.get((address, token))
            if res is None:
                res = LookupDone(token, key, None, 0, math.inf)
            out.append((res, successor_of(key, ids)))
        return out


def run_ring(
    nodes: int,
    seed: int,
    lookups: int,
    cfg: OverlayConfig | None = None,
    join_window: float | None = None,
    converge_limit: float = 600.0,
    wire: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The ``sim ring`` experiment; returns the JSON-ready result."""
    t_wall = time.perf_counter()
    cfg = cfg or OverlayConfig()
    sim = RingSim(nodes, seed, cfg, wire=wire)
    window = join_window if join_window is not None else max(5.0, nodes / 200)
    sim.schedule_joins(window)
    # run the join window with progress
    steps = 20
    for k in range(1, steps + 1):
        sim.net.run_until(sim.last_join_at * k / steps)
        if progress:
            progress("joining", k / steps)
    converged_at = sim.run_until_converged(check_every=cfg.stabilize_interval, limit=converge_limit, progress=progress)
    build_messages = sim.net.messages
    results = sim.run_lookups(lookups, rate=max(1000.0, lookups / 4), progress=progress)
    correct = sum(1 for r, truth in results if r.node is not None and r.node.id == truth)
    hops = sorted(r.hops for r, _ in results if r.node is not None)
    out: dict[str, Any] = {
        "nodes": nodes,
        "seed": seed,
        "lookups": lookups,
        "correct_fraction": correct / lookups if lookups else 1.0,
        "failed_lookups": sum(1 for r, _ in results if r.node is None),
        "mean_hops": sum(hops) / len(hops) if hops else 0.0,
        "p99_hops": hops[min(len(hops) - 1, int(0.99 * len(hops)))] if hops else 0,
        "max_hops": hops[-1] if hops else 0,
        "half_log2_n": 0.5 * math.log2(nodes) if nodes > 1 else 0.0,
        "converged": converged_at is not None,
        "converged_virtual_s": None if converged_at is None else round(converged_at - sim.last_join_at, 3),
        "join_window_virtual_s": round(sim.last_join_at, 3),
        "messages": sim.net.messages,
        "build_messages": build_messages,
        "virtual_s": round(sim.net.now, 3),
        "wall_s": round(time.perf_counter() - t_wall, 2),
    }
    return out
