"""kNN classifier of SPEC section 4: confidence formula, grid tuning, cross-tuning, fusion."""
import math

import numpy as np
import pytest

from how_met.recognition.fusion import cross_tune_fusion, fuse_neighbours, tune_fusion
from how_met.recognition.knn import count_classes, evaluate_knn, knn_predict
from how_met.recognition.metrics import gap
from how_met.recognition.protocol import TUNING_TIE, best_grid_point, cross_tune, split_folds, tune


def reference_confidence(neigh_labels, neigh_scores, K, t, n_classes):
    """Slow, literal implementation of the Met kNN rule for one query."""
    best = {}
    for label, score in list(zip(neigh_labels, neigh_scores))[:K]:
        best[label] = max(best.get(label, -np.inf), score)
    if not best:
        return -1, 0.0
    m = len(best)
    denominator = sum(math.exp(t * s) for s in best.values()) + (n_classes - m)
    top = max(best, key=best.get)
    return top, math.exp(t * best[top]) / denominator


def test_confidence_by_hand_with_n_minus_m():
    db_labels = np.array([10, 10, 20, 30, 40])
    indices = np.array([[0, 2, 1, 3]])
    scores = np.array([[0.9, 0.8, 0.7, 0.5]], np.float32)
    n = 6
    # K=3: classes {10: 0.9 (max of 0.9 and 0.7), 20: 0.8}; m = 2, so 4 classes count exp(0).
    p = knn_predict(indices, scores, db_labels, K=3, t=2.0, n_classes=n)
    expected = math.exp(1.8) / (math.exp(1.8) + math.exp(1.6) + 4)
    assert p.labels.tolist() == [10]
    assert p.confidence[0] == pytest.approx(expected, rel=1e-6)
    assert p.log_odds[0] == pytest.approx(math.log(expected / (1 - expected)), rel=1e-6)
    # K=4 adds class 30: m = 3.
    p = knn_predict(indices, scores, db_labels, K=4, t=2.0, n_classes=n)
    assert p.confidence[0] == pytest.approx(
        math.exp(1.8) / (math.exp(1.8) + math.exp(1.6) + math.exp(1.0) + 3), rel=1e-6)
    # K=1: only the top class, n - 1 others.
    p = knn_predict(indices, scores, db_labels, K=1, t=2.0, n_classes=n)
    assert p.confidence[0] == pytest.approx(math.exp(1.8) / (math.exp(1.8) + 5), rel=1e-6)
    # Default n: the number of distinct database classes (4).
    assert count_classes(db_labels) == 4
    p = knn_predict(indices, scores, db_labels, K=3, t=2.0)
    assert p.confidence[0] == pytest.approx(math.exp(1.8) / (math.exp(1.8) + math.exp(1.6) + 2), rel=1e-6)


def test_matches_reference_on_random_lists():
    rng = np.random.default_rng(0)
    db_labels = rng.integers(0, 12, 60)
    indices = np.stack([rng.permutation(60)[:10] for _ in range(30)])
    scores = rng.random((30, 10)).astype(np.float32)  # unsorted on purpose
    indices[3, 6:] = -1  # padding
    scores[3, 6:] = -np.inf
    indices[4] = -1  # no neighbours at all
    scores[4] = -np.inf
    n = count_classes(db_labels) + 5
    for K in (1, 3, 10):
        for t in (0.1, 5.0, 30.0):
            p = knn_predict(indices, scores, db_labels, K, t, n)
            for q in range(30):
                valid = indices[q] >= 0
                order = np.argsort(-scores[q][valid], kind="stable")
                label, conf = reference_confidence(db_labels[indices[q][valid]][order],
                                                   scores[q][valid][order].astype(np.float64), K, t, n)
                assert p.labels[q] == label
                assert p.confidence[q] == pytest.approx(conf, rel=1e-9, abs=1e-300)
    assert knn_predict(indices, scores, db_labels, 3, 1.0, n).confidence[4] == 0.0


def test_large_temperature_is_stable_and_keeps_order():
    n = 224_408
    db_labels = np.arange(6)
    indices = np.array([[0, 1, 2], [3, 4, 5]])
    scores = np.array([[0.99, 0.98, 0.95], [0.999, 0.90, 0.89]], np.float32)
    p = knn_predict(indices, scores, db_labels, K=3, t=500.0, n_classes=n)
    assert np.isfinite(p.log_odds).all() and np.isfinite(p.confidence).all()
    assert ((p.confidence > 0) & (p.confidence <= 1)).all()
    s = scores.astype(np.float64)
    for q in range(2):
        others = [500 * s[q, 1], 500 * s[q, 2], math.log(n - 3)]
        shift = max(others)
        log_rest = shift + math.log(sum(math.exp(v - shift) for v in others))
        assert p.log_odds[q] == pytest.approx(500 * s[q, 0] - log_rest, rel=1e-9)
    # Query 1 has the wider margin: both confidences round to ~1, the log-odds still rank it first.
    assert p.log_odds[1] > p.log_odds[0]


