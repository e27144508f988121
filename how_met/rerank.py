"""Rerank a shortlist with local features: exact ASMK score, spatial verification, score fusion.

A global-descriptor system (or the ASMK inverted file) proposes a shortlist of database images
per query; :class:`Reranker` scores the query against *only those* images, so the cost grows with
the shortlist, not with the database:

* **ASMK score** -- each candidate's descriptors are quantised and aggregated on demand exactly
  as ``how_met.ivf.build_index`` does (kept in a bounded LRU cache); the score is the value the
  inverted-file search gives for that pair (pass ``index=`` to share its alpha, tau and idf).
* **Spatial verification** -- tentative correspondences, then RANSAC in image coordinates
  (keypoints from the stored feature-map cells and scales) fitting a homography (4 points,
  closed form in Hartley-normalised coordinates; least-squares refits by normalised DLT) or an
  affine map (3 points). Hypotheses are drawn in batches from a seeded generator and fitted
  and scored a batch at a time in one compiled (numba) call, the best is refined on its inliers
  (LO-RANSAC) and sampling stops at the usual confidence bound. A correspondence is an inlier
  when its reprojection error in the database image is within ``threshold`` cells of that
  feature (a cell is stride / scale input pixels: coarse-scale features are localised less
  precisely) and the model's local scale agrees with the two features' scale ratio. An
  optional 1-D vote on the scale ratios prefilters the correspondences. The verification
  score is the number of inliers, counted one-to-one.
* **Fusion** -- :func:`fuse_scores` combines global similarity, ASMK score and inliers;
  :func:`tune_fusion_weights` / :func:`cross_tune_fusion_weights` grid-search the weights with
  the kNN classifier's (K, t) on validation queries.

Correspondences (``SpatialParams.matching``):

* ``"words"`` (default) -- mutual nearest neighbours (cosine of the L2-normalised descriptors,
  >= ``min_similarity``) among the pairs that share a visual word (the query's 5 words vs the
  candidate feature's word). The quantisation both queries need anyway prunes the 1000 x 1000
  similarity matrix to a few thousand pairs.
* ``"mnn"`` -- mutual nearest neighbours over all descriptor pairs (one 1000 x 1000 x 128
  matrix product per candidate).

Measured on ../shared/data/museum (lite0 features, 4096-word codebook, global top-100 of 164
queries): "words" separates positive from distractor queries as well as "mnn" (AUC of the top
inlier count 0.965 vs 0.966; ASMK score 0.907, global cosine 0.957) and reranking the global
shortlist raises kNN GAP from 95.6 to 98.5 (inliers alone) / 99.2 (tuned fusion), while it is
10x faster (131 vs 1265 ms per query for 100 candidates on a loaded 2-core box). "mnn" reaches
99.2 / 99.8. Shared words were first tried with Hamming-embedding similarity of residual
signs instead of descriptor cosine: far worse (GAP 66.9 from inliers), as the smoothed HOW
features of neighbouring cells fall into the same words and tie.
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numba
import numpy as np

from . import asmk
from .features import FeatureStore, LocalFeatures

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Geometry: minimal solvers, hypothesis scoring and RANSAC
# ---------------------------------------------------------------------------------------------

MODELS = ("affine", "homography")
_SAMPLE_SIZE = {"affine": 3, "homography": 4}


def _hartley(points: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Translate ``points`` (n, 2) to their centroid and scale to mean distance sqrt(2).

    Returns the normalised points and the 3x3 transform T (x_norm = T x). Conditioning the DLT
    this way is what makes a homography fit from pixel coordinates numerically stable.
    """
    centre = points.mean(axis=0)
    spread = np.sqrt(((points - centre) ** 2).sum(axis=1)).mean()
    s = math.sqrt(2.0) / spread if spread > 1e-12 else 1.0
    T = np.array([[s, 0.0, -s * centre[0]], [0.0, s, -s * centre[1]], [0.0, 0.0, 1.0]])
    return (points - centre) * s, T


