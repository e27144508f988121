"""Figures of the report (PNG, matplotlib's Agg renderer, no pyplot): the tuning heatmap over
K x t and the precision curves of the methods."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..utils import atomic_path

def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot, no global backend change
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


FIGURE_DPI = 150  # saved at 1.5x the size shown, so figures stay sharp on high-density screens


def _save_figure(figure, path: Path) -> Tuple[int, int]:
    """Save as PNG; return the CSS pixel size to show it at."""
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=FIGURE_DPI)
    with Image.open(path) as img:
        width, height = img.size
    return round(width * 100 / FIGURE_DPI), round(height * 100 / FIGURE_DPI)


def _per_fold_values(value) -> List[float]:
    """K or t as chosen per fold: a number, a list, or evaluate's "7/2" string -> [numbers]."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).split("/")
    try:
        return [float(item) for item in items]
    except (TypeError, ValueError):
        return []


def plot_tuning(method: str, tuning: dict, chosen: dict, path: Path,
                value_range: Optional[Tuple[float, float]] = None) -> Tuple[int, int]:
    """Heatmap of tuning GAP over the K x t grid, the chosen cell (one per fold) outlined.

    ``value_range`` fixes the colour scale, so the heatmaps of several methods compare.
    """
    from matplotlib.patches import Rectangle

    ks, ts = list(tuning.get("K", [])), list(tuning.get("t", []))
    gap = np.asarray(tuning.get("GAP", []), dtype=np.float64)
    if gap.shape != (len(ks), len(ts)) or gap.size == 0:
        raise ValueError(f"tuning of {method}: GAP grid has shape {gap.shape}, expected "
                         f"{len(ks)} x {len(ts)}")
    figure = _new_figure(max(3.0, 0.25 * len(ts) + 0.85), max(2.0, 0.2 * len(ks) + 1.0))
    axes = figure.subplots()
    if value_range is None:
        finite = gap[np.isfinite(gap)]
        value_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    low, high = value_range
    image = axes.imshow(gap, cmap="viridis", vmin=low, vmax=max(high, low + 1e-9),
                        aspect="auto", interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, pad=0.01)
    colorbar.ax.tick_params(labelsize=6)
    colorbar.set_label("GAP (%)", fontsize=7)
    axes.set_xticks(range(len(ts)), [f"{t:g}" for t in ts], fontsize=6, rotation=90)
    axes.set_yticks(range(len(ks)), [f"{k:g}" if isinstance(k, float) else str(k) for k in ks],
                    fontsize=6)
    axes.set_xlabel("t (temperature)", fontsize=7)
    axes.set_ylabel("K (neighbours)", fontsize=7)
    if gap.size <= 160:
        middle = (low + high) / 2
        for i in range(len(ks)):
            for j in range(len(ts)):
                if np.isfinite(gap[i, j]):
                    axes.text(j, i, f"{gap[i, j]:.0f}", ha="center", va="center", fontsize=5,
                              color="black" if gap[i, j] > middle else "white")
    chosen_ks, chosen_ts = _per_fold_values(chosen.get("K")), _per_fold_values(chosen.get("t"))
    if len(chosen_ks) == 1 and len(chosen_ts) > 1:
        chosen_ks = chosen_ks * len(chosen_ts)
    if len(chosen_ts) == 1 and len(chosen_ks) > 1:
        chosen_ts = chosen_ts * len(chosen_ks)
    grid_ks, grid_ts = [float(k) for k in ks], [float(t) for t in ts]
    marked = []
    for k, t in zip(chosen_ks, chosen_ts):
        if k in grid_ks and t in grid_ts:
            i, j = grid_ks.index(k), grid_ts.index(t)
            axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#e4003a",
                                     linewidth=2.0))
            marked.append(f"K={k:g}, t={t:g}")
    title = method
    if marked:
        title += ": chosen " + ("; ".join(dict.fromkeys(marked)))
    axes.set_title(title, fontsize=8)
    return _save_figure(figure, path)


def _log_odds(prediction: dict) -> float:
    if "log_odds" not in prediction:  # files written before log-odds were stored
        return float(prediction.get("conf", 0.0))
    value = prediction["log_odds"]
    return float("-inf") if value is None else float(value)


def precision_curve(predictions: Sequence[dict]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, precision, recall) after each query, queries sorted by log-odds (by
    confidence in files without them).

    Precision counts distractors as wrong; recall is over the non-distractor queries, so the
    area under precision-recall is the GAP.
    """
    # ranked by log-odds where the file has them (the confidence saturates at 1.0 in float64,
    # which would tie the most confident queries), as the evaluation's GAP ranks them
    rank_by = np.array([_log_odds(p) for p in predictions], dtype=np.float64)
    conf = np.array([float(p.get("conf", 0.0)) for p in predictions], dtype=np.float64)
    correct = np.array([bool(p.get("correct")) and int(p.get("label", -1)) >= 0
                        for p in predictions])
    n_met = max(1, sum(int(p.get("label", -1)) >= 0 for p in predictions))
    order = np.argsort(-rank_by, kind="stable")
    hits = np.cumsum(correct[order])
    ranks = np.arange(1, len(order) + 1)
    return conf[order], hits / ranks, hits / n_met


def plot_precision(curves: Dict[str, Sequence[dict]], gaps: Dict[str, Optional[float]],
                   path: Path) -> Tuple[int, int]:
    """Precision versus confidence threshold, and precision versus recall, one line per method."""
    figure = _new_figure(10.5, 3.0)
    by_conf, by_recall = figure.subplots(1, 2)
    for method, predictions in curves.items():
        if not predictions:
            continue
        conf, precision, recall = precision_curve(predictions)
        gap = gaps.get(method)
        label = method if gap is None else f"{method} (GAP {gap:.1f})"
        line, = by_conf.plot(conf, precision, drawstyle="steps-post", linewidth=1.6, label=label)
        by_recall.plot(np.concatenate([[0.0], recall]), np.concatenate([[precision[0]], precision]),
                       drawstyle="steps-pre", linewidth=1.6, color=line.get_color(), label=label)
    by_conf.set_xlabel("confidence threshold (queries with confidence >= x)")
    by_conf.set_ylabel("precision (distractors count as wrong)")
    by_conf.set_xlim(1.02, -0.02)
    by_recall.set_xlabel("recall of exhibit queries")
    by_recall.set_ylabel("precision")
    by_recall.set_xlim(-0.02, 1.02)
    for axes in (by_conf, by_recall):
        axes.set_ylim(-0.02, 1.05)
        axes.grid(alpha=0.3)
    by_conf.set_title("precision above a confidence threshold", fontsize=10)
    by_recall.set_title("precision-recall (area = GAP)", fontsize=10)
    if by_conf.lines:
        figure.legend(handles=by_conf.lines, loc="outside right upper", fontsize=8, frameon=False)
    for axes in (by_conf, by_recall):
        axes.tick_params(labelsize=7)
        axes.xaxis.label.set_size(8)
        axes.yaxis.label.set_size(8)
    return _save_figure(figure, path)

