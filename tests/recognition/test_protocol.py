"""The one tuning protocol, on the path `how-met evaluate` runs (tune_and_test): every fold picks
the best (candidate, K, t) of an exhaustive search, tests with it, and the reported tuning grid
never mixes the grids of different winning candidates."""
import itertools

import numpy as np
import pytest

from how_met.datasets import Dataset
from how_met.recognition.knn import DEFAULT_KS, DEFAULT_TS, evaluate_knn, knn_predict
from how_met.recognition.protocol import protocol_folds, tune_and_test


def _random_dataset(seed=0, n_db=60, n_classes=20, nq=48, k=15, n_candidates=3):
    rng = np.random.default_rng(seed)
    db_labels = np.arange(n_db) % n_classes
    query_labels = np.where(rng.random(nq) < 0.25, -1, rng.integers(0, n_classes, nq))
    query_labels[:4] = [0, 1, 2, 3]  # enough exhibit queries in every fold
    candidates = []
    for c in range(n_candidates):
        indices = np.stack([rng.permutation(n_db)[:k] for _ in range(nq)])
        # candidates differ in how often the right class comes first
        right = (rng.random(nq) < 0.3 + 0.2 * c) & (query_labels >= 0)
        indices[right, 0] = query_labels[right]
        scores = -np.sort(-rng.random((nq, k)), axis=1).astype(np.float32)
        candidates.append(({"weight": float(c)}, indices, scores))
    ds = Dataset("random", image_root=None, db_keys=[f"d{i}" for i in range(n_db)], db_labels=db_labels,
                 query_keys=[f"q{i}" for i in range(nq)], query_labels=query_labels.astype(np.int64))
    return ds, candidates


def _exhaustive_grid(candidate, ds, rows):
    """(Ks, ts) tuning GAP of one candidate, one evaluate_knn call per point."""
    _, indices, scores = candidate
    return np.array([[evaluate_knn(indices[rows], scores[rows], ds.db_labels, ds.query_labels[rows], K, t,
                                   ds.n_classes)["GAP"] for t in DEFAULT_TS] for K in DEFAULT_KS])


def test_every_fold_picks_the_best_grid_point_and_tests_with_it():
    ds, candidates = _random_dataset()
    _, folds = protocol_folds(ds, cv=2)
    outcome = tune_and_test(candidates, ds, folds)
    profiles = []
    for (tune_rows, test_rows), fold in zip(folds, outcome["per_fold"]):
        grids = np.stack([_exhaustive_grid(c, ds, tune_rows) for c in candidates])
        profiles.append(grids.max(axis=0))
        ci, ki, ti = np.unravel_index(int(np.argmax(grids)), grids.shape)  # first best point
        assert (fold["weight"], fold["K"], fold["t"]) == (float(ci), DEFAULT_KS[ki], DEFAULT_TS[ti])
        # and nothing worse: the chosen point's tuning GAP is the grid's maximum
        assert grids[ci, ki, ti] == grids.max() > np.median(grids)
        _, indices, scores = candidates[ci]
        expected = evaluate_knn(indices[test_rows], scores[test_rows], ds.db_labels, ds.query_labels[test_rows],
                                DEFAULT_KS[ki], DEFAULT_TS[ti], ds.n_classes)
        assert fold["GAP"] == pytest.approx(100 * expected["GAP"])
        predicted = knn_predict(indices[test_rows], scores[test_rows], ds.db_labels, DEFAULT_KS[ki],
                                DEFAULT_TS[ti], ds.n_classes)
        np.testing.assert_array_equal(outcome["pred"][test_rows], predicted.labels)
        np.testing.assert_allclose(outcome["conf"][test_rows], predicted.confidence)
        np.testing.assert_array_equal(outcome["top_indices"][test_rows], indices[test_rows, :5])
    assert outcome["tested"].all()
    assert outcome["metrics"]["GAP"] == pytest.approx(np.mean([f["GAP"] for f in outcome["per_fold"]]))
    # The heatmap: per fold the best tuning GAP over the candidates at each (K, t), averaged.
    np.testing.assert_allclose(outcome["grid"], 100 * np.mean(profiles, axis=0))


def test_tuning_grid_of_folds_that_chose_different_candidates():
    """Two folds, two candidates, each candidate best on one fold's tuning queries: the grid
    shown for the method must be what the folds could reach, not the mean of the two winners'
    grids (a cell of a fold's heatmap must never fall below that fold's other candidate)."""
    for seed in itertools.count():
        ds, candidates = _random_dataset(seed=seed, n_candidates=2)
        _, folds = protocol_folds(ds, cv=2)
        outcome = tune_and_test(candidates, ds, folds)
        if len({f["weight"] for f in outcome["per_fold"]}) == 2:
            break
        assert seed < 200, "no split where the folds disagree"
    per_fold = [np.stack([_exhaustive_grid(c, ds, tune_rows) for c in candidates]) for tune_rows, _ in folds]
    chosen = [grids[int(f["weight"])] for grids, f in zip(per_fold, outcome["per_fold"])]
    mixed = 100 * np.mean(chosen, axis=0)
    profile = 100 * np.mean([grids.max(axis=0) for grids in per_fold], axis=0)
    assert not np.allclose(mixed, profile)
    np.testing.assert_allclose(outcome["grid"], profile)
    assert (outcome["grid"] >= mixed - 1e-9).all()