def _dlt_rows(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """DLT constraint rows (..., 2n, 9) for correspondences src -> dst (..., n, 2)."""
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    one, zero = np.ones_like(x), np.zeros_like(x)
    r1 = np.stack([-x, -y, -one, zero, zero, zero, u * x, u * y, u], axis=-1)
    r2 = np.stack([zero, zero, zero, -x, -y, -one, v * x, v * y, v], axis=-1)
    rows = np.stack([r1, r2], axis=-2)  # (..., n, 2, 9)
    return rows.reshape(rows.shape[:-3] + (-1, 9))


def _fit_affine_lsq(src: np.ndarray, dst: np.ndarray) -> Optional[np.ndarray]:
    """Least-squares affine map src -> dst (n >= 3 points, pixel coordinates)."""
    src_n, Ts = _hartley(src)
    dst_n, Td = _hartley(dst)
    X = np.concatenate([src_n, np.ones((len(src_n), 1))], axis=1)
    M, _, rank, _ = np.linalg.lstsq(X, dst_n, rcond=None)
    if rank < 3:
        return None
    A = np.eye(3)
    A[:2, :] = M.T
    return np.linalg.inv(Td) @ A @ Ts


def _fit_homography_lsq(src: np.ndarray, dst: np.ndarray) -> Optional[np.ndarray]:
    """Normalised DLT homography src -> dst from n >= 4 points (pixel coordinates)."""
    src_n, Ts = _hartley(src)
    dst_n, Td = _hartley(dst)
    _, sv, vt = np.linalg.svd(_dlt_rows(src_n, dst_n), full_matrices=False)
    if sv[7] <= 1e-9 * sv[0]:
        return None
    H = np.linalg.inv(Td) @ vt[-1].reshape(3, 3) @ Ts
    return H / H[2, 2] if abs(H[2, 2]) > 1e-12 else H


def fit_model(src: np.ndarray, dst: np.ndarray, model: str = "homography") -> Optional[np.ndarray]:
    """Least-squares affine or homography (3x3) mapping src (n, 2) onto dst (n, 2); None if degenerate."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} (expected one of {MODELS})")
    if len(src) < _SAMPLE_SIZE[model]:
        return None
    return _fit_affine_lsq(src, dst) if model == "affine" else _fit_homography_lsq(src, dst)


@numba.njit(cache=True, nogil=True, inline="always")
def _squared_error(h, det, x, y, u, v, thr2, jac_lo, jac_hi, use_scale):
    """Squared reprojection error of one correspondence under h, or -1 if it is no inlier."""
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    if w <= 0.0:  # behind the line at infinity: not a valid image point
        return -1.0
    px = (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w
    py = (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w
    err2 = (px - u) * (px - u) + (py - v) * (py - v)
    if err2 >= thr2:
        return -1.0
    if use_scale:
        jac = det / (w * w * w)  # local area scale of the model at this point
        if jac < jac_lo or jac > jac_hi:
            return -1.0
    return err2


@numba.njit(cache=True, nogil=True)
def _det3(h):
    return (h[0, 0] * (h[1, 1] * h[2, 2] - h[1, 2] * h[2, 1])
            - h[0, 1] * (h[1, 0] * h[2, 2] - h[1, 2] * h[2, 0])
            + h[0, 2] * (h[1, 0] * h[2, 1] - h[1, 1] * h[2, 0]))


@numba.njit(cache=True, nogil=True)
def _msac_cost(h, det, src, dst, thr2, jac_lo, jac_hi, use_scale):
    """MSAC cost of one model: sum of min(err^2 / thr^2, 1) over correspondences."""
    cost = 0.0
    for i in range(src.shape[0]):
        e = _squared_error(h, det, src[i, 0], src[i, 1], dst[i, 0], dst[i, 1], thr2[i],
                           jac_lo[i], jac_hi[i], use_scale)
        cost += 1.0 if e < 0.0 else e / thr2[i]
    return cost


@numba.njit(cache=True, nogil=True)
def _msac_costs(H, src, dst, thr2, jac_lo, jac_hi, use_scale):
    """MSAC cost of each model in H (B, 3, 3)."""
    costs = np.empty(H.shape[0])
    for b in range(H.shape[0]):
        costs[b] = _msac_cost(H[b], _det3(H[b]), src, dst, thr2, jac_lo, jac_hi, use_scale)
    return costs


@numba.njit(cache=True, nogil=True)
def _inlier_mask(h, src, dst, thr2, jac_lo, jac_hi, use_scale):
    """Inlier mask (n,) of one model, by the same test as _msac_costs."""
    det = _det3(h)
    mask = np.empty(src.shape[0], np.bool_)
    for i in range(src.shape[0]):
        mask[i] = _squared_error(h, det, src[i, 0], src[i, 1], dst[i, 0], dst[i, 1], thr2[i],
                                 jac_lo[i], jac_hi[i], use_scale) >= 0.0
    return mask


@numba.njit(cache=True, nogil=True, inline="always")
def _inverse3(m, out):
    """out = inverse of the 3x3 matrix m; returns det(m) (out untouched when it is 0)."""
    c00 = m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1]
    c01 = m[1, 2] * m[2, 0] - m[1, 0] * m[2, 2]
    c02 = m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0]
    det = m[0, 0] * c00 + m[0, 1] * c01 + m[0, 2] * c02
    if det == 0.0:
        return det
    inv = 1.0 / det
    out[0, 0] = c00 * inv
    out[1, 0] = c01 * inv
    out[2, 0] = c02 * inv
    out[0, 1] = (m[0, 2] * m[2, 1] - m[0, 1] * m[2, 2]) * inv
    out[1, 1] = (m[0, 0] * m[2, 2] - m[0, 2] * m[2, 0]) * inv
    out[2, 1] = (m[0, 1] * m[2, 0] - m[0, 0] * m[2, 1]) * inv
    out[0, 2] = (m[0, 1] * m[1, 2] - m[0, 2] * m[1, 1]) * inv
    out[1, 2] = (m[0, 2] * m[1, 0] - m[0, 0] * m[1, 2]) * inv
    out[2, 2] = (m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]) * inv
    return det


@numba.njit(cache=True, nogil=True)
def _projective_basis(points, sample, out):
    """out = the map of the canonical basis e1, e2, e3, e1+e2+e3 onto the 4 sampled points
    (columns p_i scaled by lambda, [p1 p2 p3] lambda = p4); False if 3 of them are collinear."""
    m = np.empty((3, 3))
    for j in range(3):
        m[0, j] = points[sample[j], 0]
        m[1, j] = points[sample[j], 1]
        m[2, j] = 1.0
    inv = np.empty((3, 3))
    det = _inverse3(m, inv)
    if abs(det) < 1e-6:
        return False
    x, y = points[sample[3], 0], points[sample[3], 1]
    for j in range(3):
        lam = inv[j, 0] * x + inv[j, 1] * y + inv[j, 2]
        if abs(lam) < 1e-6:
            return False
        for i in range(3):
            out[i, j] = m[i, j] * lam
    return True


@numba.njit(cache=True, nogil=True)
def _sample_models(samples, src_n, dst_n, Ts, Td_inv, src, dst, thr2, jac_lo, jac_hi, use_scale,
                   src_ids, dst_ids, affine, max_log_scale):
    """Fit the minimal model of every sample and score it: (MSAC costs (b,), models (b, 3, 3)).

    Models are solved in Hartley-normalised coordinates and mapped back to pixels. A sample is
    skipped (cost inf) when it repeats a feature, is degenerate, or its model mirrors the
    image or changes the scale at the sample by more than exp(max_log_scale).
    """
    b, s = samples.shape
    costs = np.full(b, np.inf)
    models = np.zeros((b, 3, 3))
    Hn = np.empty((3, 3))
    A = np.empty((3, 3))
    B_src = np.empty((3, 3))
    B_dst = np.empty((3, 3))
    inv = np.empty((3, 3))
    for k in range(b):
        smp = samples[k]
        distinct = True
        for i in range(s):
            for j in range(i + 1, s):
                if src_ids[smp[i]] == src_ids[smp[j]] or dst_ids[smp[i]] == dst_ids[smp[j]]:
                    distinct = False
        if not distinct:
            continue
        if affine:
            # Rows [x y 1] X M = dst: M = X^-1 dst; the model is [[M^T], [0 0 1]].
            for i in range(3):
                A[i, 0] = src_n[smp[i], 0]
                A[i, 1] = src_n[smp[i], 1]
                A[i, 2] = 1.0
            det = _inverse3(A, inv)
            if abs(det) < 1e-3:
                continue
            for r in range(2):
                for c in range(3):
                    acc = 0.0
                    for i in range(3):
                        acc += inv[c, i] * dst_n[smp[i], r]
                    Hn[r, c] = acc
            Hn[2, 0] = 0.0
            Hn[2, 1] = 0.0
            Hn[2, 2] = 1.0
        else:
            if not _projective_basis(src_n, smp, B_src) or not _projective_basis(dst_n, smp, B_dst):
                continue
            if _inverse3(B_src, inv) == 0.0:
                continue
            Hn[:, :] = B_dst @ inv
        H = Td_inv @ Hn @ Ts
        # Orientation: make w positive at the first sample point, then all must agree.
        w0 = H[2, 0] * src[smp[0], 0] + H[2, 1] * src[smp[0], 1] + H[2, 2]
        if w0 < 0.0:
            H = -H
        det = _det3(H)
        plausible = det > 0.0
        for i in range(s):
            w = H[2, 0] * src[smp[i], 0] + H[2, 1] * src[smp[i], 1] + H[2, 2]
            if w <= 0.0:
                plausible = False
                break
            jac = det / (w * w * w)
            if abs(0.5 * math.log(jac)) > max_log_scale:
                plausible = False
                break
        if not plausible:
            continue
        costs[k] = _msac_cost(H, det, src, dst, thr2, jac_lo, jac_hi, use_scale)
        models[k] = H
    return costs, models


@dataclass
class RansacResult:
    """Outcome of :func:`ransac`: model (3x3, None if none found), inlier mask, inlier count
    (one-to-one), and the number of hypotheses tried."""

    model: Optional[np.ndarray]
    inlier_mask: np.ndarray
    inliers: int
    hypotheses: int


def _count_one_to_one(mask: np.ndarray, src_ids: np.ndarray, dst_ids: np.ndarray) -> int:
    """Inliers counted so that one query or database feature is never counted twice."""
    if not mask.any():
        return 0
    return int(min(np.unique(src_ids[mask]).size, np.unique(dst_ids[mask]).size))


def ransac(src: np.ndarray, dst: np.ndarray, threshold: Union[float, np.ndarray],
           model: str = "homography", *, log_scale_ratio: Optional[np.ndarray] = None,
           scale_tolerance: float = 2.0, max_scale_change: float = 10.0,
           max_hypotheses: int = 1000, batch: int = 256, confidence: float = 0.999,
           lo_iterations: int = 4, seed: int = 0, src_ids: Optional[np.ndarray] = None,
           dst_ids: Optional[np.ndarray] = None) -> RansacResult:
    """Robustly fit ``model`` mapping src (n, 2) -> dst (n, 2) (pixel coordinates).

    threshold: reprojection error in dst pixels, a scalar or one per correspondence.
    log_scale_ratio: optional per-correspondence log of the scale change implied by the two
      features' scales (dst cell size / src cell size); a correspondence is an inlier only when
      the model's local scale there is within a factor ``scale_tolerance`` of it.
    max_scale_change: hypotheses whose local scale at the sample exceeds this factor (either
      way), or that mirror the image, are rejected before scoring.
    Hypotheses are drawn ``batch`` at a time from a seeded generator (deterministic), scored
    all at once (MSAC truncated quadratic cost), and sampling stops adaptively at the usual
    RANSAC confidence bound. The best model is then refitted on its inliers up to
    ``lo_iterations`` times while the inlier set grows (local optimisation).
    src_ids/dst_ids: feature ids of each correspondence, for the one-to-one inlier count.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} (expected one of {MODELS})")
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    n = len(src)
    if len(dst) != n:
        raise ValueError(f"ransac: {n} source points but {len(dst)} destination points")
    src_ids = np.ascontiguousarray(np.arange(n) if src_ids is None else src_ids, np.int64)
    dst_ids = np.ascontiguousarray(np.arange(n) if dst_ids is None else dst_ids, np.int64)
    s = _SAMPLE_SIZE[model]
    empty = RansacResult(None, np.zeros(n, bool), 0, 0)
    if n < s:
        return empty
    thr = np.broadcast_to(np.asarray(threshold, np.float64), (n,))
    thr2 = thr ** 2
    log_max = math.log(max_scale_change)
    src_h = np.concatenate([src, np.ones((n, 1))], axis=1)
    src_n, Ts = _hartley(src)
    dst_n, Td = _hartley(dst)
    Td_inv = np.linalg.inv(Td)
    rng = np.random.default_rng(seed)
    use_scale = log_scale_ratio is not None
    if use_scale:
        # |J| is an area ratio: the square of the linear scale ratio, within scale_tolerance.
        area_ratio = np.exp(2.0 * np.asarray(log_scale_ratio, np.float64))
        jac_lo, jac_hi = area_ratio / scale_tolerance ** 2, area_ratio * scale_tolerance ** 2
    else:
        jac_lo = jac_hi = np.zeros(n)
    src_c, dst_c = np.ascontiguousarray(src), np.ascontiguousarray(dst)
    thr2 = np.ascontiguousarray(thr2)

    def costs(H: np.ndarray) -> np.ndarray:
        return _msac_costs(np.ascontiguousarray(H), src_c, dst_c, thr2, jac_lo, jac_hi, use_scale)

    def inliers(H: np.ndarray) -> np.ndarray:
        return _inlier_mask(np.ascontiguousarray(H), src_c, dst_c, thr2, jac_lo, jac_hi, use_scale)

    def local_optimisation(H: np.ndarray, cost: float, mask: np.ndarray):
        """Least-squares refits on the inliers, kept while the inlier set grows (LO-RANSAC)."""
        for _ in range(lo_iterations):
            if mask.sum() < s:
                break
            H_new = fit_model(src[mask], dst[mask], model)
            if H_new is None:
                break
            if np.median(H_new[2] @ src_h[mask].T) < 0:
                H_new = -H_new
            cost_new, mask_new = costs(H_new[None])[0], inliers(H_new)
            if cost_new >= cost and mask_new.sum() <= mask.sum():
                break
            grew = mask_new.sum() > mask.sum()
            H, cost, mask = H_new, cost_new, mask_new
            if not grew:
                break
        return H, cost, mask

    best_cost, best_mask, best_H = np.inf, None, None
    tried = 0
    needed = max_hypotheses
    while tried < min(needed, max_hypotheses):
        b = min(batch, max_hypotheses - tried)
        idx = rng.integers(0, n, size=(b, s))
        tried += b
        cost, H = _sample_models(idx, src_n, dst_n, Ts, Td_inv, src_c, dst_c, thr2, jac_lo, jac_hi,
                                 use_scale, src_ids, dst_ids, model == "affine", log_max)
        i = int(np.argmin(cost))
        if cost[i] < best_cost and np.isfinite(cost[i]):
            best_H, best_cost, best_mask = local_optimisation(H[i], cost[i], inliers(H[i]))
            inlier_ratio = best_mask.sum() / n
            if inlier_ratio >= 1.0:
                needed = tried
            elif inlier_ratio > 0:
                needed = int(math.ceil(math.log(1 - confidence) / math.log(1 - inlier_ratio ** s)))
    if best_H is None:
        return RansacResult(None, np.zeros(n, bool), 0, tried)
    best_H = best_H / best_H[2, 2] if abs(best_H[2, 2]) > 1e-12 else best_H
    return RansacResult(best_H, best_mask, _count_one_to_one(best_mask, src_ids, dst_ids), tried)