def constructed_lists(copies=1):
    """Database: class c = images 2c and 2c+1. Lists are sorted descending.
    Right answers: top 0.6, a second image of the same class at 0.59, then three rivals at 0.58.
    Wrong answers: top 0.9, a rival at 0.85, then low scores. Distractors: top 0.3.
    K=1 and small t rank by top score (wrong answers first); K=5 sees the close rivals of
    the right answers; only (K=2, t=50) of Ks (1, 2, 5) x ts (1, 50) ranks every right answer first."""
    n_classes = 1000
    db_labels = np.repeat(np.arange(n_classes), 2)
    rows, labels = [], []
    rng = np.random.default_rng(0)
    for _ in range(copies):
        for kind in ["right"] * 4 + ["wrong"] * 3 + ["distractor"] * 3:
            a, *rivals = rng.choice(n_classes, 5, replace=False)
            if kind == "right":
                neighbours = [2 * a, 2 * a + 1, 2 * rivals[0], 2 * rivals[1], 2 * rivals[2]]
                scores, label = [0.6, 0.59, 0.58, 0.58, 0.58], a
            elif kind == "wrong":
                neighbours = [2 * a, 2 * rivals[0], 2 * rivals[1], 2 * rivals[2], 2 * rivals[3]]
                scores, label = [0.9, 0.85, 0.05, 0.04, 0.03], rivals[0]
            else:
                neighbours = [2 * a, 2 * rivals[0], 2 * rivals[1], 2 * rivals[2], 2 * rivals[3]]
                scores, label = [0.3, 0.29, 0.2, 0.1, 0.05], -1
            rows.append((neighbours, scores))
            labels.append(label)
    indices = np.array([r[0] for r in rows], np.int64)
    scores = np.array([r[1] for r in rows], np.float32)
    return indices, scores, db_labels, np.asarray(labels), n_classes


def test_tune_picks_the_known_best_point():
    indices, scores, db_labels, labels, n = constructed_lists()
    (K, t), grid = tune(indices, scores, db_labels, labels, n, Ks=(1, 2, 5), ts=(1, 50))
    assert (K, t) == (2, 50.0)
    assert grid.shape == (3, 2)
    # 4 right answers ranked first out of M = 7 non-distractor queries: GAP = 4/7.
    assert grid[1, 1] == pytest.approx(4 / 7)
    assert (np.delete(grid.ravel(), 3) < 4 / 7 - 0.05).all()
    metrics = evaluate_knn(indices, scores, db_labels, labels, 2, 50, n)
    assert metrics == pytest.approx({"GAP": 4 / 7, "GAP-": 4 / 7, "ACC": 4 / 7, "K": 2, "t": 50.0})


def test_grid_ties_go_to_the_first_point_within_the_tolerance():
    grid = np.array([[0.50, 0.70, 0.70],
                     [0.70 + TUNING_TIE / 2, 0.60, np.nan]])
    assert best_grid_point(grid) == (0, 1)  # exact tie with (0, 2) and a near tie with (1, 0)
    grid[1, 0] = 0.70 + 2 * TUNING_TIE      # better by more than the tolerance: it wins
    assert best_grid_point(grid) == (1, 0)
    stacked = np.stack([grid - 0.01, grid])  # candidates: the first within the tolerance wins
    assert best_grid_point(stacked) == (1, 1, 0)
    stacked[0] = grid - TUNING_TIE / 4
    assert best_grid_point(stacked) == (0, 1, 0)
    assert best_grid_point(np.array([np.nan, 0.1, 0.1])) == (1,)


def test_tune_breaks_near_ties_by_smallest_k_then_t():
    # Every query's two neighbours are of its own class: every (K, t) is right for every query
    # and ranks them identically, so the whole grid ties and (smallest K, smallest t) is chosen.
    db_labels = np.arange(6) // 2
    indices = np.array([[0, 1], [2, 3], [4, 5]])
    scores = np.array([[0.9, 0.8], [0.7, 0.6], [0.5, 0.4]])
    (K, t), grid = tune(indices, scores, db_labels, np.array([0, 1, 2]), Ks=(1, 2), ts=(1, 50))
    assert (K, t) == (1, 1.0) and np.ptp(grid) == 0


