"""kNN classifier of the Met protocol (SPEC section 4), its (K, t) tuning and cross-tuning.

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
from typing import Dict, List, Optional, Sequence, Tuple

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
class _NeighbourClasses:
    """Neighbour lists reduced to classes: row-wise sorted by score (descending, stable);
    ``scores`` keeps a neighbour's score only where it is the first (= best) neighbour of its
    class in the row, -inf elsewhere and for padding."""

    labels: np.ndarray  # (nq, K_max) int64, class of each neighbour (-1 padding)
    scores: np.ndarray  # (nq, K_max) float64, class-max score at first occurrences, else -inf

    def subset(self, rows: np.ndarray) -> "_NeighbourClasses":
        return _NeighbourClasses(self.labels[rows], self.scores[rows])


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


def _neighbour_classes(indices, scores, db_labels) -> _NeighbourClasses:
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
    return _NeighbourClasses(labels, np.where(first, row_scores, -np.inf))


def _check_ts(ts) -> np.ndarray:
    ts = np.atleast_1d(np.asarray(ts, dtype=np.float64))
    if ts.ndim != 1 or not (ts > 0).all() or not np.isfinite(ts).all():
        raise ValueError(f"temperatures t must be positive and finite, got {ts.tolist()}")
    return ts


def _predict_K(classes: _NeighbourClasses, K: int, ts: np.ndarray, n_classes: int
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


def _sigmoid(x: np.ndarray) -> np.ndarray:
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
    classes = _neighbour_classes(indices, scores, db_labels)
    pred, log_odds = _predict_K(classes, K, _check_ts([t]), n_classes)
    return KnnPredictions(pred, _sigmoid(log_odds[0]), log_odds[0])


def evaluate_knn(indices, scores, db_labels, query_labels, K: int, t: float,
                 n_classes: Optional[int] = None) -> Dict[str, float]:
    """``{"GAP", "GAP-", "ACC", "K", "t"}`` (fractions) of the kNN rule at a fixed (K, t)."""
    p = knn_predict(indices, scores, db_labels, K, t, n_classes)
    return {**evaluate_predictions(p.labels, p.log_odds, query_labels), "K": int(K), "t": float(t)}


def _gap_grid(classes: _NeighbourClasses, query_labels: np.ndarray, n_classes: int,
              Ks: Sequence[int], ts: np.ndarray) -> np.ndarray:
    grid = np.empty((len(Ks), len(ts)))
    for i, K in enumerate(Ks):  # the class maxima are shared by every t of one K
        pred, log_odds = _predict_K(classes, K, ts, n_classes)
        grid[i] = gap_batch(np.broadcast_to(pred, log_odds.shape), log_odds, query_labels)
    return grid


def _check_grid(query_labels, n_queries: int, Ks, ts, k_max: int):
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
    return query_labels, Ks, _check_ts(ts)


def tune(indices, scores, db_labels, query_labels, n_classes: Optional[int] = None,
         Ks: Sequence[int] = DEFAULT_KS, ts: Sequence[float] = DEFAULT_TS
         ) -> Tuple[Tuple[int, float], np.ndarray]:
    """Choose (K, t) by GAP over the full grid.

    Returns ``((K, t), grid)`` with ``grid[i, j]`` the GAP (fraction) at ``Ks[i]``, ``ts[j]``.
    The first maximum in row-major order wins (smallest K, then smallest t).
    """
    n_classes = count_classes(db_labels) if n_classes is None else int(n_classes)
    classes = _neighbour_classes(indices, scores, db_labels)
    query_labels, Ks, ts_arr = _check_grid(query_labels, len(classes.labels), Ks, ts, classes.labels.shape[1])
    grid = _gap_grid(classes, query_labels, n_classes, Ks, ts_arr)
    i, j = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return (Ks[i], float(ts_arr[j])), grid


def split_folds(query_labels, folds: int = 2, seed: int = 0) -> List[np.ndarray]:
    """Split query positions into ``folds`` disjoint sorted index arrays, stratified so that
    distractors and non-distractors are dealt evenly (each fold gets both when there are at
    least ``folds`` of each). Deterministic for a seed."""
    query_labels = np.asarray(query_labels).astype(np.int64, copy=False).ravel()
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    rng = np.random.default_rng(seed)
    members: List[List[np.ndarray]] = [[] for _ in range(folds)]
    offset = 0
    for stratum in (np.flatnonzero(query_labels != DISTRACTOR), np.flatnonzero(query_labels == DISTRACTOR)):
        if stratum.size == 0:
            continue
        shuffled = rng.permutation(stratum)
        # Round-robin dealing, continuing where the previous stratum stopped, keeps fold sizes
        # within one of each other.
        slot = (np.arange(len(shuffled)) + offset) % folds
        for f in range(folds):
            members[f].append(shuffled[slot == f])
        offset = (offset + len(shuffled)) % folds
    n_real = int(np.count_nonzero(query_labels != DISTRACTOR))
    if n_real < folds:
        raise ValueError(f"{n_real} non-distractor queries cannot be split into {folds} folds")
    return [np.sort(np.concatenate(parts)) for parts in members]


def _cross_tune(candidates: List[Tuple[dict, _NeighbourClasses]], query_labels, n_classes: int,
                Ks, ts, folds: int, seed: int) -> dict:
    """Tune (candidate, K, t) on all folds but one, test on that one; average the metrics."""
    nq = len(candidates[0][1].labels)
    query_labels, Ks, ts_arr = _check_grid(query_labels, nq, Ks, ts, candidates[0][1].labels.shape[1])
    fold_rows = split_folds(query_labels, folds, seed)
    per_fold = []
    for f, test_rows in enumerate(fold_rows):
        tune_rows = np.sort(np.concatenate([r for g, r in enumerate(fold_rows) if g != f]))
        grids = np.stack([_gap_grid(c.subset(tune_rows), query_labels[tune_rows], n_classes, Ks, ts_arr)
                          for _, c in candidates])
        ci, ki, ti = np.unravel_index(int(np.argmax(grids)), grids.shape)
        params, classes = candidates[ci]
        K, t = Ks[ki], float(ts_arr[ti])
        test = classes.subset(test_rows)
        pred, log_odds = _predict_K(test, K, np.array([t]), n_classes)
        metrics = evaluate_predictions(pred, log_odds[0], query_labels[test_rows])
        per_fold.append({**metrics, **params, "K": K, "t": t,
                         "tune_GAP": float(grids[ci, ki, ti]),
                         "n_tune": int(len(tune_rows)), "n_test": int(len(test_rows)),
                         "n_test_distractors": int(np.count_nonzero(query_labels[test_rows] == DISTRACTOR)),
                         "grid": (grids[ci] if len(candidates) == 1 else grids).tolist()})
    summary = {key: float(np.mean([p[key] for p in per_fold])) for key in ("GAP", "GAP-", "ACC")}
    return {**summary, "cross_tuned": True, "protocol": f"{folds}-fold cross-tuning",
            "note": (f"(K, t) chosen by GAP on {folds - 1} fold(s), metrics measured on the held-out fold, "
                     f"averaged over {folds} folds (seed {seed}); K and t differ per fold"),
            "folds": folds, "seed": seed, "Ks": list(Ks), "ts": ts_arr.tolist(), "per_fold": per_fold}


def cross_tune(indices, scores, db_labels, query_labels, n_classes: Optional[int] = None,
               Ks: Sequence[int] = DEFAULT_KS, ts: Sequence[float] = DEFAULT_TS,
               folds: int = 2, seed: int = 0) -> dict:
    """k-fold cross-tuning for a dataset with a single query set.

    Queries are split by ``split_folds``; for each fold (K, t) is tuned on the others and the
    fold is evaluated with it. Returns::

        {"GAP", "GAP-", "ACC": means over folds (fractions), "cross_tuned": True,
         "protocol": "2-fold cross-tuning", "note": ..., "folds", "seed", "Ks", "ts",
         "per_fold": [{"GAP", "GAP-", "ACC", "K", "t", "tune_GAP", "n_tune", "n_test",
                       "n_test_distractors", "grid": GAP grid on the tuning folds (lists)}]}
    """
    n_classes = count_classes(db_labels) if n_classes is None else int(n_classes)
    classes = _neighbour_classes(indices, scores, db_labels)
    return _cross_tune([({}, classes)], query_labels, n_classes, Ks, ts, folds, seed)


# -- score-level fusion of two neighbour lists ----------------------------------------------------

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


def _fusion_candidates(a, b, db_labels, weights, k) -> List[Tuple[dict, _NeighbourClasses]]:
    return [({"weight": float(w)}, _neighbour_classes(*fuse_neighbours(a[0], a[1], b[0], b[1], w, k), db_labels))
            for w in weights]


DEFAULT_WEIGHTS: Tuple[float, ...] = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


def tune_fusion(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray], db_labels, query_labels,
                n_classes: Optional[int] = None, weights: Sequence[float] = DEFAULT_WEIGHTS,
                Ks: Sequence[int] = DEFAULT_KS, ts: Sequence[float] = DEFAULT_TS, k: Optional[int] = None
                ) -> Tuple[Tuple[float, int, float], np.ndarray]:
    """Tune the fusion weight of list ``a`` = (indices, scores) against ``b`` jointly with
    (K, t) by GAP. Returns ``((weight, K, t), grid)`` with grid shape (len(weights), len(Ks), len(ts))."""
    n_classes = count_classes(db_labels) if n_classes is None else int(n_classes)
    candidates = _fusion_candidates(a, b, db_labels, weights, k)
    query_labels, Ks, ts_arr = _check_grid(query_labels, len(candidates[0][1].labels), Ks, ts,
                                           candidates[0][1].labels.shape[1])
    grid = np.stack([_gap_grid(c, query_labels, n_classes, Ks, ts_arr) for _, c in candidates])
    wi, ki, ti = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return (float(weights[wi]), Ks[ki], float(ts_arr[ti])), grid


def cross_tune_fusion(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray], db_labels, query_labels,
                      n_classes: Optional[int] = None, weights: Sequence[float] = DEFAULT_WEIGHTS,
                      Ks: Sequence[int] = DEFAULT_KS, ts: Sequence[float] = DEFAULT_TS,
                      folds: int = 2, seed: int = 0, k: Optional[int] = None) -> dict:
    """``cross_tune`` for score-level fusion: (weight, K, t) tuned together on the tuning
    folds; each per-fold entry also has "weight", and its "grid" is (weights, Ks, ts)."""
    n_classes = count_classes(db_labels) if n_classes is None else int(n_classes)
    return _cross_tune(_fusion_candidates(a, b, db_labels, weights, k), query_labels, n_classes,
                       Ks, ts, folds, seed)
