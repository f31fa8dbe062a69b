"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed).

Three pictures answer the questions people ask of a VPR model: how recall grows with K
(:func:`plot_recall_curve`), what precision the loop-closure detector pays for its recall
(:func:`plot_pr_curve`), and what its hits and misses look like (:func:`plot_examples`: each row
a query and its top matches, framed green when correct and red when wrong).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from vpr_ros.datasets.images import read_rgb
from vpr_ros.localization.evaluation import LoopEvaluation

GREEN = "#1a9850"
RED = "#d73027"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a figure; the written path."""
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _pr_line(ax, ev: LoopEvaluation, prefix: str = "") -> None:
    """One PR curve, strictest threshold first, its AUC and R@100P in the legend."""
    order = np.argsort(-np.asarray(ev.thresholds), kind="stable")
    ax.plot(ev.recall[order], ev.precision[order], marker=".",
            label=f"{prefix}AUC {ev.auc:.3f}, R@100P {ev.recall_at_100_precision:.3f}")


def _pr_axes(ax) -> None:
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(True, alpha=0.3)


def plot_recall_curve(curves: Mapping[str, Mapping[int, float]], out: str | Path,
                      title: str = "Recall@K") -> Path:
    """One line per labelled result: Recall@K against K."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    for label, rec in curves.items():
        ks = sorted(rec)
        ax.plot(ks, [100 * rec[k] for k in ks], marker="o", label=label)
        for k in ks:
            ax.annotate(f"{100 * rec[k]:.1f}", (k, 100 * rec[k]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xlabel("K (top-K results)")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 105)
    ax.set_xscale("log")
    all_ks = sorted({k for rec in curves.values() for k in rec})
    ax.set_xticks(all_ks)
    ax.set_xticklabels([str(k) for k in all_ks])
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(plt, fig, out)


def plot_pr_curve(ev: LoopEvaluation, out: str | Path, title: str = "Loop closure") -> Path:
    """Precision against recall over the swept thresholds; R@100P and AUC in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 4.0), dpi=120)
    _pr_line(ax, ev)
    _pr_axes(ax)
    ax.set_title(f"{title} ({ev.num_positives} revisits, {ev.num_queries} frames)")
    ax.legend(loc="lower left", fontsize=8)
    return _save(plt, fig, out)


def plot_pr_curves(curves: Mapping[str, LoopEvaluation], out: str | Path,
                   title: str = "Loop closure") -> Path:
    """One PR curve per decision stage (single frame, + sequence, + calibration), R@100P and
    AUC in the legend."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    any_ev = None
    for name, ev in curves.items():
        any_ev = ev
        _pr_line(ax, ev, f"{name.replace('_', ' ')}: ")
    _pr_axes(ax)
    if any_ev is not None:
        ax.set_title(f"{title} ({any_ev.num_positives} revisits, {any_ev.num_queries} frames)",
                     fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    return _save(plt, fig, out)


def plot_examples(query_paths: Sequence[Path], database_paths: Sequence[Path],
                  ranked_ids: np.ndarray, positives: Sequence[np.ndarray], out: str | Path,
                  rows: int = 8, k: int = 4, title: str = "") -> Path:
    """A grid: each row one query (blue) and its top-k matches, green if correct, red if not.
    Queries are spread evenly over the set so the picture is not cherry-picked."""
    plt = _plt()
    n = len(query_paths)
    picks = np.unique(np.linspace(0, n - 1, min(rows, n)).round().astype(int))
    k = min(k, ranked_ids.shape[1])
    fig, axes = plt.subplots(len(picks), k + 1, figsize=(2.2 * (k + 1), 1.5 * len(picks) + 0.4),
                             dpi=110, squeeze=False)
    for r, q in enumerate(picks):
        cells = [(query_paths[q], "#2166ac", f"query {q}")]
        pos = set(np.asarray(positives[q]).tolist())
        for j in range(k):
            i = int(ranked_ids[q, j])
            if i < 0:
                cells.append((None, RED, "-"))
                continue
            cells.append((database_paths[i], GREEN if i in pos else RED, f"#{j + 1}: db {i}"))
        for c, (path, colour, label) in enumerate(cells):
            ax = axes[r, c]
            if path is not None:
                ax.imshow(read_rgb(path))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            ax.set_title(label, fontsize=7, color=colour)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(plt, fig, out)
