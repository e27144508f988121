"""The one tuning protocol: choose parameters by GAP on tuning queries, measure on held-out
queries. A dataset with val and test queries is tuned on val and tested on test; one with a
single query set uses k-fold cross-tuning (tuned on all folds but one, tested on that one).

Candidates are whatever produces a neighbour list (fusion weights, rerank weights, or a single
list); the kNN (K, t) grid is searched for every candidate.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from .knn import (DEFAULT_KS, DEFAULT_TS, NeighbourClasses, check_grid, count_classes, gap_grid, knn_predict,
                  neighbour_classes, predict_log_odds)
from .metrics import DISTRACTOR, evaluate_predictions


def tune(indices, scores, db_labels, query_labels, n_classes: Optional[int] = None,
         Ks: Sequence[int] = DEFAULT_KS, ts: Sequence[float] = DEFAULT_TS
         ) -> Tuple[Tuple[int, float], np.ndarray]:
    """Choose (K, t) by GAP over the full grid.

    Returns ``((K, t), grid)`` with ``grid[i, j]`` the GAP (fraction) at ``Ks[i]``, ``ts[j]``.
    The first maximum in row-major order wins (smallest K, then smallest t).
    """
    n_classes = count_classes(db_labels) if n_classes is None else int(n_classes)
    classes = neighbour_classes(indices, scores, db_labels)
    query_labels, Ks, ts_arr = check_grid(query_labels, len(classes.labels), Ks, ts, classes.labels.shape[1])
    grid = gap_grid(classes, query_labels, n_classes, Ks, ts_arr)
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


def cross_tune_candidates(candidates: List[Tuple[dict, NeighbourClasses]], query_labels, n_classes: int,
                Ks, ts, folds: int, seed: int) -> dict:
    """Tune (candidate, K, t) on all folds but one, test on that one; average the metrics."""
    nq = len(candidates[0][1].labels)
    query_labels, Ks, ts_arr = check_grid(query_labels, nq, Ks, ts, candidates[0][1].labels.shape[1])
    fold_rows = split_folds(query_labels, folds, seed)
    per_fold = []
    for f, test_rows in enumerate(fold_rows):
        tune_rows = np.sort(np.concatenate([r for g, r in enumerate(fold_rows) if g != f]))
        grids = np.stack([gap_grid(c.subset(tune_rows), query_labels[tune_rows], n_classes, Ks, ts_arr)
                          for _, c in candidates])
        ci, ki, ti = np.unravel_index(int(np.argmax(grids)), grids.shape)
        params, classes = candidates[ci]
        K, t = Ks[ki], float(ts_arr[ti])
        test = classes.subset(test_rows)
        pred, log_odds = predict_log_odds(test, K, np.array([t]), n_classes)
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
    classes = neighbour_classes(indices, scores, db_labels)
    return cross_tune_candidates([({}, classes)], query_labels, n_classes, Ks, ts, folds, seed)



def protocol_folds(ds, cv: Optional[int], seed: int = 0) -> Tuple[str, List[Tuple[np.ndarray, np.ndarray]]]:
    """[(tune rows, test rows)] over ds.query_* and a description of the protocol."""
    if ds.has_splits and not cv:
        return "val -> test", [(ds.query_splits["val"], ds.query_splits["test"])]
    folds = split_folds(ds.query_labels, cv or 2, seed)
    pairs = [(np.sort(np.concatenate([f for g, f in enumerate(folds) if g != i])), folds[i])
             for i in range(len(folds))]
    return f"{len(folds)}-fold cross-tuning", pairs


def tune_and_test(candidates: List[Tuple[dict, np.ndarray, np.ndarray]], ds,
                  folds: List[Tuple[np.ndarray, np.ndarray]]) -> dict:
    """Choose (candidate, K, t) by GAP on each fold's tuning rows, predict its test rows.

    candidates: [(params, indices (nq, k), scores (nq, k))] aligned with ds.query_keys.
    Returns metrics averaged over folds (percent), chosen parameters, the mean GAP grid of the
    chosen candidate, and per-query predictions.
    """
    labels, n_classes = ds.query_labels, ds.n_classes
    nq = len(labels)
    pred = np.full(nq, DISTRACTOR, np.int64)
    conf = np.zeros(nq)
    tested = np.zeros(nq, bool)
    # each query's shortlist under the candidate its fold chose (for the report's top-5)
    top_indices = np.full((nq, 5), -1, np.int64)
    top_scores = np.full((nq, 5), -np.inf, np.float32)
    per_fold, grids = [], []
    for tune_rows, test_rows in folds:
        best = None
        for params, indices, scores in candidates:
            (K, t), grid = tune(indices[tune_rows], scores[tune_rows], ds.db_labels,
                                    labels[tune_rows], n_classes)
            value = float(np.nanmax(grid))
            if best is None or value > best[0]:
                best = (value, params, indices, scores, K, t, grid)
        _, params, indices, scores, K, t, grid = best
        out = knn_predict(indices[test_rows], scores[test_rows], ds.db_labels, K, t, n_classes)
        metrics = evaluate_predictions(out.labels, out.log_odds, labels[test_rows])
        pred[test_rows], conf[test_rows], tested[test_rows] = out.labels, out.confidence, True
        width = min(5, indices.shape[1])
        top_indices[test_rows, :width] = indices[test_rows, :width]
        top_scores[test_rows, :width] = scores[test_rows, :width]
        per_fold.append({**{k: 100 * v for k, v in metrics.items()}, "K": int(K), "t": float(t), **params})
        grids.append(np.asarray(grid) * 100)
    summary = {key: float(np.nanmean([f[key] for f in per_fold])) for key in ("GAP", "GAP-", "ACC")}
    for key in ["K", "t"] + sorted(set(per_fold[0]) - {"GAP", "GAP-", "ACC", "K", "t"}):
        values = [f[key] for f in per_fold]
        summary[key] = values[0] if len(set(map(str, values))) == 1 else "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return {"metrics": summary, "per_fold": per_fold, "grid": np.mean(grids, axis=0),
            "pred": pred, "conf": conf, "tested": tested, "top_indices": top_indices,
            "top_scores": top_scores}

