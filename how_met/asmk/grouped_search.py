"""Grouped word assignment: exact distances to the words of each descriptor's nearest groups.

The K centroids are partitioned into G groups by a k-means of the centroids themselves (seeded:
the same groups from the same centroids). A descriptor is compared with the ``probes`` groups
whose group centroids are nearest to it, and with every word of those groups, exactly. The work
is arranged as matrix products: one product of the descriptors with the G group centroids, then,
per group, ONE product of all the descriptors that probe it with that group's words (a
contiguous block of centroids, which stays in cache for all of them), merged into each
descriptor's running top-k by a numba kernel that skips a descriptor's block in one vectorised
pass when no word of it beats its current k-th distance.

Why not faiss IVF, which has the same structure: faiss scans each probed list once per
descriptor (the list's centroids are read again for every descriptor), so its 1,024 lists x 64
probes cost about as much as exact search here; grouping the descriptors per list turns those
reads into one matrix product per list (README "Fidelity: word assignment").
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import faiss
import numpy as np
from numba import njit
from threadpoolctl import threadpool_limits

WORDS_PER_GROUP = 64   # G = K / 64 groups (1,024 for 65,536 words)
# Groups searched per descriptor. 65,536 real HOW words (README "Fidelity: word assignment"):
# recall@5 / top-1 0.986 / 0.997 at 48 probes, 0.991 / 0.998 at 64, 0.995 / 0.999 at 80 (~17% of
# the words scanned: the groups are unequal and the dense ones are probed most), 0.996 / 0.999 at 96
DEFAULT_PROBES = 80
GROUP_ITERATIONS = 10
# Descriptors searched together: their rows are gathered once per probed group, so the batch
# should stay in cache; measured CPU per 1000 descriptors (65k words, 80 probes, real
# descriptors): 67 / 65 / 66 / 72 / 85 ms for parts of 1,000 / 2,000 / 4,000 / 8,000 / 32,000
PART_DESCRIPTORS = 3000


def group_count(n_words: int) -> int:
    return int(max(1, n_words // WORDS_PER_GROUP))


def train_groups(centroids: np.ndarray, n_groups: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(group centroids (G, d) float32, group of every word (K,) int32): seeded faiss k-means of
    the centroids, each word in the group of its nearest group centroid."""
    centroids = np.ascontiguousarray(centroids, np.float32)
    n_groups = int(min(max(1, n_groups), len(centroids)))
    kmeans = faiss.Kmeans(centroids.shape[1], n_groups, niter=GROUP_ITERATIONS, seed=int(seed), verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=len(centroids))
    kmeans.train(centroids)
    group_centroids = np.ascontiguousarray(kmeans.centroids, np.float32)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(group_centroids)
    _, groups = index.search(centroids, 1)
    return group_centroids, groups[:, 0].astype(np.int32)


def check_groups(group_centroids: np.ndarray, word_group: np.ndarray, n_words: int, dim: int) -> Optional[str]:
    """Why the stored grouping cannot be used with these centroids (None if it can)."""
    if group_centroids.ndim != 2 or group_centroids.shape[1] != dim or len(group_centroids) < 1:
        return f"group centroids of shape {group_centroids.shape} for {dim}-D words"
    if word_group.shape != (n_words,) or word_group.dtype.kind not in "iu":
        return f"word groups of shape {word_group.shape} ({word_group.dtype}) for {n_words} words"
    if n_words and (word_group.min() < 0 or word_group.max() >= len(group_centroids)):
        return "word groups outside [0, number of groups)"
    if not np.isfinite(group_centroids).all():
        return "group centroids are not finite"
    return None


SELECT_CHUNK = 8  # groups per chunk whose minimum bounds the selection (see _nearest_groups)


@njit(cache=True, nogil=True, inline="always")
def _kth_smallest(a, n, k):
    """The k-th smallest (0-based) of a[:n], reordering a[:n]: Hoare's quickselect with a median
    of 3, in place (np.partition copies: 2.5x slower on the 128 minima of _nearest_groups)."""
    lo, hi = 0, n - 1
    while lo < hi:
        x, y, z = a[lo], a[(lo + hi) >> 1], a[hi]
        pivot = max(min(x, y), min(max(x, y), z))
        i, j = lo, hi
        while i <= j:
            while i < hi and a[i] < pivot:  # the index bounds: NaN may not run off the end
                i += 1
            while j > lo and a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@njit(cache=True, nogil=True)
