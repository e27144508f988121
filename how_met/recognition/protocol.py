"""The one tuning protocol: choose parameters by GAP on tuning queries, measure on held-out
queries. A dataset with val and test queries is tuned on val and tested on test; one with a
single query set uses k-fold cross-tuning (tuned on all folds but one, tested on that one).

A *candidate* is one neighbour list per query, made with some parameters (a fusion weight,
rerank fusion weights, or none for a plain list). ``choose`` searches the kNN (K, t) grid of
every candidate on the tuning queries: the first (candidate, K, t) in that order within
``TUNING_TIE`` of the best wins (``best_grid_point``).
``run_protocol`` applies the choice of each fold to its test queries. ``tune``, ``cross_tune``
(here), ``tune_fusion``/``cross_tune_fusion``/``tune_fusion_weights`` (``fusion``) and
``how-met evaluate`` (``tune_and_test``) all go through these two functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .knn import (DEFAULT_KS, DEFAULT_TS, NeighbourClasses, check_grid, count_classes, gap_grid,
                  neighbour_classes, predict_log_odds, sigmoid)
from .acceptance import DEFAULT_TARGET_PRECISION, acceptance_figures, choose_threshold
from .metrics import DISTRACTOR, evaluate_predictions

Candidate = Tuple[dict, NeighbourClasses]  # (parameters, neighbour lists reduced to classes)

# Grid points whose tuning GAP (a fraction) is within this of the best are ties: 0.1 GAP point,
# the precision results are printed with. A tie goes to the first point in (candidate, K, t)
# order. Without the tolerance, float noise of 1e-6 in the descriptors moved the tuning GAP of
# museum's nearly flat grid by 0.02 and sent the choice from (K 1, t 0.01) to (K 3, t 500),
# which moved the held-out GAP by 0.8.
TUNING_TIE = 1e-3


def best_grid_point(grid: np.ndarray) -> Tuple[int, ...]:
    """Index of the chosen point of a GAP grid of any shape: the first in row-major order whose
    value is within ``TUNING_TIE`` of the maximum (NaN never wins)."""
    grid = np.asarray(grid, np.float64)
    flat = np.where(np.isnan(grid), -np.inf, grid).ravel()
    first = int(np.flatnonzero(flat >= flat.max() - TUNING_TIE)[0])
    return tuple(int(i) for i in np.unravel_index(first, grid.shape))


@dataclass
class Choice:
    """The tuned parameters: candidate (index and parameters), K, t, the tuning GAP there
    (fraction) and the GAP grids (candidates, Ks, ts) of every candidate."""

    candidate: int
    params: dict
    K: int
    t: float
    value: float
    grids: np.ndarray

    @property
    def grid(self) -> np.ndarray:
        """(Ks, ts) GAP grid of the chosen candidate."""
        return self.grids[self.candidate]


def choose(candidates: Sequence[Candidate], query_labels, n_classes: int, rows: Optional[np.ndarray] = None,
           Ks: Sequence[int] = DEFAULT_KS, ts: Sequence[float] = DEFAULT_TS) -> Choice:
    """Tune (candidate, K, t) by GAP on the queries ``rows`` (default all) of every candidate."""
    query_labels = np.asarray(query_labels).astype(np.int64, copy=False).ravel()
    rows = np.arange(len(query_labels)) if rows is None else np.asarray(rows)
    first = candidates[0][1]
    if len(query_labels) != len(first.labels):
        raise ValueError(f"{len(query_labels)} query labels for {len(first.labels)} neighbour lists")
    labels, Ks, ts_arr = check_grid(query_labels[rows], len(rows), Ks, ts, first.labels.shape[1])
    grids = np.stack([gap_grid(classes.subset(rows), labels, n_classes, Ks, ts_arr) for _, classes in candidates])
    ci, ki, ti = best_grid_point(grids)
    return Choice(int(ci), candidates[ci][0], Ks[ki], float(ts_arr[ti]), float(grids[ci, ki, ti]), grids)


@dataclass
class FoldResult:
    """One fold of the protocol: what was chosen on its tuning rows, measured on its test rows."""

    choice: Choice
    tune_rows: np.ndarray
    test_rows: np.ndarray
    metrics: dict             # GAP, GAP-, ACC (fractions) on the test rows


@dataclass
class ProtocolResult:
    """Per fold the choice and test metrics; per query the prediction of its test fold
    (label, log-odds, the candidate its fold chose; -1 / -inf / -1 for queries never tested)."""

    folds: List[FoldResult]
    pred: np.ndarray
    log_odds: np.ndarray
    candidate: np.ndarray

    @property
    def tested(self) -> np.ndarray:
        return self.candidate >= 0

    @property
    def confidence(self) -> np.ndarray:
        return np.where(self.tested, sigmoid(self.log_odds), 0.0)

    def tuning_profile(self) -> np.ndarray:
        """(Ks, ts) mean over folds of each fold's best tuning GAP over its candidates: at every
        (K, t), the value its fold could reach there, so the cells of one heatmap never mix
        the grids of different winning candidates."""
        return np.mean([fold.choice.grids.max(axis=0) for fold in self.folds], axis=0)


def run_protocol(candidates: Sequence[Candidate], query_labels, n_classes: int,
                 folds: Sequence[Tuple[np.ndarray, np.ndarray]], Ks: Sequence[int] = DEFAULT_KS,
                 ts: Sequence[float] = DEFAULT_TS) -> ProtocolResult:
    """For every (tune rows, test rows) fold: ``choose`` on the tune rows, then classify the test
    rows with the chosen candidate, K and t."""
    query_labels = np.asarray(query_labels).astype(np.int64, copy=False).ravel()
    nq = len(query_labels)
    pred = np.full(nq, DISTRACTOR, np.int64)
    log_odds = np.full(nq, -np.inf)
    chosen = np.full(nq, -1, np.int64)
    results = []
    for tune_rows, test_rows in folds:
        choice = choose(candidates, query_labels, n_classes, tune_rows, Ks, ts)
        test = candidates[choice.candidate][1].subset(test_rows)
        fold_pred, fold_log_odds = predict_log_odds(test, choice.K, np.array([choice.t]), n_classes)
        pred[test_rows], log_odds[test_rows], chosen[test_rows] = fold_pred, fold_log_odds[0], choice.candidate
        metrics = evaluate_predictions(fold_pred, fold_log_odds[0], query_labels[test_rows])
        results.append(FoldResult(choice, np.asarray(tune_rows), np.asarray(test_rows), metrics))
    return ProtocolResult(results, pred, log_odds, chosen)


def cross_validation_folds(query_labels, folds: int = 2, seed: int = 0) -> List[Tuple[np.ndarray, np.ndarray]]:
    """[(tune rows, test rows)] of k-fold cross-tuning: each fold tested once, tuned on the rest."""
    parts = split_folds(query_labels, folds, seed)
    return [(np.sort(np.concatenate([p for g, p in enumerate(parts) if g != i])), parts[i])
            for i in range(len(parts))]


def tune(indices, scores, db_labels, query_labels, n_classes: Optional[int] = None,
         Ks: Sequence[int] = DEFAULT_KS, ts: Sequence[float] = DEFAULT_TS
         ) -> Tuple[Tuple[int, float], np.ndarray]:
    """Choose (K, t) of one neighbour list by GAP over the full grid.

    Returns ``((K, t), grid)`` with ``grid[i, j]`` the GAP (fraction) at ``Ks[i]``, ``ts[j]``.
    ``best_grid_point`` chooses: among points within ``TUNING_TIE`` of the best, the smallest
    K, then the smallest t.
    """
    n_classes = count_classes(db_labels) if n_classes is None else int(n_classes)
    choice = choose([({}, neighbour_classes(indices, scores, db_labels))], query_labels, n_classes, Ks=Ks, ts=ts)
    return (choice.K, choice.t), choice.grid


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


def cross_tune_candidates(candidates: Sequence[Candidate], query_labels, n_classes: int,
                          Ks: Sequence[int] = DEFAULT_KS, ts: Sequence[float] = DEFAULT_TS,
                          folds: int = 2, seed: int = 0) -> dict:
    """k-fold cross-tuning of (candidate, K, t); the result as described in ``cross_tune``, with
    each per-fold entry also carrying the chosen candidate's parameters."""
    query_labels = np.asarray(query_labels).astype(np.int64, copy=False).ravel()
    Ks = [int(K) for K in Ks]
    ts_list = [float(t) for t in ts]
    result = run_protocol(candidates, query_labels, n_classes, cross_validation_folds(query_labels, folds, seed),
                          Ks, ts_list)
    per_fold = []
    for fold in result.folds:
        choice = fold.choice
        per_fold.append({**fold.metrics, **choice.params, "K": choice.K, "t": choice.t, "tune_GAP": choice.value,
                         "n_tune": int(len(fold.tune_rows)), "n_test": int(len(fold.test_rows)),
                         "n_test_distractors": int(np.count_nonzero(query_labels[fold.test_rows] == DISTRACTOR)),
                         "grid": (choice.grid if len(candidates) == 1 else choice.grids).tolist()})
    summary = {key: float(np.mean([p[key] for p in per_fold])) for key in ("GAP", "GAP-", "ACC")}
    return {**summary, "cross_tuned": True, "protocol": f"{folds}-fold cross-tuning",
            "note": (f"(K, t) chosen by GAP on {folds - 1} fold(s), metrics measured on the held-out fold, "
                     f"averaged over {folds} folds (seed {seed}); K and t differ per fold"),
            "folds": folds, "seed": seed, "Ks": Ks, "ts": ts_list, "per_fold": per_fold}


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
    folds = cross_validation_folds(ds.query_labels, cv or 2, seed)
    return f"{len(folds)}-fold cross-tuning", folds


