"""Fusion and its tuning candidates: score-level fusion of two neighbour lists (global + ASMK)
and the grid of reranking fusion weights (global, ASMK, inliers), both tuned by the one
protocol (``how_met.recognition.protocol``)."""
from __future__ import annotations

from itertools import product
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..verify.scores import FusionWeights, ShortlistScores
from .knn import DEFAULT_KS, DEFAULT_TS, count_classes, neighbour_classes
from .protocol import Candidate, choose, cross_tune_candidates

def fuse_neighbours(indices_a, scores_a, indices_b, scores_b, weight: float, k: Optional[int] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """Score-level fusion: ``weight * score_a + (1 - weight) * score_b`` over the union of both
    lists of every query, re-sorted, top ``k`` kept (default: the longer list's length).

    A database image found in only one list has an unknown score in the other; it is given
    that list's lowest score for the query (an upper bound of its true score there), or 0
    when the other list is empty. Lists must not repeat an index within a row. Returns
    ``(indices int64, scores float32)`` padded with -1 / -inf like Neighbours.
    """
    ia = np.asarray(indices_a).astype(np.int64, copy=False)
    ib = np.asarray(indices_b).astype(np.int64, copy=False)
    sa = np.asarray(scores_a, dtype=np.float64)
    sb = np.asarray(scores_b, dtype=np.float64)
    if ia.shape != sa.shape or ib.shape != sb.shape or ia.ndim != 2 or ib.ndim != 2 or len(ia) != len(ib):
        raise ValueError(f"fusion needs two (nq, K) lists for the same queries, got {ia.shape} and {ib.shape}")
    k = max(ia.shape[1], ib.shape[1]) if k is None else int(k)
    valid_a = (ia >= 0) & (sa > -np.inf)
    valid_b = (ib >= 0) & (sb > -np.inf)
    # Padding scores are -inf; zero them so that weight 0 or 1 never computes 0 * -inf.
    sa, sb = np.where(valid_a, sa, 0.0), np.where(valid_b, sb, 0.0)

    def floor(s, valid):  # lowest listed score per query, 0 for an empty list
        lowest = np.where(valid, s, np.inf).min(axis=1, initial=np.inf)
        return np.where(np.isfinite(lowest), lowest, 0.0)

    floor_a, floor_b = floor(sa, valid_a), floor(sb, valid_b)
    nq = len(ia)
    idx = np.concatenate([np.where(valid_a, ia, -1), np.where(valid_b, ib, -1)], axis=1)
    # Each entry carries its score in both lists; the unknown one starts at the floor.
    own_a = np.concatenate([sa, np.repeat(floor_a[:, None], ib.shape[1], axis=1)], axis=1)
    own_b = np.concatenate([np.repeat(floor_b[:, None], ia.shape[1], axis=1), sb], axis=1)
    # Stable sort by database index: an image in both lists becomes an adjacent (a, b) pair.
    order = np.argsort(np.where(idx >= 0, idx, np.iinfo(np.int64).max), axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    own_a = np.take_along_axis(own_a, order, axis=1)
    own_b = np.take_along_axis(own_b, order, axis=1)
    pair = (idx[:, :-1] == idx[:, 1:]) & (idx[:, :-1] >= 0)
    own_b[:, :-1][pair] = own_b[:, 1:][pair]  # the a-entry takes the b-score of its twin
    keep = idx >= 0
    keep[:, 1:] &= ~pair  # drop the b twin
    fused = np.where(keep, weight * own_a + (1.0 - weight) * own_b, -np.inf)
    top = np.argsort(-fused, axis=1, kind="stable")[:, :k]
    out_scores = np.take_along_axis(fused, top, axis=1)
    out_idx = np.where(np.isfinite(out_scores), np.take_along_axis(idx, top, axis=1), -1)
    if out_idx.shape[1] < k:  # fewer candidates than k: pad
        pad = k - out_idx.shape[1]
        out_idx = np.concatenate([out_idx, np.full((nq, pad), -1, np.int64)], axis=1)
        out_scores = np.concatenate([out_scores, np.full((nq, pad), -np.inf)], axis=1)
    return out_idx, out_scores.astype(np.float32)


DEFAULT_WEIGHTS: Tuple[float, ...] = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


def fusion_candidates(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray], db_labels,
                      weights: Sequence[float] = DEFAULT_WEIGHTS, k: Optional[int] = None) -> List[Candidate]:
    """Tuning candidates of score-level fusion: per weight, the fused lists of a and b."""
    return [({"weight": float(w)}, neighbour_classes(*fuse_neighbours(a[0], a[1], b[0], b[1], w, k), db_labels))
            for w in weights]


def tune_fusion(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray], db_labels, query_labels,
                n_classes: Optional[int] = None, weights: Sequence[float] = DEFAULT_WEIGHTS,
                Ks: Sequence[int] = DEFAULT_KS, ts: Sequence[float] = DEFAULT_TS, k: Optional[int] = None
                ) -> Tuple[Tuple[float, int, float], np.ndarray]:
    """Tune the fusion weight of list ``a`` = (indices, scores) against ``b`` jointly with
    (K, t) by GAP. Returns ``((weight, K, t), grid)`` with grid shape (len(weights), len(Ks), len(ts))."""
    n_classes = count_classes(db_labels) if n_classes is None else int(n_classes)
    choice = choose(fusion_candidates(a, b, db_labels, weights, k), query_labels, n_classes, Ks=Ks, ts=ts)
    return (choice.params["weight"], choice.K, choice.t), choice.grids


