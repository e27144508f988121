"""GAP / GAP- / ACC (SPEC section 4) against hand-computed examples."""
import math

import numpy as np
import pytest

from how_met.recognition.metrics import accuracy, as_percent, evaluate_predictions, gap, gap_batch, gap_minus


def test_mixed_example_by_hand():
    labels = [1, 2, -1, 3, 4]
    pred = [1, 5, 7, 3, 4]
    conf = [0.9, 0.8, 0.7, 0.6, 0.1]
    # Ranked: right, wrong, distractor, right, right. M = 4.
    assert gap(pred, conf, labels) == pytest.approx((1 / 1 + 2 / 4 + 3 / 5) / 4)
    # Without the distractor: right, wrong, right, right.
    assert gap_minus(pred, conf, labels) == pytest.approx((1 / 1 + 2 / 3 + 3 / 4) / 4)
    assert accuracy(pred, conf, labels) == pytest.approx(3 / 4)
    assert evaluate_predictions(pred, conf, labels) == pytest.approx(
        {"GAP": 0.525, "GAP-": (1 + 2 / 3 + 3 / 4) / 4, "ACC": 0.75})


def test_input_order_does_not_matter_without_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 5, 50)
    pred = rng.integers(0, 5, 50)
    conf = rng.random(50)
    perm = rng.permutation(50)
    assert gap(pred, conf, labels) == pytest.approx(gap(pred[perm], conf[perm], labels[perm]))


def test_ties_keep_input_order():
    # Equal confidences: the query listed first is ranked first (stable sort).
    assert gap([1, 9, 2], [0.5, 0.5, 0.5], [1, -1, 2]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert gap([9, 1, 2], [0.5, 0.5, 0.5], [-1, 1, 2]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # A tie only among correct queries does not matter.
    assert gap([1, 2, 0], [0.5, 0.5, 0.1], [1, 2, 3]) == pytest.approx((1 + 1) / 3)


def test_no_distractors():
    labels, pred, conf = [1, 2, 3], [1, 0, 3], [0.2, 0.9, 0.5]
    # Ranked: wrong, right, right.
    expected = (1 / 2 + 2 / 3) / 3
    assert gap(pred, conf, labels) == pytest.approx(expected)
    assert gap_minus(pred, conf, labels) == pytest.approx(expected)
    assert accuracy(pred, conf, labels) == pytest.approx(2 / 3)
    assert gap([1, 2, 3], [0.3, 0.2, 0.1], [1, 2, 3]) == 1.0


def test_all_distractors_is_undefined():
    metrics = evaluate_predictions([1, 2], [0.9, 0.1], [-1, -1])
    assert all(math.isnan(v) for v in metrics.values())


def test_distractor_confidence_hurts_gap_not_gap_minus():
    labels, pred = [1, -1], [1, 5]
    low = gap(pred, [0.9, 0.1], labels)
    high = gap(pred, [0.1, 0.9], labels)
    assert low == 1.0 and high == pytest.approx(0.5)
    assert gap_minus(pred, [0.1, 0.9], labels) == 1.0
    # A distractor is never correct, even when "predicted" as -1.
    assert gap([-1, 1], [1.0, 0.5], [-1, 1]) == pytest.approx(0.5)
    assert accuracy([-1, 3], [1, 1], [-1, 4]) == 0.0


def test_gap_batch_matches_gap():
    rng = np.random.default_rng(1)
    labels = rng.integers(-1, 4, 200)
    pred = rng.integers(0, 4, (5, 200))
    conf = np.round(rng.random((5, 200)), 1)  # many ties
    batch = gap_batch(pred, conf, labels)
    assert batch == pytest.approx([gap(p, c, labels) for p, c in zip(pred, conf)])


def test_errors_and_percent():
    with pytest.raises(ValueError, match="length"):
        gap([1, 2], [0.1], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        gap([1], [float("nan")], [1])
    assert as_percent({"GAP": 0.5251, "K": 3}) == {"GAP": 52.5, "K": 3}
