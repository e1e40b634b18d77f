"""learn/plot.py: an accuracy-per-round PNG with a reference line and failure markers."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from mlfabric.learn.plot import plot_accuracy  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png_with_reference_and_failures(tmp_path: Path) -> None:
    rounds = list(range(1, 11))
    acc = [0.2, 0.5, 0.7, 0.8, 0.75, 0.85, 0.9, 0.93, 0.95, 0.96]
    ref = [0.2, 0.55, 0.72, 0.83, 0.88, 0.9, 0.92, 0.94, 0.96, 0.97]
    out = plot_accuracy(tmp_path / "acc.png", rounds, acc, ref, [4.5, 7.0], "digits, 8 nodes, 2 killed")
    assert out == tmp_path / "acc.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_plot_without_reference_or_failures(tmp_path: Path) -> None:
    out = plot_accuracy(str(tmp_path / "a.png"), [1, 2], [0.5, 0.6], None, [], "t")
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_plot_refuses_mismatched_lengths(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_accuracy(tmp_path / "a.png", [1, 2], [0.5], None, [], "t")
    with pytest.raises(ValueError):
        plot_accuracy(tmp_path / "a.png", [1, 2], [0.5, 0.6], [0.5], [], "t")
    assert not (tmp_path / "a.png").exists()