def tune_and_test(candidates: List[Tuple[dict, np.ndarray, np.ndarray]], ds,
                  folds: List[Tuple[np.ndarray, np.ndarray]],
                  target_precision: float = DEFAULT_TARGET_PRECISION) -> dict:
    """What ``how-met evaluate`` reports for one method: ``run_protocol`` over its candidates.

    candidates: [(params, indices (nq, k), scores (nq, k))] aligned with ds.query_keys.
    Returns metrics averaged over folds (percent; K, t and parameters as "fold1/fold2" where the
    folds chose differently), per-fold metrics, the tuning GAP grid (percent, see
    ``ProtocolResult.tuning_profile``) and per-query predictions with the top-5 of the
    candidate each query's fold chose. Each fold also chooses on its tuning rows the accept
    threshold of ``target_precision`` (``acceptance.choose_threshold``) and applies it to its test
    rows: per fold the threshold and its figures on tuning and test rows, per query log-odds,
    accepted and fold.
    """
    lists = [(params, neighbour_classes(indices, scores, ds.db_labels)) for params, indices, scores in candidates]
    result = run_protocol(lists, ds.query_labels, ds.n_classes, folds)
    labels = ds.query_labels
    nq = len(labels)
    accepted = np.zeros(nq, bool)
    fold_of = np.full(nq, -1, np.int64)
    per_fold = []
    for f, fold in enumerate(result.folds):
        choice = fold.choice
        tuned, tuned_log_odds = predict_log_odds(lists[choice.candidate][1].subset(fold.tune_rows), choice.K,
                                                 np.array([choice.t]), ds.n_classes)
        threshold = choose_threshold(tuned_log_odds[0], tuned, labels[fold.tune_rows], target_precision)
        test = fold.test_rows
        accepted[test] = (result.log_odds[test] >= threshold) & (result.pred[test] != DISTRACTOR)
        fold_of[test] = f
        per_fold.append({**{k: 100 * v for k, v in fold.metrics.items()}, "K": int(choice.K), "t": float(choice.t),
                         **choice.params, "tune_GAP": 100 * choice.value,
                         "accept": {"target_precision": target_precision,
                                    "log_odds": threshold if np.isfinite(threshold) else None,
                                    "tuning": acceptance_figures(tuned_log_odds[0], tuned, labels[fold.tune_rows],
                                                                 threshold),
                                    "test": acceptance_figures(result.log_odds[test], result.pred[test],
                                                               labels[test], threshold)}})
    summary = {key: float(np.nanmean([f[key] for f in per_fold])) for key in ("GAP", "GAP-", "ACC")}
    for key in ["K", "t"] + sorted(set(per_fold[0]) - {"GAP", "GAP-", "ACC", "K", "t", "tune_GAP", "accept"}):
        values = [f[key] for f in per_fold]
        summary[key] = values[0] if len(set(map(str, values))) == 1 else \
            "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    top_indices = np.full((nq, 5), -1, np.int64)
    top_scores = np.full((nq, 5), -np.inf, np.float32)
    for fold in result.folds:
        _, indices, scores = candidates[fold.choice.candidate]
        width = min(5, indices.shape[1])
        top_indices[fold.test_rows, :width] = indices[fold.test_rows, :width]
        top_scores[fold.test_rows, :width] = scores[fold.test_rows, :width]
    return {"metrics": summary, "per_fold": per_fold, "grid": result.tuning_profile() * 100,
            "pred": result.pred, "conf": result.confidence, "log_odds": result.log_odds, "accepted": accepted,
            "fold": fold_of, "tested": result.tested,
            "top_indices": top_indices, "top_scores": top_scores, "protocol": result}
