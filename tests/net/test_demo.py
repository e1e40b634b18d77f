"""`mlfabric demo`, the main job, end to end: 8 real daemons train digits, one aggregator is SIGKILLed
mid-round, the job goes on, and the final accuracy is within 1 point of a failure-free run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mlfabric.runtime.cluster import cluster_down

pytestmark = [pytest.mark.net, pytest.mark.slow]


def test_demo_trains_through_an_aggregator_kill(tmp_path) -> None:
    plot = tmp_path / "demo.png"
    try:
        done = subprocess.run([sys.executable, "-m", "mlfabric", "demo", "--workdir", str(tmp_path / "wd"),
                               "--plot", str(plot)], capture_output=True, text=True, timeout=280, check=False)
    except subprocess.TimeoutExpired:
        # The demo was killed: its daemons (own sessions) would outlive it. Stop both clusters.
        for run in ("run-failure", "run-reference"):
            if (tmp_path / "wd" / run).exists():
                cluster_down(tmp_path / "wd" / run, timeout=5.0)
        raise
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert out.rstrip().endswith("OK")
    assert "SIGKILL node" in out and "during round" in out
    summary = json.loads((tmp_path / "wd" / "demo-summary.json").read_text())
    assert summary["killed"] is not None
    assert abs(summary["difference_pp"]) <= 1.0
    assert len(summary["accuracy"]) == summary["rounds"] == len(summary["reference"])
    assert summary["final_accuracy"] >= 0.95 and summary["reference_accuracy"] >= 0.95
    killed = summary["killed"]["id"]
    assert any(f["node"] == killed for f in summary["failures"]), "the job noticed the kill"
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
