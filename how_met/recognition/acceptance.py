"""When to say "this is exhibit X": an accept threshold on the kNN log-odds, chosen for a target
precision on validation queries, and the figures that describe any threshold on any query set.

A query is *accepted* when its log-odds reach the threshold; an accepted query is right when its
predicted exhibit is its exhibit (an accepted distractor is always wrong). The threshold is the
lowest log-odds at which the accepted validation queries are still at least ``target`` precise:
the most queries answered for the precision promised. Queries tied at one log-odds are accepted
or rejected together (a threshold cannot split them). The threshold sits halfway between the
lowest accepted validation log-odds and the next lower one, not on a query's own value: the
same photo asked again (``how-met identify``) gets its log-odds back only to float rounding
(1e-5 measured on museum), which must not flip it across.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .metrics import DISTRACTOR

DEFAULT_TARGET_PRECISION = 0.95


def choose_threshold(log_odds, predicted, labels, target: float = DEFAULT_TARGET_PRECISION) -> float:
    """A threshold accepting the most queries whose accepted ones have precision >= ``target``:
    halfway between the lowest accepted log-odds and the next lower one (0.5 below it when every
    query is accepted); +inf (accept nothing) when no threshold reaches it. Queries without a
    prediction (log-odds -inf) are never accepted."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target precision must be in (0, 1], got {target}")
    log_odds = np.asarray(log_odds, np.float64)
    correct = _correct(predicted, labels)
    finite = np.isfinite(log_odds)
    order = np.argsort(-log_odds[finite], kind="stable")
    values, hits = log_odds[finite][order], correct[finite][order]
    if not len(values):
        return float("inf")
    group_end = np.flatnonzero(np.r_[values[1:] != values[:-1], True])  # last row of each tie
    precision = np.cumsum(hits)[group_end] / (group_end + 1)
    reaching = np.flatnonzero(precision >= target)
    if not len(reaching):
        return float("inf")
    last = group_end[reaching[-1]]
    lower = values[last + 1] if last + 1 < len(values) else values[last] - 1.0
    return float((values[last] + lower) / 2)


def acceptance_figures(log_odds, predicted, labels, threshold: float) -> dict:
    """What a threshold does on a labelled query set: how many are accepted, how precise the
    accepted answers are, which share of the positives gets a right answer and which share of
    the distractors is rejected."""
    log_odds = np.asarray(log_odds, np.float64)
    labels = np.asarray(labels, np.int64)
    accepted = log_odds >= threshold
    correct = _correct(predicted, labels)
    positive = labels != DISTRACTOR
    n_pos, n_dis, n_acc = int(positive.sum()), int((~positive).sum()), int(accepted.sum())
    right = int((accepted & correct).sum())
    return {"queries": int(len(labels)), "positives": n_pos, "distractors": n_dis,
            "accepted": n_acc, "accepted_right": right,
            "precision": _ratio(right, n_acc),
            "positives_right": _ratio(right, n_pos),
            "distractors_rejected": _ratio(int((~accepted & ~positive).sum()), n_dis)}


def degenerate_confidence(log_odds) -> Optional[str]:
    """A sentence when the confidences cannot rank queries (all equal), else None."""
    finite = np.asarray(log_odds, np.float64)
    finite = finite[np.isfinite(finite)]
    if len(finite) > 1 and np.ptp(finite) <= 1e-9 * max(1.0, float(np.abs(finite).max())):
        return (f"every query has the same confidence (log-odds {finite[0]:.4g}): the tuning chose a "
                "temperature t that flattens the scores (small tuning sets let t = 0.01 win ties), so "
                "the confidence ranks nothing and an accept threshold can only take all or none")
    return None


def _correct(predicted, labels) -> np.ndarray:
    predicted = np.asarray(predicted, np.int64)
    labels = np.asarray(labels, np.int64)
    return (labels != DISTRACTOR) & (predicted == labels)


def _ratio(a: int, b: int) -> Optional[float]:
    return round(a / b, 4) if b else None