def cross_tune_fusion(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray], db_labels, query_labels,
                      n_classes: Optional[int] = None, weights: Sequence[float] = DEFAULT_WEIGHTS,
                      Ks: Sequence[int] = DEFAULT_KS, ts: Sequence[float] = DEFAULT_TS,
                      folds: int = 2, seed: int = 0, k: Optional[int] = None) -> dict:
    """``cross_tune`` for score-level fusion: (weight, K, t) tuned together on the tuning
    folds; each per-fold entry also has "weight", and its "grid" is (weights, Ks, ts)."""
    n_classes = count_classes(db_labels) if n_classes is None else int(n_classes)
    return cross_tune_candidates(fusion_candidates(a, b, db_labels, weights, k), query_labels, n_classes,
                                 Ks, ts, folds, seed)


DEFAULT_FUSION_GRID: Dict[str, Tuple[float, ...]] = {
    "global_weight": (0.0, 0.5, 1.0),
    "asmk_weight": (0.0, 0.5, 1.0, 2.0),
    "inlier_weight": (0.0, 0.25, 0.5, 1.0, 2.0),
    "inlier_half": (5.0, 10.0, 20.0),
}


def fusion_grid(grid: Optional[Dict[str, Sequence[float]]] = None, min_inliers: int = 4) -> List[FusionWeights]:
    """Every FusionWeights of the grid (DEFAULT_FUSION_GRID where a field is not given), without
    the all-zero point and without inlier_half variants that cannot matter (inlier_weight 0)."""
    spec = dict(DEFAULT_FUSION_GRID, **(grid or {}))
    unknown = set(spec) - set(DEFAULT_FUSION_GRID)
    if unknown:
        raise ValueError(f"unknown fusion grid fields {sorted(unknown)}")
    out = []
    for g, a, i, h in product(spec["global_weight"], spec["asmk_weight"], spec["inlier_weight"],
                              spec["inlier_half"]):
        if g == a == i == 0 or (i == 0 and h != spec["inlier_half"][0]):
            continue
        out.append(FusionWeights(float(g), float(a), float(i), float(h), min_inliers))
    return out


def rerank_weightings(settings: dict) -> List[FusionWeights]:
    """The fusion weightings global+rerank is tuned over: the whole grid for a run with
    ``rerank_weights`` "tuned", else only the fixed default (README "Choosing the defaults")."""
    return fusion_grid() if settings.get("rerank_weights") == "tuned" else [FusionWeights()]


def tune_fusion_weights(scores: ShortlistScores, db_labels=None, query_labels=None,
                        objective: Optional[Callable[..., float]] = None,
                        grid: Optional[Dict[str, Sequence[float]]] = None, n_classes: Optional[int] = None,
                        min_inliers: int = 4) -> dict:
    """Grid-search the rerank fusion weights on validation queries.

    With ``db_labels`` (class of every database image) and ``query_labels`` (-1 = distractor),
    weights, K and t are chosen together by the kNN classifier's GAP (``protocol.choose``).
    Otherwise ``objective`` (a callable taking the fused ``Neighbours`` and returning a value to
    maximise) scores each grid point. Returns ``{"weights": FusionWeights, "value": best
    objective, "K", "t" (kNN only), "grid": [(weights dict, value), ...]}``; the first best
    grid point wins.
    """
    weights = fusion_grid(grid, min_inliers)
    if objective is not None:
        values = [float(objective(scores.fuse(w))) for w in weights]
        best = int(np.argmax(values))
        return {"weights": weights[best], "value": values[best],
                "grid": [(w.as_dict(), v) for w, v in zip(weights, values)]}
    if db_labels is None or query_labels is None:
        raise ValueError("tune_fusion_weights needs db_labels and query_labels, or an objective")
    n_classes = count_classes(db_labels) if n_classes is None else int(n_classes)
    candidates = [(w.as_dict(), neighbour_classes(scores.indices, scores.fused(w), db_labels)) for w in weights]
    choice = choose(candidates, query_labels, n_classes)
    values = choice.grids.max(axis=(1, 2))
    return {"weights": weights[choice.candidate], "value": choice.value, "K": choice.K, "t": choice.t,
            "grid": [(w.as_dict(), float(v)) for w, v in zip(weights, values)]}
