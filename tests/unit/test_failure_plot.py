"""benchmarks/failure_plot.py draws its two panels from a result dict (no simulation here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "failure_plot.py"


def _load():
    spec = importlib.util.spec_from_file_location("failure_plot", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _scheme(name: str, delays: list[float], keepalive: float, prop: float) -> dict:
    return {"scheme": name, "nodes": 20, "failures": len(delays), "seed": 1, "loss": 0.0, "churn": 0.0,
            "detection_delays_s": delays, "detection_delay_median_s": delays[len(delays) // 2],
            "detection_delay_p99_s": delays[-1], "undetected_failures": 0,
            "keepalive_msgs_per_node_s": keepalive, "propagation_msgs_per_failure": prop}


def test_plot_writes_a_png(tmp_path: Path) -> None:
    mod = _load()
    result = {"schemes": [_scheme("stateless", [1.9, 2.1, 2.4], 1.1, 60.0),
                          _scheme("stateful", [1.8, 2.0, 2.2], 2.3, 30.0),
                          _scheme("stabilize", [1.7, 2.0, 2.5], 20.0, 0.0)]}
    png = mod.plot(result, tmp_path / "out" / "failure.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reads_json_and_writes_both_files(tmp_path: Path) -> None:
    mod = _load()
    src = tmp_path / "in.json"
    src.write_text(json.dumps(_scheme("stateless", [0.5, 1.0], 1.0, 10.0)))  # a single-scheme result
    assert mod.main(["--input", str(src), "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "f.json").read_text())["scheme"] == "stateless"
