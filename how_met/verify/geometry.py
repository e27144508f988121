"""Geometric verification: minimal solvers, hypothesis scoring and RANSAC.

RANSAC works in image coordinates fitting a homography (4 points, closed form in
Hartley-normalised coordinates; least-squares refits by normalised DLT) or an affine map (3
points). Hypotheses are drawn in batches from a seeded generator and fitted and scored a batch
at a time in one compiled (numba) call, the best is refined on its inliers (LO-RANSAC) and
sampling stops at the usual confidence bound. The inlier count is one-to-one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import numba
import numpy as np

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


def count_one_to_one(mask: np.ndarray, src_ids: np.ndarray, dst_ids: np.ndarray) -> int:
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
    return RansacResult(best_H, best_mask, count_one_to_one(best_mask, src_ids, dst_ids), tried)