# ---------------------------------------------------------------------------------------------
# Tentative correspondences
# ---------------------------------------------------------------------------------------------

def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@numba.njit(cache=True, nogil=True)
def _row_and_column_argmax(sim):
    """argmax of every row and every column of a C-ordered matrix in one pass over memory
    (numpy's argmax over axis 0 strides across rows and costs several times more)."""
    n, m = sim.shape
    row_best = np.zeros(n, np.int64)
    col_best = np.zeros(m, np.int64)
    col_max = np.full(m, -np.inf, np.float32)
    for i in range(n):
        best = -np.inf
        for j in range(m):
            v = sim[i, j]
            if v > best:
                best = v
                row_best[i] = j
            if v > col_max[j]:
                col_max[j] = v
                col_best[j] = i
    return row_best, col_best


def mutual_nearest_neighbours(query_desc: np.ndarray, db_desc: np.ndarray, min_similarity: float = 0.0
                              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual nearest neighbours of two L2-normalised descriptor sets by cosine similarity.

    Returns (query_ids, db_ids, similarity) of the pairs that are each other's nearest
    neighbour with similarity >= min_similarity.
    """
    if not len(query_desc) or not len(db_desc):
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    sim = np.ascontiguousarray(np.asarray(query_desc, np.float32) @ np.asarray(db_desc, np.float32).T)
    best_db, best_query = _row_and_column_argmax(sim)
    q = np.flatnonzero(best_query[best_db] == np.arange(len(query_desc)))
    d = best_db[q]
    s = sim[q, d]
    keep = s >= min_similarity
    return q[keep], d[keep], s[keep]


def shared_word_matches(query_words: np.ndarray, db_words: np.ndarray, query_desc: np.ndarray,
                        db_desc: np.ndarray, min_similarity: float = 0.0, max_per_word: int = 64
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mutual nearest neighbours among the features that share a visual word.

    query_words (n, k): the query features' words (multiple assignment); db_words (m,): the
    database features' words; query_desc, db_desc: their L2-normalised descriptors. Only pairs
    (i, j) with db_words[j] among query i's words are compared (the quantisation prunes the
    n x m similarity matrix); of those, pairs that are each other's most similar (cosine) and
    have similarity >= min_similarity are kept. Words holding more than ``max_per_word``
    database features are skipped (bursts). Returns (query_ids, db_ids, similarity).
    """
    query_words = np.asarray(query_words).reshape(len(query_desc), -1)
    n, k = query_words.shape
    order = np.argsort(db_words, kind="stable")
    sorted_words = db_words[order]
    flat_words = query_words.ravel()
    lo = np.searchsorted(sorted_words, flat_words, "left")
    counts = np.searchsorted(sorted_words, flat_words, "right") - lo
    counts[counts > max_per_word] = 0
    total = int(counts.sum())
    if total == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    # Expand every (query feature, word) into its run of database features with that word.
    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    db_ids = order[np.repeat(lo, counts) + within]
    query_ids = np.repeat(np.arange(n * k) // k, counts)
    sim = np.einsum("ij,ij->i", query_desc[query_ids], db_desc[db_ids])
    keep = sim >= min_similarity
    query_ids, db_ids, sim = query_ids[keep], db_ids[keep], sim[keep].astype(np.float32)
    # Mutual best: a pair survives when it comes first for its query feature and for its
    # database feature in the order of decreasing similarity (a pair found through two
    # shared words is the same pair twice; either copy may survive, never both).
    by_sim = np.argsort(-sim, kind="stable")
    first_q = np.zeros(len(sim), bool)
    first_q[by_sim[np.unique(query_ids[by_sim], return_index=True)[1]]] = True
    first_d = np.zeros(len(sim), bool)
    first_d[by_sim[np.unique(db_ids[by_sim], return_index=True)[1]]] = True
    mutual = first_q & first_d
    return query_ids[mutual], db_ids[mutual], sim[mutual]


def scale_consistent(log_scale_ratio: np.ndarray, tolerance: float = 2.0) -> np.ndarray:
    """Mask of correspondences whose scale change agrees (within a factor ``tolerance``) with
    the most common one: a 1-D Hough vote on the log scale ratio, a cheap RANSAC prefilter."""
    n = len(log_scale_ratio)
    if n == 0:
        return np.zeros(0, bool)
    width = math.log(tolerance)
    ordered = np.sort(log_scale_ratio)
    # Number of ratios in [r, r + 2 width] for every r: the densest window wins.
    upper = np.searchsorted(ordered, ordered + 2 * width, "right")
    start = int(np.argmax(upper - np.arange(n)))
    centre = 0.5 * (ordered[start] + ordered[upper[start] - 1])
    return np.abs(log_scale_ratio - centre) <= width


# ---------------------------------------------------------------------------------------------
# The reranker
# ---------------------------------------------------------------------------------------------

@dataclass
class SpatialParams:
    """Settings of spatial verification.

    Defaults were chosen on ../shared/data/museum (subset of 18 distractor + 49 positive
    queries, global top-100; separation = AUC of the top inlier count, positive vs distractor
    queries): ``max_per_word`` 16 -> 256 lifts it from 0.76 to 0.95 (bursts of neighbouring
    cells hold the true pairs); ``min_similarity`` 0.5 / 0.6 / 0.7 gives 0.94 / 0.95 / 0.94
    (0.6 leaves wrong candidates a median of 10 inliers, true matches 200); ``threshold`` 0.5 /
    1 / 1.5 cells gives 0.91 / 0.95 / 0.95; affine vs homography, and the scale prefilter and
    check, change it by < 0.01 there (frontal photos) and are kept for oblique views.
    ``min_similarity`` is a cosine of the extractor's whitened descriptors: re-check it when
    the extractor changes.

    matching: "mnn" (mutual nearest neighbours of all descriptors) or "words" (mutual nearest
      neighbours among features sharing a visual word: no n x m similarity matrix).
    model: "homography" or "affine".
    min_similarity: lowest cosine similarity of a pair (of L2-normalised descriptors);
      max_per_word: for "words", words with more database features are skipped.
    max_correspondences: the most similar pairs kept for RANSAC.
    threshold: inlier reprojection error, in cells of the database feature (a feature's cell is
      stride / scale pixels of the input, mapped to the original image: coarse features are
      localised less precisely); min_threshold: floor as a fraction of the image diagonal.
    scale_prefilter: keep only pairs whose scale ratio agrees with the dominant one (1-D vote).
    scale_tolerance: factor within which a pair's scale ratio must agree (prefilter and inliers);
      scale_check: also require it of each inlier against the model's local scale.
    max_scale_change: hypotheses that scale by more than this (or mirror) are rejected.
    max_hypotheses, lo_iterations, seed: RANSAC budget, local-optimisation refits, RNG seed.
    """

    matching: str = "words"
    model: str = "homography"
    min_similarity: float = 0.6
    max_per_word: int = 256
    max_correspondences: int = 1000
    threshold: float = 1.0
    min_threshold: float = 0.005
    scale_prefilter: bool = True
    scale_check: bool = True
    scale_tolerance: float = 2.0
    max_scale_change: float = 10.0
    max_hypotheses: int = 1000
    lo_iterations: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.matching not in ("mnn", "words"):
            raise ValueError(f"spatial matching must be 'mnn' or 'words', got {self.matching!r}")
        if self.model not in MODELS:
            raise ValueError(f"spatial model must be one of {MODELS}, got {self.model!r}")


@dataclass
class _ImageData:
    """What the reranker needs of one image (query or candidate), computed once."""

    words: np.ndarray            # (m,) sorted unique visual words of the aggregated vectors
    codes: np.ndarray            # (m, 2) uint64 packed sign codes of the aggregated residuals
    keypoints: np.ndarray        # (n, 2) float64 image coordinates
    cells: np.ndarray            # (n,) cell size of each feature in original-image pixels
    diagonal: float              # original image diagonal in pixels
    unit_descriptors: np.ndarray  # (n, D) float32 L2-normalised descriptors
    feature_words: np.ndarray     # (n, k) words of each feature (query) or (n,) (candidate)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.words, self.codes, self.keypoints, self.cells,
                                      self.unit_descriptors, self.feature_words))


