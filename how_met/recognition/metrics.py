"""Recognition metrics of the Met protocol (SPEC section 4): GAP, GAP- and ACC.

All functions return **fractions** in [0, 1]; multiply by 100 for the percent shown in the
results tables (``as_percent`` does it for a metrics dict).

Inputs, one entry per query:

- ``pred``: predicted class (int); any value that is not a database class (e.g. -1 for "no
  prediction") simply counts as wrong.
- ``conf``: confidence of that prediction. Only its *order* matters, so any score that is
  monotone in the confidence works too (the kNN classifier's log-odds, which do not saturate
  at 1.0 for large temperatures, give the exact order).
- ``labels``: true class, ``-1`` for a distractor (a query that depicts no database class).

Ties in confidence are broken by the queries' input order (a stable sort of the confidences,
descending): of two queries with equal confidence, the one listed first is ranked first. This
makes every metric deterministic; ``gap`` with ties therefore depends on the query order, as
it does in every GAP implementation that sorts.

When there is no non-distractor query at all, GAP, GAP- and ACC are undefined (M = 0) and
returned as NaN.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from ..datasets import DISTRACTOR


def _as_arrays(pred, conf, labels) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(np.int64, copy=False).ravel()
    conf = np.asarray(conf, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(np.int64, copy=False).ravel()
    if not (len(pred) == len(conf) == len(labels)):
        raise ValueError(f"pred, conf and labels differ in length ({len(pred)}, {len(conf)}, {len(labels)})")
    if np.isnan(conf).any():
        raise ValueError("conf contains NaN")
    return pred, conf, labels


def _gap_sorted(correct_sorted: np.ndarray, n_relevant: int) -> float:
    """GAP of queries already sorted by confidence; ``correct_sorted`` is rel(i) per rank."""
    if n_relevant == 0:
        return float("nan")
    hits = np.cumsum(correct_sorted, dtype=np.float64)
    precision = hits / np.arange(1, len(correct_sorted) + 1)
    return float(np.sum(precision * correct_sorted) / n_relevant)


def gap(pred, conf, labels) -> float:
    """Global Average Precision over all queries, distractors included (fraction).

    Queries sorted by confidence descending (stable); rel(i) = 1 when query i is not a
    distractor and its prediction is right; GAP = (1/M) sum_i P(i) rel(i), with P(i) the
    precision of the first i queries and M the number of non-distractor queries.
    """
    pred, conf, labels = _as_arrays(pred, conf, labels)
    order = np.argsort(-conf, kind="stable")
    correct = (pred == labels) & (labels != DISTRACTOR)
    return _gap_sorted(correct[order], int(np.count_nonzero(labels != DISTRACTOR)))


def gap_minus(pred, conf, labels) -> float:
    """GAP- : GAP computed over the non-distractor queries only (fraction)."""
    pred, conf, labels = _as_arrays(pred, conf, labels)
    keep = labels != DISTRACTOR
    return gap(pred[keep], conf[keep], labels[keep])


def accuracy(pred, conf, labels) -> float:
    """Accuracy over the non-distractor queries (fraction); ``conf`` is ignored."""
    pred, conf, labels = _as_arrays(pred, conf, labels)
    keep = labels != DISTRACTOR
    if not keep.any():
        return float("nan")
    return float(np.mean(pred[keep] == labels[keep]))


def evaluate_predictions(pred, conf, labels) -> Dict[str, float]:
    """``{"GAP", "GAP-", "ACC"}`` as fractions (see the module docstring for ties / NaN)."""
    return {"GAP": gap(pred, conf, labels),
            "GAP-": gap_minus(pred, conf, labels),
            "ACC": accuracy(pred, conf, labels)}


def gap_batch(pred: np.ndarray, conf: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """GAP of several prediction sets for the same queries at once.

    pred, conf: (B, nq); labels: (nq,). Returns (B,) fractions, identical to calling ``gap``
    on each row (same stable tie order). Used by the kNN grid search.
    """
    pred = np.atleast_2d(np.asarray(pred)).astype(np.int64, copy=False)
    conf = np.atleast_2d(np.asarray(conf, dtype=np.float64))
    labels = np.asarray(labels).astype(np.int64, copy=False).ravel()
    if pred.shape != conf.shape or pred.shape[1] != len(labels):
        raise ValueError(f"pred {pred.shape}, conf {conf.shape} and labels ({len(labels)},) do not match")
    n_relevant = int(np.count_nonzero(labels != DISTRACTOR))
    if n_relevant == 0:
        return np.full(len(pred), np.nan)
    order = np.argsort(-conf, axis=1, kind="stable")
    correct = (pred == labels[None, :]) & (labels != DISTRACTOR)[None, :]
    correct_sorted = np.take_along_axis(correct, order, axis=1)
    hits = np.cumsum(correct_sorted, axis=1, dtype=np.float64)
    precision = hits / np.arange(1, len(labels) + 1)[None, :]
    return (precision * correct_sorted).sum(axis=1) / n_relevant


def as_percent(metrics: Dict[str, float], keys=("GAP", "GAP-", "ACC"), digits: int = 1) -> Dict[str, float]:
    """A copy of ``metrics`` with the fraction-valued ``keys`` turned into rounded percent."""
    out = dict(metrics)
    for key in keys:
        if key in out and out[key] is not None:
            out[key] = round(100.0 * float(out[key]), digits)
    return out
