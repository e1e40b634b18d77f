"""Accuracy-per-round figures for federated runs, with the reference run and the failures marked.

Used by the demo and benchmarks to show at a glance whether killing nodes mid-training cost
accuracy. matplotlib is imported inside the function (it is a dev extra, and slow to import) and
drives the Agg canvas directly, with no pyplot and so no global figure state: safe from any thread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["plot_accuracy"]


def plot_accuracy(
    path_png: str | os.PathLike[str],
    rounds: Sequence[int],
    acc: Sequence[float],
    reference: Sequence[float] | None,
    failure_rounds: Sequence[float],
    title: str,
) -> Path:
    """Write a PNG of test accuracy per round; ``reference`` (same rounds) as a dashed second line,
    and a labelled vertical marker at each entry of ``failure_rounds`` (fractional rounds allowed).
    Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(rounds) != len(acc):
        raise ValueError(f"{len(rounds)} rounds but {len(acc)} accuracies")
    if reference is not None and len(reference) != len(rounds):
        raise ValueError(f"{len(rounds)} rounds but {len(reference)} reference accuracies")

    fig = Figure(figsize=(7.0, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(rounds, acc, marker="o", markersize=3, linewidth=1.8, color="tab:blue", label="this run")
    if reference is not None:
        ax.plot(rounds, reference, linestyle="--", linewidth=1.4, color="tab:gray", label="reference (no failures)")
    for i, at in enumerate(failure_rounds):
        ax.axvline(at, color="tab:red", linestyle=":", linewidth=1.2, label="failure" if i == 0 else None)
        ax.annotate(
            f"failure @ {at:g}",
            xy=(at, 0.02),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=8,
            color="tab:red",
            ha="right",
            va="bottom",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(path_png)
    fig.savefig(out, format="png")
    return out