def _open_store(store) -> Tuple[FeatureStore, bool]:
    if isinstance(store, FeatureStore):
        return store, False
    return FeatureStore(store, "r"), True


class Reranker:
    """Score a query against a shortlist of database images with local features.

    store: FeatureStore (or its path) holding the database images' local features.
    codebook: the ``how_met.codebook.Codebook`` (or its path) the ASMK index was built with.
    stride: feature-map stride in pixels (default: the store's extractor config).
    multiple_assignment, alpha, tau: ASMK query assignment and selective kernel.
    use_idf: idf-weighted ASMK scores; the idf needs the whole database, so it comes from
      ``index`` (or pass the per-word weights as ``idf``).
    index: optional ``InvertedFile`` (or path) of the same database: its alpha, tau, use_idf and
      idf are used, so the ASMK score equals what its search gives for the pair.
    spatial: :class:`SpatialParams` of the verification; weights: default
      :class:`FusionWeights`.
    cache_mb: bound of the LRU cache of prepared candidates (quantised + aggregated).

    ``rerank`` costs one query quantisation plus, per candidate, a cache lookup (or one
    database read and quantisation), a word intersection and, when verifying, one descriptor
    matching and one RANSAC. Candidates are quantised exactly as ``how_met.ivf.build_index``
    does (1 assignment, ``asmk.aggregate``), queries as ``how_met.query`` does.
    """

    def __init__(self, store, codebook, stride: Optional[float] = None, multiple_assignment: int = 5,
                 alpha: float = asmk.DEFAULT_ALPHA, tau: float = asmk.DEFAULT_TAU,
                 use_idf: bool = False, idf: Optional[np.ndarray] = None, index=None,
                 spatial: Optional[SpatialParams] = None, weights: Optional["FusionWeights"] = None,
                 cache_mb: float = 512.0):
        self.codebook = _load_codebook(codebook)
        self.centroids = np.ascontiguousarray(_centroids(self.codebook), np.float32)
        if index is not None:
            index = _load_index(index, self.codebook)
            if not index.binary:
                raise ValueError(f"{index.path or 'the inverted file'}: the reranker scores binary "
                                 f"ASMK; this index holds float residuals")
            alpha, tau, use_idf = index.alpha, index.tau, index.use_idf
            if use_idf and idf is None:
                idf = index.idf()
        if use_idf and idf is None:
            raise ValueError("use_idf needs the database's idf: pass index= (or idf=)")
        self.store, self._owns_store = _open_store(store)
        if stride is None:
            stride = self.store.config.get("stride")
            if stride is None:
                self.close()
                raise ValueError(f"{self.store.path}: extractor config has no 'stride'; pass stride=")
        self.stride = float(stride)
        self.multiple_assignment = int(multiple_assignment)
        self.alpha, self.tau = float(alpha), float(tau)
        self._kernel_table = asmk.kernel_table(self.centroids.shape[1], self.alpha, self.tau)
        self.idf = None if idf is None else np.asarray(idf, np.float64)
        if self.idf is not None and len(self.idf) != len(self.centroids):
            raise ValueError(f"idf has {len(self.idf)} weights for {len(self.centroids)} visual words")
        self.spatial = spatial or SpatialParams()
        self.weights = weights or FusionWeights()
        self.cache_bytes = int(cache_mb * 2 ** 20)
        self._cache: "OrderedDict[str, _ImageData]" = OrderedDict()
        self._cached_bytes = 0
        self.cache_hits = self.cache_misses = 0

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> "Reranker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def clear_cache(self) -> None:
        """Forget every prepared candidate."""
        self._cache.clear()
        self._cached_bytes = 0

    # -- per-image preparation -------------------------------------------------------------------
    def _prepare(self, feats: LocalFeatures, k: int, name: str) -> _ImageData:
        desc = np.ascontiguousarray(feats.descriptors, np.float32)
        if desc.ndim != 2 or desc.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"{name}: descriptors {desc.shape} do not match the codebook's "
                             f"dimension {self.centroids.shape[1]}")
        words = _assign(self.codebook, desc, min(k, len(self.centroids)))
        aggregated = asmk.aggregate(desc, words, self.centroids)  # sorted by word (one image)
        zoom = np.asarray(feats.image_size, np.float64) / np.asarray(feats.input_size, np.float64)
        cells = self.stride / np.asarray(feats.scales, np.float64) * float(zoom.mean())
        return _ImageData(words=aggregated.words, codes=aggregated.vectors,
                          keypoints=np.asarray(feats.keypoints(self.stride), np.float64),
                          cells=cells, diagonal=float(np.hypot(*feats.image_size)),
                          unit_descriptors=_l2_normalise(desc),
                          feature_words=np.ascontiguousarray(words.reshape(len(desc), -1)))

    def prepare_query(self, query: LocalFeatures, name: str = "query") -> _ImageData:
        """Quantise (multiple assignment) and aggregate a query once for several rerank calls."""
        return self._prepare(query, self.multiple_assignment, name)

    def candidate(self, key: str) -> _ImageData:
        """The prepared database image ``key`` (from the LRU cache, or read and quantised)."""
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return data
        self.cache_misses += 1
        data = self._prepare(self.store.read(key, with_global=False), 1, f"{self.store.path}:{key}")
        data.feature_words = np.ascontiguousarray(data.feature_words[:, 0])
        self._cache[key] = data
        self._cached_bytes += data.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return data

    # -- scores -----------------------------------------------------------------------------------
    def _norm(self, words: np.ndarray) -> float:
        return float(np.sqrt(self.idf[words].sum() if self.idf is not None else len(words)))

    def asmk_scores(self, query: _ImageData, candidates: Sequence[_ImageData]) -> np.ndarray:
        """Exact ASMK similarity of the query with each candidate (all candidates at once)."""
        if not candidates:
            return np.zeros(0, np.float32)
        owner = np.repeat(np.arange(len(candidates)), [len(c.words) for c in candidates])
        words = np.concatenate([c.words for c in candidates])
        codes = np.concatenate([c.codes for c in candidates])
        pos = np.minimum(np.searchsorted(query.words, words), max(len(query.words) - 1, 0))
        hit = query.words[pos] == words if len(query.words) else np.zeros(len(words), bool)
        # The inverted file's kernel: a table over Hamming distances (same float values).
        kernel = self._kernel_table[asmk.hamming(query.codes[pos[hit]], codes[hit])]
        if self.idf is not None:
            kernel = kernel * self.idf[words[hit]]
        sums = np.bincount(owner[hit], weights=kernel, minlength=len(candidates))
        norms = np.array([self._norm(c.words) for c in candidates]) * self._norm(query.words)
        return (sums / np.maximum(norms, 1e-12)).astype(np.float32)

    def correspondences(self, query: _ImageData, cand: _ImageData
                        ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tentative (query_ids, db_ids, similarity), the best ``max_correspondences`` of them."""
        p = self.spatial
        if p.matching == "mnn":
            q, d, s = mutual_nearest_neighbours(query.unit_descriptors, cand.unit_descriptors,
                                                p.min_similarity)
        else:
            q, d, s = shared_word_matches(query.feature_words, cand.feature_words, query.unit_descriptors,
                                          cand.unit_descriptors, p.min_similarity, p.max_per_word)
        if len(s) > p.max_correspondences:
            top = np.argsort(-s, kind="stable")[:p.max_correspondences]
            q, d, s = q[top], d[top], s[top]
        return q, d, s

    def verify(self, query: _ImageData, cand: _ImageData) -> Tuple[RansacResult, int]:
        """Spatial verification of one pair: (RANSAC result, number of tentative correspondences).

        The model maps query keypoints onto candidate keypoints; the result's inlier mask is
        over the (prefiltered) tentative correspondences.
        """
        p = self.spatial
        q, d, _ = self.correspondences(query, cand)
        tentative = len(q)
        # Scale change implied by the two features: database cell over query cell.
        log_ratio = np.log(cand.cells[d]) - np.log(query.cells[q])
        if p.scale_prefilter and len(q):
            keep = scale_consistent(log_ratio, p.scale_tolerance)
            q, d, log_ratio = q[keep], d[keep], log_ratio[keep]
        threshold = np.maximum(p.threshold * cand.cells[d], p.min_threshold * cand.diagonal)
        result = ransac(query.keypoints[q], cand.keypoints[d], threshold, p.model,
                        log_scale_ratio=log_ratio if p.scale_check else None,
                        scale_tolerance=p.scale_tolerance, max_scale_change=p.max_scale_change,
                        max_hypotheses=p.max_hypotheses, lo_iterations=p.lo_iterations, seed=p.seed,
                        src_ids=q, dst_ids=d)
        return result, tentative

    def score_candidates(self, query: Union[LocalFeatures, _ImageData], candidate_keys: Sequence[str],
                         verify: bool = True) -> Tuple[np.ndarray, np.ndarray, List[dict]]:
        """ASMK scores (m,), inlier counts (m,) (0 without verification) and per-candidate
        details for the candidates, in the given order."""
        if isinstance(query, LocalFeatures):
            query = self.prepare_query(query)
        cands = [self.candidate(key) for key in candidate_keys]
        asmk = self.asmk_scores(query, cands)
        inliers = np.zeros(len(cands), np.int32)
        details = [{"asmk": float(a)} for a in asmk]
        if verify:
            for i, cand in enumerate(cands):
                result, tentative = self.verify(query, cand)
                inliers[i] = result.inliers
                details[i].update(inliers=int(result.inliers), tentative=int(tentative),
                                  model=result.model)
        return asmk, inliers, details

    def rerank(self, query_features: Union[LocalFeatures, _ImageData], candidate_keys: Sequence[str],
               global_scores: Optional[Sequence[float]] = None, verify: bool = True,
               weights: Optional["FusionWeights"] = None) -> List[Tuple[str, float, dict]]:
        """Rerank ``candidate_keys`` for one query.

        Returns ``[(key, fused score, details)]`` sorted by score (descending, ties in input
        order); details holds "global" (when given), "asmk", and with ``verify`` "inliers",
        "tentative" (correspondences before RANSAC) and "model" (3x3 query -> candidate map
        in image coordinates, or None).
        """
        candidate_keys = list(candidate_keys)
        if global_scores is not None and len(global_scores) != len(candidate_keys):
            raise ValueError(f"{len(global_scores)} global scores for {len(candidate_keys)} candidates")
        asmk, inliers, details = self.score_candidates(query_features, candidate_keys, verify)
        glob = np.zeros(len(candidate_keys)) if global_scores is None else np.asarray(global_scores, np.float64)
        if global_scores is not None:
            for det, g in zip(details, glob):
                det["global"] = float(g)
        fused = fuse_scores(glob, asmk, inliers, weights or self.weights)
        order = np.argsort(-fused, kind="stable")
        return [(candidate_keys[i], float(fused[i]), details[i]) for i in order]


def _load_codebook(codebook):
    if isinstance(codebook, (str, Path)):
        from .codebook import Codebook
        return Codebook.load(codebook)
    return codebook


def _load_index(index, codebook):
    if isinstance(index, (str, Path)):
        from .ivf import InvertedFile
        index = InvertedFile.load(index, mmap=True)
    fingerprint = getattr(codebook, "fingerprint", None)
    if index.codebook_fingerprint and fingerprint and index.codebook_fingerprint != fingerprint:
        raise ValueError(f"{index.path or 'the inverted file'}: was built with another codebook "
                         f"(fingerprint {index.codebook_fingerprint}, given {fingerprint})")
    return index


def _centroids(codebook) -> np.ndarray:
    for name in ("centroids", "centers", "centres"):
        value = getattr(codebook, name, None)
        if value is not None:
            return np.asarray(value)
    raise TypeError(f"codebook {type(codebook).__name__} has no centroids")


def _assign(codebook, descriptors: np.ndarray, k: int) -> np.ndarray:
    """(n, k) int64 nearest visual words of each descriptor (codebook.assign may also return distances)."""
    words = codebook.assign(descriptors, k)
    if isinstance(words, tuple):
        words = words[0]
    return np.asarray(words, np.int64).reshape(len(descriptors), -1)


# ---------------------------------------------------------------------------------------------
# Score fusion and its tuning
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FusionWeights:
    """fused = global_weight * global + asmk_weight * asmk + inlier_weight * r(inliers), with the
    saturating inlier term r(n) = x / (x + inlier_half), x = max(n - min_inliers, 0), in [0, 1):
    a RANSAC fit always finds its minimal sample, and beyond a few dozen inliers more only
    says "yes" more loudly."""

    global_weight: float = 1.0
    asmk_weight: float = 1.0
    inlier_weight: float = 1.0
    inlier_half: float = 10.0
    min_inliers: int = 4

    def as_dict(self) -> dict:
        return {"global_weight": self.global_weight, "asmk_weight": self.asmk_weight,
                "inlier_weight": self.inlier_weight, "inlier_half": self.inlier_half,
                "min_inliers": self.min_inliers}


def inlier_term(inliers, inlier_half: float = 10.0, min_inliers: int = 4) -> np.ndarray:
    """Saturating map of inlier counts to [0, 1) (see FusionWeights)."""
    x = np.maximum(np.asarray(inliers, np.float64) - min_inliers, 0.0)
    return x / (x + max(float(inlier_half), 1e-12))


def fuse_scores(global_scores, asmk_scores, inliers, weights: Optional[FusionWeights] = None) -> np.ndarray:
    """One score from global similarity, ASMK score and inlier count (arrays of one shape)."""
    w = weights or FusionWeights()
    fused = w.asmk_weight * np.asarray(asmk_scores, np.float64)
    if w.global_weight:
        fused = fused + w.global_weight * np.asarray(global_scores, np.float64)
    if w.inlier_weight:
        fused = fused + w.inlier_weight * inlier_term(inliers, w.inlier_half, w.min_inliers)
    return fused


# ---------------------------------------------------------------------------------------------
# Batch reranking of neighbour lists, and tuning the fusion on validation queries
# ---------------------------------------------------------------------------------------------

@dataclass
class ShortlistScores:
    """The score components of a reranked shortlist, kept apart so that fusion weights can be
    tuned without re-running the verification. All arrays are (nq, k) in shortlist order;
    padding (index -1) has global score -inf, ASMK 0 and 0 inliers."""

    query_keys: List[str]
    db_keys: Sequence[str]
    indices: np.ndarray
    global_scores: np.ndarray
    asmk: np.ndarray
    inliers: np.ndarray

    def fused(self, weights: Optional[FusionWeights] = None) -> np.ndarray:
        """(nq, k) fused scores, -inf at padding."""
        glob = np.where(self.indices >= 0, self.global_scores, 0.0)
        glob = np.where(np.isfinite(glob), glob, 0.0)
        fused = fuse_scores(glob, self.asmk, self.inliers, weights)
        return np.where(self.indices >= 0, fused, -np.inf)

    def fuse(self, weights: Optional[FusionWeights] = None, k: Optional[int] = None):
        """Neighbours sorted by the fused score (ties keep the shortlist order)."""
        from .neighbours import Neighbours

        fused = self.fused(weights)
        order = np.argsort(-fused, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(fused, order, axis=1)
        indices = np.where(np.isfinite(scores), np.take_along_axis(self.indices, order, axis=1), -1)
        return Neighbours(self.query_keys, self.db_keys, indices.astype(np.int64), scores.astype(np.float32))


def score_shortlist(reranker: Reranker, query_store, shortlist, verify: bool = True,
                    show_progress: bool = True) -> ShortlistScores:
    """Score every (query, candidate) pair of a ``Neighbours`` shortlist with ``reranker``.

    query_store: FeatureStore (or path) with the local features of ``shortlist.query_keys``.
    The shortlist's scores are taken as the global similarities.
    """
    from .utils import progress

    store, owned = _open_store(query_store)
    try:
        indices = np.asarray(shortlist.indices, np.int64)
        global_scores = np.asarray(shortlist.scores, np.float32)
        db_keys = shortlist.db_keys
        asmk = np.zeros(indices.shape, np.float32)
        inliers = np.zeros(indices.shape, np.int32)
        query_keys = list(shortlist.query_keys)
        for row, qkey in enumerate(progress(query_keys, desc="rerank", unit="query",
                                            disable=None if show_progress else True)):
            valid = np.flatnonzero(indices[row] >= 0)
            if not len(valid):
                continue
            try:
                feats = store.read(qkey, with_global=False)
            except KeyError:
                raise KeyError(f"{store.path}: no local features for query {qkey!r}") from None
            query = reranker.prepare_query(feats, f"{store.path}:{qkey}")
            keys = [db_keys[i] for i in indices[row, valid]]
            a, n, _ = reranker.score_candidates(query, keys, verify)
            asmk[row, valid] = a
            inliers[row, valid] = n
        return ShortlistScores(query_keys, db_keys, indices, global_scores, asmk, inliers)
    finally:
        if owned:
            store.close()


def rerank_neighbours(reranker: Reranker, query_store, shortlist, verify: bool = True,
                      weights: Optional[FusionWeights] = None, k: Optional[int] = None,
                      show_progress: bool = True):
    """Rerank a ``Neighbours`` shortlist (e.g. a global top-100): returns Neighbours sorted by
    the fused score (weights default to the reranker's)."""
    scores = score_shortlist(reranker, query_store, shortlist, verify, show_progress)
    return scores.fuse(weights or reranker.weights, k)


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


def tune_fusion_weights(scores: ShortlistScores, db_labels=None, query_labels=None,
                        objective: Optional[Callable[..., float]] = None,
                        grid: Optional[Dict[str, Sequence[float]]] = None, n_classes: Optional[int] = None,
                        min_inliers: int = 4) -> dict:
    """Grid-search the fusion weights on validation queries.

    With ``db_labels`` (class of every database image) and ``query_labels`` (-1 = distractor),
    each grid point is scored by the best GAP of the kNN classifier over its (K, t) grid
    (``how_met.knn.tune``), so weights, K and t are chosen together. Otherwise ``objective``
    (a callable taking the fused ``Neighbours`` and returning a value to maximise) is used.
    Returns ``{"weights": FusionWeights, "value": best objective, "K", "t" (kNN only),
    "grid": [(weights dict, value), ...]}``; the first best grid point wins.
    """
    candidates = fusion_grid(grid, min_inliers)
    use_knn = objective is None
    if use_knn:
        if db_labels is None or query_labels is None:
            raise ValueError("tune_fusion_weights needs db_labels and query_labels, or an objective")
        from . import knn
    best, table = None, []
    for weights in candidates:
        if use_knn:
            fused = scores.fused(weights)
            (K, t), gap_grid = knn.tune(scores.indices, fused, db_labels, query_labels, n_classes)
            value, extra = float(gap_grid.max()), {"K": K, "t": t}
        else:
            value, extra = float(objective(scores.fuse(weights))), {}
        table.append((weights.as_dict(), value))
        if best is None or value > best["value"]:
            best = {"weights": weights, "value": value, **extra}
    best["grid"] = table
    return best


def cross_tune_fusion_weights(scores: ShortlistScores, db_labels, query_labels,
                              grid: Optional[Dict[str, Sequence[float]]] = None,
                              n_classes: Optional[int] = None, folds: int = 2, seed: int = 0,
                              min_inliers: int = 4) -> dict:
    """k-fold cross-tuning of (fusion weights, K, t) for a set with a single query split, like
    ``how_met.knn.cross_tune``: tuned on all folds but one, measured on that one, averaged.
    Each per-fold entry carries the chosen weights (fields of FusionWeights)."""
    from . import knn

    n_classes = knn.count_classes(db_labels) if n_classes is None else int(n_classes)
    candidates = [(w.as_dict(), knn._neighbour_classes(scores.indices, scores.fused(w), db_labels))
                  for w in fusion_grid(grid, min_inliers)]
    return knn._cross_tune(candidates, query_labels, n_classes, knn.DEFAULT_KS, knn.DEFAULT_TS, folds, seed)
