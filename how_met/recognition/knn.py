"""kNN classifier of the Met protocol (SPEC section 4) and its GAP over a (K, t) grid.

Inputs are neighbour lists in the form of ``how_met.neighbours.Neighbours``: ``indices``
(nq, K_max) int64 into the database (-1 = padding) and ``scores`` (nq, K_max) similarities
(-inf = padding), normally sorted descending; plus ``db_labels`` (n_db,) int64, the class of
every database image, and ``n_classes``, the number of distinct database classes (default:
counted from ``db_labels``).

For a query and a K: take its K best neighbours; for every class among them keep the maximum
similarity s_c; the confidence of class c is

    exp(t s_c) / (sum_{c' among the neighbours} exp(t s_c') + (n - m))

with n = ``n_classes`` and m the number of distinct classes among the K neighbours (each of the
other n - m classes contributes exp(0) = 1). The prediction is the class with the largest s_c
(equivalently the largest confidence, t > 0); its confidence is the query's score.

Numerics: everything is computed as the log-odds of the predicted class,
``log(conf / (1 - conf)) = t s_top - log(sum_{c != top} exp(t s_c) + (n - m))``, with a
log-sum-exp, so t = 500 with similarities near 1 neither overflows nor saturates: confidences
above 1 - 1e-16 are all 1.0 in float64, but their log-odds stay distinct, so queries are ranked
by log-odds (the same order as the exact confidences). A query without any neighbour
predicts -1 with confidence 0 (log-odds -inf) and is ranked last.

Ties: neighbours with equal scores keep their input order; classes tied for the top score are
resolved in favour of the one listed first; in the (K, t) grid the first best point in
row-major order (smallest K, then smallest t) wins. Metrics are fractions (see metrics.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .metrics import DISTRACTOR, evaluate_predictions, gap_batch

logger = logging.getLogger("how_met.knn")

DEFAULT_KS: Tuple[int, ...] = (1, 2, 3, 5, 7, 10, 15, 20, 50)
DEFAULT_TS: Tuple[float, ...] = (0.01, 0.1, 1, 5, 10, 15, 20, 25, 30, 50, 100, 500)

# Bound on the (T, chunk, K-1) float64 work array: ~32 MB.
_MAX_WORK_ELEMENTS = 4_000_000


@dataclass
class KnnPredictions:
    """Per query: predicted class (-1 = no neighbour), confidence in [0, 1], and log-odds
    (log(conf / (1 - conf)); rank by these -- they do not saturate)."""

    labels: np.ndarray
    confidence: np.ndarray
    log_odds: np.ndarray


@dataclass
class NeighbourClasses:
    """Neighbour lists reduced to classes: row-wise sorted by score (descending, stable);
    ``scores`` keeps a neighbour's score only where it is the first (= best) neighbour of its
    class in the row, -inf elsewhere and for padding."""

    labels: np.ndarray  # (nq, K_max) int64, class of each neighbour (-1 padding)
    scores: np.ndarray  # (nq, K_max) float64, class-max score at first occurrences, else -inf

    def subset(self, rows: np.ndarray) -> "NeighbourClasses":
        return NeighbourClasses(self.labels[rows], self.scores[rows])


def count_classes(db_labels) -> int:
    """Number of distinct database classes (the n of the confidence formula)."""
    return int(len(np.unique(np.asarray(db_labels))))


def _first_occurrence(labels: np.ndarray) -> np.ndarray:
    """(nq, K) bool: True where a label appears for the first time in its row."""
    order = np.argsort(labels, axis=1, kind="stable")
    sorted_labels = np.take_along_axis(labels, order, axis=1)
    first_sorted = np.ones(labels.shape, dtype=bool)
    first_sorted[:, 1:] = sorted_labels[:, 1:] != sorted_labels[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    return first


def neighbour_classes(indices, scores, db_labels) -> NeighbourClasses:
    indices = np.asarray(indices)
    scores = np.asarray(scores, dtype=np.float64)
    db_labels = np.asarray(db_labels).astype(np.int64, copy=False)
    if indices.ndim != 2 or indices.shape != scores.shape:
        raise ValueError(f"indices {indices.shape} and scores {scores.shape} must be equal (nq, K) arrays")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    indices = indices.astype(np.int64, copy=False)
    if (db_labels < 0).any():
        raise ValueError("db_labels must be non-negative class ids")
    if indices.size and indices.max(initial=-1) >= len(db_labels):
        raise ValueError(f"neighbour index {int(indices.max())} out of range for {len(db_labels)} database images")
    valid = (indices >= 0) & (scores > -np.inf)
    if np.isnan(scores[valid]).any() or np.isposinf(scores[valid]).any():
        raise ValueError("neighbour scores contain NaN or +inf")
    labels = np.where(valid, db_labels[np.maximum(indices, 0)], -1)
    row_scores = np.where(valid, scores, -np.inf)
    # Sort each row by score so that "the first K" are the K best and the first neighbour
    # of a class carries the class maximum (lists from Neighbours are sorted already).
    order = np.argsort(-row_scores, axis=1, kind="stable")
    labels = np.take_along_axis(labels, order, axis=1)
    row_scores = np.take_along_axis(row_scores, order, axis=1)
    valid = np.take_along_axis(valid, order, axis=1)
    first = _first_occurrence(labels) & valid
    return NeighbourClasses(labels, np.where(first, row_scores, -np.inf))


def check_ts(ts) -> np.ndarray:
    ts = np.atleast_1d(np.asarray(ts, dtype=np.float64))
    if ts.ndim != 1 or not (ts > 0).all() or not np.isfinite(ts).all():
        raise ValueError(f"temperatures t must be positive and finite, got {ts.tolist()}")
    return ts


def predict_log_odds(classes: NeighbourClasses, K: int, ts: np.ndarray, n_classes: int
               ) -> Tuple[np.ndarray, np.ndarray]:
    """Predictions (nq,) and log-odds (T, nq) for one K and every t at once."""
    K = max(1, min(int(K), classes.scores.shape[1])) if classes.scores.shape[1] else 0
    nq = classes.scores.shape[0]
    if K == 0:  # no neighbours at all
        return np.full(nq, -1, np.int64), np.full((len(ts), nq), -np.inf)
    class_scores = classes.scores[:, :K]
    top = class_scores[:, 0]  # sorted rows: the best neighbour is the top class (or padding)
    pred = np.where(np.isfinite(top), classes.labels[:, 0], -1)
    distinct = np.isfinite(class_scores).sum(axis=1)
    if distinct.max(initial=0) > n_classes:
        raise ValueError(f"n_classes={n_classes} is smaller than the {int(distinct.max())} classes among one query's neighbours")
    rest = (n_classes - distinct).astype(np.float64)
    with np.errstate(divide="ignore"):
        log_rest = np.log(rest)  # -inf when every class is among the neighbours
    others = class_scores[:, 1:]
    log_odds = np.empty((len(ts), nq))
    chunk = max(1, _MAX_WORK_ELEMENTS // max(1, len(ts) * max(1, K - 1)))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for start in range(0, nq, chunk):
            rows = slice(start, start + chunk)
            scaled = ts[:, None, None] * others[None, rows, :]  # (T, c, K-1); -inf stays -inf
            shift = log_rest[None, rows]
            if K > 1:
                shift = np.maximum(scaled.max(axis=2), shift)
            shift = np.where(np.isfinite(shift), shift, 0.0)
            total = np.exp(scaled - shift[..., None]).sum(axis=2) + np.exp(log_rest[None, rows] - shift)
            log_other = np.log(total) + shift  # log(sum over the other classes), -inf if none
            log_odds[:, rows] = ts[:, None] * top[None, rows] - log_other
    log_odds[:, ~np.isfinite(top)] = -np.inf
    return pred, log_odds


def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        positive = x >= 0
        out = np.empty_like(x, dtype=np.float64)
        out[positive] = 1.0 / (1.0 + np.exp(-x[positive]))
        ex = np.exp(x[~positive])
        out[~positive] = ex / (1.0 + ex)
    return out


def knn_predict(indices, scores, db_labels, K: int, t: float, n_classes: Optional[int] = None) -> KnnPredictions:
    """Classify every query from its neighbour list with the (K, t) kNN rule."""
    n_classes = count_classes(db_labels) if n_classes is None else int(n_classes)
    classes = neighbour_classes(indices, scores, db_labels)
    pred, log_odds = predict_log_odds(classes, K, check_ts([t]), n_classes)
    return KnnPredictions(pred, sigmoid(log_odds[0]), log_odds[0])


def evaluate_knn(indices, scores, db_labels, query_labels, K: int, t: float,
                 n_classes: Optional[int] = None) -> Dict[str, float]:
    """``{"GAP", "GAP-", "ACC", "K", "t"}`` (fractions) of the kNN rule at a fixed (K, t)."""
    p = knn_predict(indices, scores, db_labels, K, t, n_classes)
    return {**evaluate_predictions(p.labels, p.log_odds, query_labels), "K": int(K), "t": float(t)}


def gap_grid(classes: NeighbourClasses, query_labels: np.ndarray, n_classes: int,
              Ks: Sequence[int], ts: np.ndarray) -> np.ndarray:
    grid = np.empty((len(Ks), len(ts)))
    for i, K in enumerate(Ks):  # the class maxima are shared by every t of one K
        pred, log_odds = predict_log_odds(classes, K, ts, n_classes)
        grid[i] = gap_batch(np.broadcast_to(pred, log_odds.shape), log_odds, query_labels)
    return grid


def check_grid(query_labels, n_queries: int, Ks, ts, k_max: int):
    query_labels = np.asarray(query_labels).astype(np.int64, copy=False).ravel()
    if len(query_labels) != n_queries:
        raise ValueError(f"{len(query_labels)} query labels for {n_queries} neighbour lists")
    if not (query_labels != DISTRACTOR).any():
        raise ValueError("cannot tune on queries that are all distractors (GAP is undefined)")
    Ks = [int(K) for K in Ks]
    if not Ks or min(Ks) < 1:
        raise ValueError(f"K values must be >= 1, got {Ks}")
    if max(Ks) > k_max:
        logger.warning("K up to %d requested but the neighbour lists hold %d; larger K act as K=%d",
                       max(Ks), k_max, k_max)
    return query_labels, Ks, check_ts(ts)

