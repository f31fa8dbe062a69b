"""A picture of a map: where its keyframes are, one colour per session.

The quickest check that a map build did what was meant: the route's shape, whether two runs
overlap (they must, for relocalisation), and where keyframes are sparse. Maps with poses are
drawn as trajectories in their map frame; stamps-only maps as keyframe id against time, which
still shows gaps and each session's keyframe rate. Uses matplotlib's Agg canvas directly (no
pyplot), so it works headless and never touches a caller's backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vpr_ros.errors import InputError, MapError


def plot_map(place_map: Any, out: str | Path, title: str | None = None,
             dpi: int = 120) -> Path:
    """Render ``place_map`` (a PlaceMap) to the PNG file ``out``; returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"plot output {out} must be a .png file")
    if len(place_map) == 0:
        raise MapError("the map has no keyframes; there is nothing to plot")
    table = place_map.keyframe_table
    sessions = np.asarray(table.text_column("session"))
    positions = table.positions
    stamps = table.stamps
    posed = ~np.isnan(positions[:, 0])
    fig = Figure(figsize=(8, 6.5), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i % 10}" for i in range(len(place_map.sessions()))]
    header = title or (f"{len(place_map)} keyframes, {len(place_map.sessions())} session(s), "
                       f"{place_map.dim}-D, model {place_map.fingerprint[:12]}")
    if posed.any():
        _trajectories(ax, place_map.sessions(), sessions, positions, posed, colours)
        unposed = int((~posed).sum())
        if unposed:
            header += f"\n({unposed} keyframes without pose not shown)"
    else:
        _timeline(ax, place_map.sessions(), sessions, stamps, colours)
    ax.set_title(header, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _trajectories(ax: Any, names: list[str], sessions: np.ndarray, positions: np.ndarray,
                  posed: np.ndarray, colours: list[str]) -> None:
    for name, colour in zip(names, colours):
        rows = np.flatnonzero((sessions == name) & posed)
        if rows.size == 0:
            continue
        xy = positions[rows, :2]
        ax.plot(xy[:, 0], xy[:, 1], "-", color=colour, linewidth=1.0, alpha=0.7)
        ax.plot(xy[:, 0], xy[:, 1], "o", color=colour, markersize=3,
                label=f"{name} ({rows.size} keyframes)")
        ax.plot(xy[0, 0], xy[0, 1], "^", color=colour, markersize=9, markeredgecolor="k")
        ax.plot(xy[-1, 0], xy[-1, 1], "s", color=colour, markersize=7, markeredgecolor="k")
    ax.set_xlabel("x [m]  (triangle: start, square: end)")
    ax.set_ylabel("y [m]")
    ax.set_aspect("equal", adjustable="datalim")


def _timeline(ax: Any, names: list[str], sessions: np.ndarray, stamps: np.ndarray,
              colours: list[str]) -> None:
    for name, colour in zip(names, colours):
        rows = np.flatnonzero(sessions == name)
        t = (stamps[rows] - stamps[rows].min()) * 1e-9
        ax.plot(t, rows, "o-", color=colour, markersize=3, linewidth=0.8,
                label=f"{name} ({rows.size} keyframes, no poses)")
    ax.set_xlabel("time since session start [s]")
    ax.set_ylabel("keyframe id")