def test_full_grid_equals_pointwise_evaluation():
    rng = np.random.default_rng(3)
    db_labels = rng.integers(0, 40, 200)
    indices = np.stack([rng.permutation(200)[:20] for _ in range(80)])
    scores = -np.sort(-rng.random((80, 20)), axis=1).astype(np.float32)
    labels = np.where(rng.random(80) < 0.3, -1, db_labels[indices[:, 0]])
    labels[::4] = (labels[::4] + 1) % 40
    (K, t), grid = tune(indices, scores, db_labels, labels, None)
    assert grid.shape == (9, 12)
    for i, Kv in enumerate((1, 2, 3, 5, 7, 10, 15, 20, 50)):
        for j, tv in enumerate((0.01, 0.1, 1, 5, 10, 15, 20, 25, 30, 50, 100, 500)):
            p = knn_predict(indices, scores, db_labels, Kv, tv)
            assert grid[i, j] == pytest.approx(gap(p.labels, p.log_odds, labels))
    assert grid[(1, 2, 3, 5, 7, 10, 15, 20, 50).index(K), (0.01, 0.1, 1, 5, 10, 15, 20, 25, 30, 50, 100, 500).index(t)] \
        == grid.max()


def test_split_folds_stratified():
    labels = np.array([-1] * 7 + [3] * 15)
    folds = split_folds(labels, 2, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(22))
    for fold in folds:
        assert (labels[fold] == -1).any() and (labels[fold] != -1).any()
        assert abs(len(fold) - 11) <= 1
    assert [f.tolist() for f in folds] == [f.tolist() for f in split_folds(labels, 2, seed=0)]
    with pytest.raises(ValueError):
        split_folds(np.array([-1, -1, 4]), 2)


def test_cross_tune_reports_per_fold_choices():
    indices, scores, db_labels, labels, n = constructed_lists(copies=2)
    result = cross_tune(indices, scores, db_labels, labels, n, Ks=(1, 2, 5), ts=(1, 50), folds=2, seed=0)
    assert result["cross_tuned"] is True and "cross" in result["protocol"]
    assert len(result["per_fold"]) == 2
    for fold in result["per_fold"]:
        assert (fold["K"], fold["t"]) == (2, 50.0)
        assert fold["GAP"] == pytest.approx(4 / 7)
        assert np.asarray(fold["grid"]).shape == (3, 2)
        assert fold["n_test_distractors"] > 0
    assert result["GAP"] == pytest.approx(4 / 7)


def test_fusion_by_hand():
    idx, sc = fuse_neighbours([[0, 1]], [[0.9, 0.5]], [[1, 2]], [[0.8, 0.4]], weight=0.5)
    # 0: (0.9 + floor_b 0.4) / 2; 1: (0.5 + 0.8) / 2; 2: (floor_a 0.5 + 0.4) / 2; equal scores keep index order.
    assert idx.tolist() == [[0, 1]]
    assert sc[0] == pytest.approx([0.65, 0.65])
    idx, sc = fuse_neighbours([[0, 1]], [[0.9, 0.5]], [[1, 2]], [[0.8, 0.4]], weight=0.5, k=4)
    assert idx.tolist() == [[0, 1, 2, -1]]
    assert sc[0, 2] == pytest.approx(0.45) and sc[0, 3] == -np.inf
    idx, _ = fuse_neighbours([[0, 1]], [[0.9, 0.5]], [[1, 2]], [[0.8, 0.4]], weight=0.0, k=3)
    assert idx[0, 0] == 1


def test_fusion_tuning_prefers_the_informative_list():
    indices, scores, db_labels, labels, n = constructed_lists(copies=2)
    rng = np.random.default_rng(1)
    noise = (np.stack([rng.permutation(2 * n)[:5] for _ in range(len(indices))]),
             -np.sort(-rng.random((len(indices), 5)), axis=1).astype(np.float32))
    (w, K, t), grid = tune_fusion((indices, scores), noise, db_labels, labels, n,
                                  weights=(0.0, 1.0), Ks=(1, 2, 5), ts=(1, 50))
    assert (w, K, t) == (1.0, 2, 50.0) and grid.shape == (2, 3, 2)
    result = cross_tune_fusion((indices, scores), noise, db_labels, labels, n,
                               weights=(0.0, 1.0), Ks=(1, 2, 5), ts=(1, 50))
    assert result["cross_tuned"] and all(f["weight"] == 1.0 for f in result["per_fold"])


def test_input_errors():
    with pytest.raises(ValueError, match="positive"):
        knn_predict([[0]], [[0.5]], [0], K=1, t=0.0)
    with pytest.raises(ValueError, match="out of range"):
        knn_predict([[3]], [[0.5]], [0], K=1, t=1.0)
    with pytest.raises(ValueError, match="all distractors"):
        tune([[0]], [[0.5]], [0], [-1], 1)