def _nearest_groups(scores, group_norms, probes):
    """(n, probes) groups of smallest ||g||^2 - 2 x.g of each row of scores (n, G) = x . g
    (ties: the lower group id), in group order. The probes-th smallest of the minima of chunks of
    SELECT_CHUNK groups bounds the probes-th smallest distance from above, so only the groups
    under that bound (typically ~2 x probes) are partitioned: ~4x cheaper than a partition (or a
    heap) of all G distances per row."""
    n, n_groups = scores.shape
    out = np.empty((n, probes), np.int64)
    dist = np.empty(n_groups, np.float32)
    n_chunks = n_groups // SELECT_CHUNK
    minima = np.empty(max(n_chunks, 1), np.float32)
    candidates = np.empty(n_groups, np.float32)
    two = np.float32(2.0)
    for i in range(n):
        for g in range(n_groups):
            dist[g] = group_norms[g] - two * scores[i, g]
        if n_chunks >= probes:
            for c in range(n_chunks):
                m = dist[c * SELECT_CHUNK]
                for g in range(c * SELECT_CHUNK + 1, (c + 1) * SELECT_CHUNK):
                    m = min(m, dist[g])
                minima[c] = m
            bound = _kth_smallest(minima, n_chunks, probes - 1)
        else:
            bound = np.float32(np.inf)
        count = 0
        for g in range(n_groups):
            if dist[g] <= bound:
                candidates[count] = dist[g]
                count += 1
        threshold = _kth_smallest(candidates, count, probes - 1)
        c = 0
        for g in range(n_groups):
            if dist[g] < threshold:
                out[i, c] = g
                c += 1
        for g in range(n_groups):
            if c == probes:
                break
            if dist[g] == threshold:
                out[i, c] = g
                c += 1
    return out


@njit(cache=True, nogil=True)
def _rows_by_group(probes, n_groups):
    """Counting sort of (descriptor, probed group) pairs by group: (offsets (G + 1,), rows)."""
    n, p = probes.shape
    offsets = np.zeros(n_groups + 1, np.int64)
    for i in range(n):
        for j in range(p):
            offsets[probes[i, j] + 1] += 1
    for g in range(n_groups):
        offsets[g + 1] += offsets[g]
    cursor = offsets[:-1].copy()
    rows = np.empty(n * p, np.int64)
    for i in range(n):
        for j in range(p):
            g = probes[i, j]
            rows[cursor[g]] = i
            cursor[g] += 1
    return offsets, rows


@njit(cache=True, nogil=True)
def insert_sorted(best_d, best_i, row, d, word):
    """Insert (d, word) into row ``row`` of the ascending running best (d below its last: the
    caller checked), ties after the equal ones already there; returns the new last."""
    pos = best_d.shape[1] - 1
    while pos > 0 and best_d[row, pos - 1] > d:
        best_d[row, pos] = best_d[row, pos - 1]
        best_i[row, pos] = best_i[row, pos - 1]
        pos -= 1
    best_d[row, pos] = d
    best_i[row, pos] = word
    return best_d[row, best_d.shape[1] - 1]


@njit(cache=True, nogil=True)
def _merge_block(scores, word_norms, rows, first_word, best_d, best_i):
    """Distances ||c||^2 - 2 x.c of a block of words (scores (r, m) = x . c) into the running
    top-k of each row's descriptor (ascending distance; ties keep the earlier word)."""
    k = best_d.shape[1]
    m = scores.shape[1]
    two = np.float32(2.0)
    for r in range(scores.shape[0]):
        row = rows[r]
        worst = best_d[row, k - 1]
        # most blocks hold no word of the descriptor's top k: one vectorised count skips them (a
        # running minimum would not vectorise, its NaN rules fixing the order: 3.5x slower)
        below = 0
        for j in range(m):
            below += word_norms[j] - two * scores[r, j] < worst
        if below == 0:
            continue
        for j in range(m):
            d = word_norms[j] - two * scores[r, j]
            if d < worst:
                worst = insert_sorted(best_d, best_i, row, d, first_word + j)


