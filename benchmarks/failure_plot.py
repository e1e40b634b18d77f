"""Plot the failure-detection comparison of the three schemes (docs/failure.md).

    python benchmarks/failure_plot.py --nodes 2000 --failures 100 --seed 1 --out docs/failure
    python benchmarks/failure_plot.py --input docs/failure.json --out docs/failure   # no simulation

Runs ``mlfabric sim failure --nodes N --failures F --scheme all --seed S --json`` (or reads a JSON
file that command produced), writes the JSON it used to ``OUT.json`` and a PNG with two panels to
``OUT.png``:

(a) the distribution of detection delay per scheme (empirical CDF of ``detection_delays_s``, one
    value per crash: the time until every true holder of the crashed node has purged it);
(b) message cost per scheme: keep-alive messages per node per second and propagation messages per
    failure (bars, one axis each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"stateless": "tab:blue", "stateful": "tab:orange", "stabilize": "tab:green"}
STYLES = {"stateless": "-", "stateful": "--", "stabilize": ":"}  # curves that coincide stay visible


def run_simulation(nodes: int, failures: int, seed: int, preset: str = "lan") -> dict[str, Any]:
    """Run the three schemes through the CLI (a subprocess, as a user would) and parse its JSON."""
    cmd = [sys.executable, "-m", "mlfabric", "sim", "failure", "--nodes", str(nodes), "--failures",
           str(failures), "--scheme", "all", "--seed", str(seed), "--preset", preset, "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def _schemes(result: dict[str, Any]) -> list[dict[str, Any]]:
    # ``--scheme all`` prints {"schemes": [...]}; a single scheme prints one object
    return list(result["schemes"]) if "schemes" in result else [result]


def plot(result: dict[str, Any], png: Path) -> Path:
    """Draw the two panels of ``result`` (the JSON of ``sim failure --json``) into ``png``."""
    schemes = _schemes(result)
    first = schemes[0]
    fig, (ax_delay, ax_ka) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.3, 1]})

    # (a) CDF of the per-failure detection delay
    for r in schemes:
        delays = sorted(r.get("detection_delays_s") or [])
        name = r["scheme"]
        if not delays:
            ax_delay.plot([], [], color=COLORS.get(name), label=f"{name} (no delays)")
            continue
        n = len(delays)
        xs_cdf = [delays[0], *delays]
        ys = [0.0, *((k + 1) / n for k in range(n))]
        undetected = r.get("undetected_failures", 0)
        label = f"{name}: median {r.get('detection_delay_median_s')} s, p99 {r.get('detection_delay_p99_s')} s"
        if undetected:
            label += f", {undetected} unresolved"
        ax_delay.step(xs_cdf, ys, where="post", color=COLORS.get(name), linestyle=STYLES.get(name, "-"),
                      label=label, linewidth=2.2 if STYLES.get(name) == ":" else 1.6)
    ax_delay.set_xlabel("detection delay: crash → every true holder purged (virtual s)")
    ax_delay.set_ylabel("fraction of failures")
    ax_delay.set_ylim(0, 1.02)
    ax_delay.set_xlim(left=0)
    ax_delay.grid(True, alpha=0.3)
    ax_delay.legend(loc="lower right", fontsize=8)
    ax_delay.set_title("(a) detection delay, empirical CDF")

    # (b) message cost: two bar groups on twin axes
    names = [r["scheme"] for r in schemes]
    ka = [r.get("keepalive_msgs_per_node_s") or 0.0 for r in schemes]
    prop = [r.get("propagation_msgs_per_failure") or 0.0 for r in schemes]
    width = 0.38
    xs = list(range(len(names)))
    ax_prop = ax_ka.twinx()
    bars_ka = ax_ka.bar([x - width / 2 for x in xs], ka, width, color=[COLORS.get(n, "grey") for n in names],
                        edgecolor="black", label="keep-alive msg / node / s (left axis)")
    bars_prop = ax_prop.bar([x + width / 2 for x in xs], prop, width, color="white",
                            edgecolor=[COLORS.get(n, "grey") for n in names], hatch="//", linewidth=1.5,
                            label="propagation msg / failure (right axis)")
    for bars, values, ax in ((bars_ka, ka, ax_ka), (bars_prop, prop, ax_prop)):
        for b, v in zip(bars, values, strict=True):
            ax.annotate(f"{v:g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax_ka.set_xticks(xs, names)
    ax_ka.set_ylabel("keep-alive messages per node per second")
    ax_prop.set_ylabel("propagation messages per failure")
    ax_ka.set_ylim(0, max(ka + [1e-9]) * 1.2)
    ax_prop.set_ylim(0, max(prop + [1e-9]) * 1.2)
    ax_ka.legend(handles=[bars_ka, bars_prop], loc="upper right", fontsize=8)
    ax_ka.set_title("(b) message cost")

    fig.suptitle(f"failure detection: {first.get('nodes')} nodes, {first.get('failures')} crashes, "
                 f"seed {first.get('seed')}, loss {first.get('loss')}, churn {first.get('churn')}/s")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--failures", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--preset", default="lan", help="timers preset passed to the simulation (default lan)")
    ap.add_argument("--input", type=Path, help="read this JSON (from `sim failure --scheme all --json`) "
                    "instead of running the simulation")
    ap.add_argument("--out", type=Path, default=Path("docs/failure"),
                    help="output prefix: writes OUT.png and OUT.json")
    args = ap.parse_args(argv)
    if args.input is not None:
        result = json.loads(args.input.read_text())
    else:
        result = run_simulation(args.nodes, args.failures, args.seed, args.preset)
    out_json = args.out.with_name(args.out.name + ".json")
    out_png = args.out.with_name(args.out.name + ".png")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    if args.input is None or args.input.resolve() != out_json.resolve():
        out_json.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out_png)
    print(f"wrote {out_png} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
