"""Look inside one ``sim failure`` run: how each true holder lost the crashed node, and what the
stateless estimate looks like per declaration. Prints plain text (used for docs/failure.md).

    python benchmarks/failure_diagnose.py --nodes 2000 --failures 100 --seed 1 --scheme stateless

It runs the same experiment as ``mlfabric sim failure`` (same seed, same report) with extra hooks:

* for every (crash, true holder): whether the holder crashed too, was the exact detector, purged
  the node because a notice arrived (a ``PeerPurged`` event), got a notice only after it had already
  purged the node some other way (its own probe, stabilize or fix_fingers), or was never sent a notice;
* crash → first exact declaration (the only declaration that propagates, stateless) and from that
  declaration to the last holder's purge;
* lookups answered with a node that had already crashed;
* stateless only: precision and recall of the estimate from the first declaration of each crash,
  exact or not (the report's metric before commit 7cd5722), and from the first *exact* declaration,
  whose estimate is the one that is actually sent (the report's metric since).
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter, defaultdict
from typing import Any

from mlfabric.core.failure import PeerDied, PeerPurged
from mlfabric.sim.failure import FailureRun


class DiagnosedRun(FailureRun):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.purged_by_notice: dict[int, dict[str, float]] = defaultdict(dict)

    def _on_event(self, address: str, ev: Any) -> None:
        super()._on_event(address, ev)
        if isinstance(ev, PeerPurged):
            self.purged_by_notice[ev.peer.id].setdefault(address, self.net.now)


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def diagnose(nodes: int, failures: int, seed: int, scheme: str) -> list[str]:
    run = DiagnosedRun(nodes, seed, failures, scheme)
    rep = run.run()
    out = [f"{scheme}: N={nodes} F={failures} seed={seed}: delay median {rep['detection_delay_median_s']} s, "
           f"p99 {rep['detection_delay_p99_s']} s, max {rep['detection_delay_max_s']} s"]
    net_nodes = run.net.nodes
    first: dict[str, tuple[float, PeerDied]] = {}
    first_exact: dict[str, tuple[float, PeerDied, str]] = {}
    for t, det, ev in run.declared:
        a = ev.peer.address
        if a not in run.crashed_at or ev.pred is None:
            continue
        first.setdefault(a, (t, ev))
        if ev.exact and a not in first_exact:
            first_exact[a] = (t, ev, det)
    out.append(f"crashes declared: {len(first)}; first declaration non-exact: "
               f"{sum(1 for t, ev in first.values() if not ev.exact)}; with an exact declaration: {len(first_exact)}")

    kinds: Counter[str] = Counter()
    for a, t0 in run.crashed_at.items():
        did = net_nodes[a].me.id
        sent_to = run.notice_targets.get(did, set())
        for h in run.holders[a]:
            if h in run.crashed_at and run.crashed_at[h] <= t0 + run.resolved.get(a, float("inf")):
                kind = "holder crashed before the crash was resolved"
            elif a in first_exact and h == first_exact[a][2]:
                kind = "the exact detector"
            elif h in run.purged_by_notice[did]:
                kind = "purged when a notice arrived"
            elif h in sent_to:
                kind = "notice arrived after it had purged otherwise"
            else:
                kind = "no notice sent to it"
            kinds[kind] += 1
    out.append(f"holder slots ({sum(kinds.values())}): " + "; ".join(f"{k} {v}" for k, v in kinds.most_common()))

    decl = [first_exact[a][0] - run.crashed_at[a] for a in first_exact]
    after = [run.crashed_at[a] + run.resolved[a] - first_exact[a][0] for a in first_exact if a in run.resolved]
    if decl:
        out.append(f"crash -> first exact declaration: min {min(decl):.3f} median {_q(decl, 0.5):.3f} "
                   f"max {max(decl):.3f} s")
    if after:
        out.append(f"first exact declaration -> last holder purged: median {_q(after, 0.5):.3f} "
                   f"p90 {_q(after, 0.9):.3f} max {max(after):.3f} s")

    for address, ev, t_done in run.lookup_done:
        if (address, ev.token) in run.lookups and ev.node is not None:
            ans = ev.node.address
            if ans in run.crashed_at and run.crashed_at[ans] < t_done:
                out.append(f"lookup from {address} answered {ans}, which had crashed "
                           f"{t_done - run.crashed_at[ans]:.3f} s before the answer")

    if scheme == "stateless":
        r = run.sim.cfg.successors
        ids = {c.me.id: a for a, c in net_nodes.items()}

        def score(decls: dict[str, tuple]) -> str:
            prec, rec, size = [], [], []
            for a, (t, ev, *_) in decls.items():
                alive = sorted(i for i, x in ids.items() if x not in run.crashed_at or run.crashed_at[x] > t)
                est = run._estimated(ev.peer.id, ev.pred.id, alive, r)
                true = {net_nodes[h].me.id for h in run.holders[a]
                        if h not in run.crashed_at or run.crashed_at[h] > t}
                if est and true:
                    hit = len(est & true)
                    prec.append(hit / len(est))
                    rec.append(hit / len(true))
                    size.append(len(est))
            if not prec:
                return "none"
            return (f"precision {statistics.mean(prec):.4f} recall {statistics.mean(rec):.4f} "
                    f"mean |estimate| {statistics.mean(size):.2f} (max {max(size)}), over {len(prec)} crashes")

        out.append("estimate from the first declaration, exact or not: " + score(first))
        out.append("estimate from the first exact declaration (the one sent, as in the report): " + score(first_exact))
        nonexact = {a: v for a, v in first.items() if not v[1].exact}
        if nonexact:
            out.append("  first declarations that were non-exact only: " + score(nonexact))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--failures", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scheme", choices=["stateless", "stateful", "stabilize"], default="stateless")
    args = ap.parse_args(argv)
    print("\n".join(diagnose(args.nodes, args.failures, args.seed, args.scheme)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