class GroupedSearch:
    """Nearest words by the grouped search over ``centroids`` grouped by ``word_group``."""

    def __init__(self, centroids: np.ndarray, group_centroids: np.ndarray, word_group: np.ndarray,
                 probes: int = DEFAULT_PROBES):
        self.centroids = centroids = np.ascontiguousarray(centroids, np.float32)
        self.group_centroids = np.ascontiguousarray(group_centroids, np.float32)
        n_groups = len(self.group_centroids)
        self.probes = int(min(max(1, probes), n_groups))
        self.order = np.argsort(np.asarray(word_group), kind="stable").astype(np.int64)
        self.words = np.ascontiguousarray(centroids[self.order])  # grouped: one block per group
        self.word_norms = (self.words.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.group_norms = (self.group_centroids.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.offsets = np.zeros(n_groups + 1, np.int64)
        np.cumsum(np.bincount(word_group, minlength=n_groups), out=self.offsets[1:])

    def search(self, descriptors: np.ndarray, k: int, threads: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        """((n, k) float32 squared L2 distances, exact (float64 sums), (n, k) int64 word ids),
        nearest first, the same on any number of threads; the descriptors are split into parts
        of at most PART_DESCRIPTORS, searched on ``threads`` threads (BLAS on one thread each). A
        descriptor whose probed groups hold fewer than k words gets id -1 (distance inf) in the
        remaining places."""
        x = np.ascontiguousarray(descriptors, np.float32)
        n = len(x)
        k = int(min(k, len(self.words)))
        dist = np.full((n, k), np.inf, np.float32)
        ids = np.full((n, k), -1, np.int64)
        with threadpool_limits(1, user_api="blas"):
            search_in_parts(self._search_part, x, dist, ids, threads, PART_DESCRIPTORS)
        found = ids >= 0
        ids[found] = self.order[ids[found]]
        # the k found, re-ranked by exact distances: float32 products round by the shapes BLAS
        # gets (rows per group, per part), which would make the result depend on the threads
        exact_top_k(x, self.centroids, ids.copy(), dist, ids)
        return dist, ids

    def _search_part(self, x, dist, ids) -> None:
        if len(x) == 0:
            return
        probes = _nearest_groups(x @ self.group_centroids.T, self.group_norms, self.probes)
        bounds, rows = _rows_by_group(probes, len(self.group_centroids))
        for g in np.flatnonzero(np.diff(bounds)):
            r = rows[bounds[g]:bounds[g + 1]]
            w0, w1 = self.offsets[g], self.offsets[g + 1]
            if w1 > w0:
                _merge_block(x[r] @ self.words[w0:w1].T, self.word_norms[w0:w1], r, w0, dist, ids)


@njit(cache=True, nogil=True)
def exact_top_k(x, centroids, candidates, out_d, out_i):
    """The k = out_d.shape[1] nearest of each row's candidate words (-1: none) by exact squared
    L2 distance (float64 sums; ties: the lower word id), nearest first; -1 / inf where a row has
    fewer than k candidates."""
    n, m = candidates.shape
    k = out_d.shape[1]
    dist = np.empty(m, np.float64)
    ids = np.empty(m, np.int64)
    for i in range(n):
        for c in range(m):
            w = candidates[i, c]
            ids[c] = w
            s = np.inf
            if w >= 0:
                s = 0.0
                for t in range(x.shape[1]):
                    diff = np.float64(x[i, t]) - np.float64(centroids[w, t])
                    s += diff * diff
            dist[c] = s
        for c in range(k):  # selection: k is small
            b = c
            for e in range(c + 1, m):
                if ids[b] < 0 or (ids[e] >= 0 and (dist[e] < dist[b] or (dist[e] == dist[b] and ids[e] < ids[b]))):
                    b = e
            dist[c], dist[b] = dist[b], dist[c]
            ids[c], ids[b] = ids[b], ids[c]
            out_d[i, c] = dist[c] if ids[c] >= 0 else np.inf
            out_i[i, c] = ids[c]


def search_in_parts(search_part, x, dist, ids, threads: int, part_rows: int) -> None:
    """search_part(x[a:b], dist[a:b], ids[a:b]) over parts of at most ``part_rows`` rows, the
    parts spread over ``threads`` threads (one for small batches)."""
    n = len(x)
    threads = max(1, min(int(threads), n // 256 + 1))
    edges = np.linspace(0, n, max(threads, -(-n // part_rows)) + 1).astype(np.int64)
    parts = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    if threads == 1:
        for a, b in parts:
            search_part(x[a:b], dist[a:b], ids[a:b])
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda ab: search_part(x[ab[0]:ab[1]], dist[ab[0]:ab[1]], ids[ab[0]:ab[1]]), parts))
