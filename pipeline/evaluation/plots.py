"""Small PNG charts for `sinkstream eval` and `sinkstream bench` (matplotlib, Agg backend, no display needed;
imported only when a chart is drawn).

Callers describe each chart as one or more `Panel`s of named series; `save_figure` lays them out side by side
and writes a compact PNG (about 30–80 KB). Nothing here knows about models or caches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Series = tuple[Sequence[float], Sequence[float]]


@dataclass
class Panel:
    """One axes: `series` maps a legend label to (x, y); NaN/None points are skipped."""

    title: str
    xlabel: str
    ylabel: str
    series: Mapping[str, Series]
    logx: bool = False
    logy: bool = False
    # Vertical reference lines: label -> x.
    vlines: Mapping[str, float] = field(default_factory=dict)
    # Horizontal reference lines: label -> y.
    hlines: Mapping[str, float] = field(default_factory=dict)
    markers: bool = True
    # Categorical x axis: tick labels in order (x values are then positions 0..n-1).
    xticks: Sequence[str] | None = None
    # Fixed colours per series label (e.g. the same run in two panels); others take the next default colour.
    colors: Mapping[str, str] = field(default_factory=dict)


def _clean(x: Sequence[float], y: Sequence[float]) -> tuple[list[float], list[float]]:
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and not math.isnan(float(b))]
    return [float(a) for a, _ in pairs], [float(b) for _, b in pairs]


def _draw(ax: Any, panel: Panel) -> None:
    for label, (x, y) in panel.series.items():
        xs, ys = _clean(x, y)
        if not xs:
            continue
        style = {"marker": "o", "markersize": 3.5} if panel.markers else {}
        if label in panel.colors:
            style["color"] = panel.colors[label]
        ax.plot(xs, ys, label=label, linewidth=1.4, **style)
    for k, (label, at_x) in enumerate(panel.vlines.items()):
        ax.axvline(at_x, linestyle="--", linewidth=0.9, color=f"C{7 + k % 3}", label=label)
    for k, (label, at_y) in enumerate(panel.hlines.items()):
        ax.axhline(at_y, linestyle=":", linewidth=0.9, color=f"C{7 + k % 3}", label=label)
    if panel.logx:
        ax.set_xscale("log", base=2)
    if panel.logy:
        ax.set_yscale("log")
    if panel.xticks is not None:
        ax.set_xticks(range(len(panel.xticks)), list(panel.xticks))
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if panel.series or panel.vlines or panel.hlines:
        ax.legend(fontsize=7.5)


def save_figure(path: Path, panels: Sequence[Panel], title: str = "") -> Path:
    """Draw `panels` side by side into a PNG at `path` (parent folders are created); return the path."""
    if not panels:
        raise ValueError("expected at least one panel, got none")
    # matplotlib belongs to the `eval`/`bench` extras: imported when a chart is drawn, so that importing the
    # command line (which registers `eval` and `bench`) works in the service image, which does not install it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.8), squeeze=False)
    try:
        for ax, panel in zip(axes[0], panels):
            _draw(ax, panel)
        if title:
            fig.suptitle(title, fontsize=10.5)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)
    return path
