"""Binary ASMK inverted file: per-word postings of aggregated codes, incremental updates, fast
batched search and safe files.

Layout in memory (and on disk, after consolidation)
- ``offsets`` (n_words + 1,) int64: postings of word w are rows offsets[w]:offsets[w+1] of
- ``vectors`` (n_postings, 2) uint64 packed sign codes (or (n_postings, d) float32 unit vectors
  for the non-binary variant) and
- ``image_ids`` (n_postings,) uint32: image positions into ``keys`` (feature-store keys).
- ``n_vectors`` (n_images,) uint32 aggregated vectors per image (its norm without idf) and
  ``alive`` (n_images,) bool (False once removed, until ``compact``).

A binary posting costs 16 + 4 = 20 bytes. ``add`` appends a word-sorted chunk (cost
proportional to the batch; 2 more bytes per posting for its word until merged); chunks are
merged into the contiguous layout lazily, once, before the next search or save. ``remove`` only marks images; ``compact`` drops their postings and renumbers.

Search scores, for every query image, each database image that shares a visual word with it::

    score(q, d) = sum_{w in q and d} wt(w) sigma(s(q_w, d_w)) / (sqrt(norm(q)) sqrt(norm(d)))

with wt = 1 and norm = number of aggregated vectors, or wt = idf and norm = sum of idf over the
image's words (``use_idf``). It runs in numba, queries spread over threads, each thread with its
own dense score buffer that is reset sparsely (only touched entries), a hardware popcount and a
(d + 1)-entry kernel table; no n_queries x n_images matrix is ever built.

Files: a directory of ``.npy`` arrays + ``keys.json`` + ``meta.json``, or one HDF5 file
(``.h5``/``.hdf5``) with contiguous datasets; both load memory-mapped. Saves go to a temporary
name first and are renamed over the target, so an existing index is never left half-written.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import h5py
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from . import asmk
from .neighbours import Neighbours
from .utils import atomic_path, configure_threads, progress

logger = logging.getLogger(__name__)

FORMAT = "how-met-ivf"
FORMAT_VERSION = 1
ARRAY_NAMES = ("offsets", "vectors", "image_ids", "n_vectors", "alive")
MAX_IMAGES = 2 ** 32 - 1


# ---------------------------------------------------------------------------------------------
# numba kernels
# ---------------------------------------------------------------------------------------------

@intrinsic
def _popcount(typingctx, x):
    """Hardware population count of an unsigned 64-bit integer (LLVM ctpop)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(x), codegen


@njit(cache=True)
def _copy_blocks(src_vec, src_ids, src_off, dst_vec, dst_ids, cursor):
    """Append each word's block of a word-sorted chunk at that word's cursor in dst."""
    for w in range(len(src_off) - 1):
        a, b = src_off[w], src_off[w + 1]
        if b > a:
            c = cursor[w]
            dst_vec[c:c + b - a] = src_vec[a:b]
            dst_ids[c:c + b - a] = src_ids[a:b]
            cursor[w] = c + b - a


@njit(cache=True)
def _compact_postings(offsets, vectors, image_ids, new_position, keep, out_off, out_vec, out_ids):
    """Keep the postings of kept images, renumbering their image ids."""
    c = 0
    out_off[0] = 0
    for w in range(len(offsets) - 1):
        for p in range(offsets[w], offsets[w + 1]):
            img = image_ids[p]
            if keep[img]:
                out_vec[c] = vectors[p]
                out_ids[c] = new_position[img]
                c += 1
        out_off[w + 1] = c


@njit(cache=True)
def _alive_df(offsets, image_ids, alive):
    """Per word, the number of postings of images still alive."""
    df = np.zeros(len(offsets) - 1, np.int64)
    for w in range(len(offsets) - 1):
        n = 0
        for p in range(offsets[w], offsets[w + 1]):
            if alive[image_ids[p]]:
                n += 1
        df[w] = n
    return df


@njit(cache=True)
def _weighted_norms(offsets, image_ids, weight, n_images):
    """Per image, the sum of the weights of its words."""
    out = np.zeros(n_images, np.float64)
    for w in range(len(offsets) - 1):
        wt = weight[w]
        for p in range(offsets[w], offsets[w + 1]):
            out[image_ids[p]] += wt
    return out


@njit(cache=True)
def _worse(sa, ia, sb, ib):
    """Ranking order: higher score first, then lower database position."""
    return sa < sb or (sa == sb and ia > ib)


@njit(cache=True)
def _top_k(touched, n_touched, acc, db_scale, q_scale, k, heap_s, heap_i, out_i, out_s):
    """Top-k of the touched images into out_i/out_s (sorted), via a size-k min-heap."""
    size = 0
    for t in range(n_touched):
        img = touched[t]
        if db_scale[img] == 0.0:  # removed or empty image
            continue
        s = acc[img] * db_scale[img] * q_scale
        if size < k:
            # sift up
            pos = size
            size += 1
            while pos > 0:
                parent = (pos - 1) // 2
                if _worse(s, img, heap_s[parent], heap_i[parent]):
                    heap_s[pos] = heap_s[parent]
                    heap_i[pos] = heap_i[parent]
                    pos = parent
                else:
                    break
            heap_s[pos] = s
            heap_i[pos] = img
        elif _worse(heap_s[0], heap_i[0], s, img):
            # replace the worst and sift down
            pos = 0
            while True:
                child = 2 * pos + 1
                if child >= size:
                    break
                if child + 1 < size and _worse(heap_s[child + 1], heap_i[child + 1], heap_s[child], heap_i[child]):
                    child += 1
                if _worse(heap_s[child], heap_i[child], s, img):
                    heap_s[pos] = heap_s[child]
                    heap_i[pos] = heap_i[child]
                    pos = child
                else:
                    break
            heap_s[pos] = s
            heap_i[pos] = img
    # pop the worst repeatedly: fills the output from the back
    for r in range(size - 1, -1, -1):
        out_s[r] = heap_s[0]
        out_i[r] = heap_i[0]
        size -= 1
        last_s, last_i = heap_s[size], heap_i[size]
        pos = 0
        while True:
            child = 2 * pos + 1
            if child >= size:
                break
            if child + 1 < size and _worse(heap_s[child + 1], heap_i[child + 1], heap_s[child], heap_i[child]):
                child += 1
            if _worse(heap_s[child], heap_i[child], last_s, last_i):
                heap_s[pos] = heap_s[child]
                heap_i[pos] = heap_i[child]
                pos = child
            else:
                break
        heap_s[pos] = last_s
        heap_i[pos] = last_i


@njit(parallel=True, cache=True)
def _search_binary(q_off, q_words, q_codes, q_scale, offsets, codes, image_ids, db_scale,
                   word_weight, table, k, workers):
    nq = len(q_off) - 1
    n_db = len(db_scale)
    nb = codes.shape[1]
    out_i = np.full((nq, k), -1, np.int64)
    out_s = np.full((nq, k), -np.inf, np.float64)
    for worker in prange(workers):
        # per-thread buffers; entries are reset lazily through the stamp of the last query
        acc = np.zeros(n_db, np.float64)
        stamp = np.full(n_db, -1, np.int32)
        touched = np.empty(n_db, np.int64)
        heap_s = np.empty(k, np.float64)
        heap_i = np.empty(k, np.int64)
        qc = np.empty(nb, np.uint64)
        for q in range(worker, nq, workers):
            n_touched = 0
            for j in range(q_off[q], q_off[q + 1]):
                w = q_words[j]
                wt = word_weight[w]
                if wt == 0.0:
                    continue
                start, stop = offsets[w], offsets[w + 1]
                if nb == 2:  # 128-bit codes: the common case, unrolled
                    q0, q1 = q_codes[j, 0], q_codes[j, 1]
                    for p in range(start, stop):
                        img = image_ids[p]
                        h = _popcount(q0 ^ codes[p, 0]) + _popcount(q1 ^ codes[p, 1])
                        if stamp[img] != q:
                            stamp[img] = q
                            acc[img] = 0.0
                            touched[n_touched] = img
                            n_touched += 1
                        acc[img] += wt * table[h]
                else:
                    for b in range(nb):
                        qc[b] = q_codes[j, b]
                    for p in range(start, stop):
                        img = image_ids[p]
                        h = 0
                        for b in range(nb):
                            h += _popcount(qc[b] ^ codes[p, b])
                        if stamp[img] != q:
                            stamp[img] = q
                            acc[img] = 0.0
                            touched[n_touched] = img
                            n_touched += 1
                        acc[img] += wt * table[h]
            # removed (or empty) images have db_scale 0 and are left out by _top_k
            _top_k(touched, n_touched, acc, db_scale, q_scale[q], k, heap_s, heap_i, out_i[q], out_s[q])
    return out_i, out_s


@njit(parallel=True, cache=True)
def _search_float(q_off, q_words, q_vecs, q_scale, offsets, vecs, image_ids, db_scale,
                  word_weight, alpha, tau, k, workers):
    nq = len(q_off) - 1
    n_db = len(db_scale)
    d = vecs.shape[1]
    cube = alpha == 3.0
    out_i = np.full((nq, k), -1, np.int64)
    out_s = np.full((nq, k), -np.inf, np.float64)
    for worker in prange(workers):
        acc = np.zeros(n_db, np.float64)
        stamp = np.full(n_db, -1, np.int32)
        touched = np.empty(n_db, np.int64)
        heap_s = np.empty(k, np.float64)
        heap_i = np.empty(k, np.int64)
        for q in range(worker, nq, workers):
            n_touched = 0
            for j in range(q_off[q], q_off[q + 1]):
                w = q_words[j]
                wt = word_weight[w]
                if wt == 0.0:
                    continue
                for p in range(offsets[w], offsets[w + 1]):
                    img = image_ids[p]
                    s = 0.0
                    for t in range(d):
                        s += q_vecs[j, t] * vecs[p, t]
                    v = 0.0
                    if s >= tau:
                        v = s * s * s if cube else s ** alpha
                    if stamp[img] != q:
                        stamp[img] = q
                        acc[img] = 0.0
                        touched[n_touched] = img
                        n_touched += 1
                    acc[img] += wt * v
            _top_k(touched, n_touched, acc, db_scale, q_scale[q], k, heap_s, heap_i, out_i[q], out_s[q])
    return out_i, out_s


# ---------------------------------------------------------------------------------------------
# the inverted file
# ---------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class InvertedFile:
    """ASMK inverted file over ``n_words`` visual words; database images are feature-store keys.

    binary: packed sign codes (default) or L2-normalised float residuals. use_idf, alpha, tau:
    default scoring (each can be overridden per search). codebook_fingerprint / extractor:
    what the index was built with, checked when querying and appending.
    """

    def __init__(self, n_words: int, dim: int = 128, binary: bool = True, use_idf: bool = False,
                 alpha: float = asmk.DEFAULT_ALPHA, tau: float = asmk.DEFAULT_TAU,
                 codebook_fingerprint: Optional[str] = None, extractor: Optional[dict] = None):
        if n_words < 1 or dim < 1:
            raise ValueError(f"inverted file needs n_words >= 1 and dim >= 1, got {n_words}, {dim}")
        self.n_words = int(n_words)
        self.dim = int(dim)
        self.binary = bool(binary)
        self.use_idf = bool(use_idf)
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.codebook_fingerprint = codebook_fingerprint
        self.extractor = dict(extractor or {})
        self.created = _now()
        self.path: Optional[Path] = None
        self._keys: List[str] = []
        self._position: Dict[str, int] = {}
        self._alive = np.zeros(0, bool)
        self._n_vectors = np.zeros(0, np.uint32)
        self._offsets = np.zeros(self.n_words + 1, np.int64)
        self._vectors = np.zeros((0, self.vector_width), self.vector_dtype)
        self._image_ids = np.zeros(0, np.uint32)
        self._pending: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._derived: Dict[bool, Tuple[np.ndarray, np.ndarray]] = {}

    # -- shape of the postings -----------------------------------------------------------------
    @property
    def vector_width(self) -> int:
        return asmk.code_words(self.dim) if self.binary else self.dim

    @property
    def vector_dtype(self):
        return np.dtype(np.uint64) if self.binary else np.dtype(np.float32)

    # -- bookkeeping -----------------------------------------------------------------------------
    @property
    def keys(self) -> List[str]:
        """Keys of the images in the index (removed ones left out)."""
        if self._alive.all():
            return list(self._keys)
        return [k for k, a in zip(self._keys, self._alive) if a]

    def __len__(self) -> int:
        return len(self._position)

    def __contains__(self, key: str) -> bool:
        return key in self._position

    @property
    def n_slots(self) -> int:
        """Image positions in use, removed images included (until compact)."""
        return len(self._keys)

    @property
    def n_postings(self) -> int:
        return int(len(self._image_ids) + sum(len(c[2]) for c in self._pending))

    def nbytes(self) -> dict:
        """Bytes held by the index (postings, per-word and per-image arrays)."""
        self.consolidate()
        postings = int(self._vectors.nbytes + self._image_ids.nbytes)
        per_image = int(self._n_vectors.nbytes + self._alive.nbytes + sum(len(k.encode()) for k in self._keys))
        total = postings + int(self._offsets.nbytes) + per_image
        n = max(self.n_postings, 1)
        return {"postings": postings, "offsets": int(self._offsets.nbytes), "per_image": per_image,
                "total": total, "per_vector": postings / n, "per_vector_total": total / n,
                "per_image_total": total / max(len(self), 1)}

    def stats(self) -> dict:
        self.consolidate()
        counts = np.diff(self._offsets)
        return {"images": len(self), "removed_pending_compact": int(self.n_slots - len(self)),
                "postings": self.n_postings, "vectors_per_image": self.n_postings / max(self.n_slots, 1),
                "empty_words": int((counts == 0).sum()), "max_postings_per_word": int(counts.max(initial=0)),
                "binary": self.binary, "use_idf": self.use_idf, "bytes": self.nbytes()}

    # -- updates ---------------------------------------------------------------------------------
    def add(self, keys: Sequence[str], vectors: np.ndarray, words: np.ndarray, images: np.ndarray) -> None:
        """Add images ``keys`` with their aggregated vectors; ``images`` (m,) indexes ``keys``.

        Costs O(batch): the batch becomes a word-sorted chunk merged into the postings lazily.
        """
        keys = [str(k) for k in keys]
        vectors = np.asarray(vectors)
        words = np.asarray(words, np.int64).ravel()
        images = np.asarray(images, np.int64).ravel()
        m = len(words)
        if len(images) != m or len(vectors) != m:
            raise ValueError(f"add: {len(vectors)} vectors, {m} words and {len(images)} image indices differ")
        if vectors.ndim != 2 or vectors.shape[1] != self.vector_width or \
                (self.binary and vectors.dtype != np.uint64) or \
                (not self.binary and not np.issubdtype(vectors.dtype, np.floating)):
            kind = f"(m, {self.vector_width}) uint64 codes" if self.binary else f"(m, {self.dim}) float vectors"
            raise ValueError(f"add: vectors {vectors.shape} {vectors.dtype} are not {kind}")
        if len(set(keys)) != len(keys):
            raise ValueError("add: duplicate keys in one batch")
        present = [k for k in keys if k in self._position]
        if present:
            raise ValueError(f"add: {present[0]!r} is already in the index (remove it first)")
        if m and (words.min() < 0 or words.max() >= self.n_words):
            raise ValueError(f"add: word ids must be in [0, {self.n_words})")
        if m and (images.min() < 0 or images.max() >= len(keys)):
            raise ValueError(f"add: image indices must be in [0, {len(keys)})")
        base = self.n_slots
        if base + len(keys) > MAX_IMAGES:
            raise ValueError(f"add: an inverted file holds at most {MAX_IMAGES} images")
        pair = images * self.n_words + words
        order = np.argsort(pair, kind="stable")
        if m > 1 and (pair[order][1:] == pair[order][:-1]).any():
            raise ValueError("add: an image has two aggregated vectors for one word (aggregate first)")
        order = order[np.argsort(words[order], kind="stable")]  # by word, then image
        # a chunk keeps its sorted words compactly (2 bytes each for <= 65,536 words); per-word
        # offsets are only made while merging, one chunk at a time
        chunk_words = words[order].astype(np.uint16 if self.n_words <= 65536 else np.uint32)
        chunk_vec = np.ascontiguousarray(vectors[order], self.vector_dtype)
        chunk_ids = (images[order] + base).astype(np.uint32)
        if m:
            self._pending.append((chunk_words, chunk_vec, chunk_ids))
        self._keys.extend(keys)
        self._position.update((k, base + i) for i, k in enumerate(keys))
        self._alive = np.concatenate([self._alive, np.ones(len(keys), bool)])
        self._n_vectors = np.concatenate([self._n_vectors,
                                          np.bincount(images, minlength=len(keys)).astype(np.uint32)])
        self._derived.clear()

    def add_aggregated(self, keys: Sequence[str], aggregated: asmk.Aggregated) -> None:
        self.add(keys, aggregated.vectors, aggregated.words, aggregated.images)

    def remove(self, keys: Union[str, Sequence[str]], missing_ok: bool = False) -> int:
        """Remove images by key (their postings are skipped, and dropped by ``compact``)."""
        if isinstance(keys, str):
            keys = [keys]
        removed = 0
        for key in keys:
            pos = self._position.pop(key, None)
            if pos is None:
                if not missing_ok:
                    raise KeyError(f"{key!r} is not in the index")
                continue
            if not self._alive.flags.writeable:
                self._alive = self._alive.copy()
            self._alive[pos] = False
            removed += 1
        if removed:
            self._derived.clear()
        return removed

    def consolidate(self) -> None:
        """Merge pending chunks into the contiguous per-word postings (one pass, chunks freed as
        they are copied)."""
        if not self._pending:
            return
        counts = np.diff(self._offsets)
        for chunk_words, _, _ in self._pending:
            counts = counts + np.bincount(chunk_words, minlength=self.n_words)
        offsets = np.zeros(self.n_words + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        total = int(offsets[-1])
        vectors = np.empty((total, self.vector_width), self.vector_dtype)
        image_ids = np.empty(total, np.uint32)
        cursor = offsets[:-1].copy()
        _copy_blocks(self._vectors, self._image_ids, self._offsets, vectors, image_ids, cursor)
        self._vectors, self._image_ids = vectors[:0], image_ids[:0]  # let the old arrays go
        pending, self._pending = self._pending, []
        while pending:
            chunk_words, chunk_vec, chunk_ids = pending.pop(0)
            chunk_off = np.zeros(self.n_words + 1, np.int64)
            np.cumsum(np.bincount(chunk_words, minlength=self.n_words), out=chunk_off[1:])
            _copy_blocks(chunk_vec, chunk_ids, chunk_off, vectors, image_ids, cursor)
            del chunk_words, chunk_vec, chunk_ids
        self._offsets, self._vectors, self._image_ids = offsets, vectors, image_ids

    def compact(self) -> None:
        """Drop removed images for good and renumber the rest (postings rewritten once)."""
        self.consolidate()
        if self._alive.all():
            return
        keep = self._alive.copy()
        new_position = (np.cumsum(keep) - 1).astype(np.uint32)
        total = int(self._n_vectors[keep].sum(dtype=np.int64))
        offsets = np.zeros(self.n_words + 1, np.int64)
        vectors = np.empty((total, self.vector_width), self.vector_dtype)
        image_ids = np.empty(total, np.uint32)
        _compact_postings(self._offsets, self._vectors, self._image_ids, new_position, keep,
                          offsets, vectors, image_ids)
        self._offsets, self._vectors, self._image_ids = offsets, vectors, image_ids
        self._keys = [k for k, a in zip(self._keys, keep) if a]
        self._position = {k: i for i, k in enumerate(self._keys)}
        self._n_vectors = np.ascontiguousarray(self._n_vectors[keep])
        self._alive = np.ones(len(self._keys), bool)
        self._derived.clear()

    # -- scoring helpers -------------------------------------------------------------------------
    def document_frequency(self) -> np.ndarray:
        """(n_words,) number of (alive) database images holding each word."""
        self.consolidate()
        if self._alive.all():
            return np.diff(self._offsets)
        return _alive_df(self._offsets, self._image_ids, self._alive)

    def idf(self) -> np.ndarray:
        """(n_words,) float64 idf(w) = log(N / df(w))**2 (1 for words no image has)."""
        return asmk.idf_weights(self.document_frequency(), len(self))

    def _weights(self, use_idf: bool) -> Tuple[np.ndarray, np.ndarray]:
        """(per-word weight, per-image 1/sqrt(norm), 0 for removed or empty images)."""
        if use_idf not in self._derived:
            self.consolidate()
            if use_idf:
                weight = self.idf()
                norms = _weighted_norms(self._offsets, self._image_ids, weight, self.n_slots)
            else:
                weight = np.ones(self.n_words, np.float64)
                norms = self._n_vectors.astype(np.float64)
            scale = np.zeros(self.n_slots, np.float64)
            ok = self._alive & (norms > 0)
            scale[ok] = 1.0 / np.sqrt(norms[ok])
            self._derived[use_idf] = (weight, scale)
        return self._derived[use_idf]

    # -- search ----------------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, words: np.ndarray, images: np.ndarray, k: int = 100,
               query_keys: Optional[Sequence[str]] = None, alpha: Optional[float] = None,
               tau: Optional[float] = None, use_idf: Optional[bool] = None) -> Neighbours:
        """Top-k database images for a batch of aggregated queries.

        vectors, words: aggregated query vectors; images (m,) the query index of each vector,
        in [0, nq) with nq = len(query_keys) (default: max + 1, keys "0", "1", ...).
        """
        alpha = self.alpha if alpha is None else float(alpha)
        tau = self.tau if tau is None else float(tau)
        use_idf = self.use_idf if use_idf is None else bool(use_idf)
        k = int(k)
        if k < 1:
            raise ValueError(f"search: k must be >= 1, got {k}")
        vectors = np.asarray(vectors)
        words = np.asarray(words, np.int64).ravel()
        images = np.asarray(images, np.int64).ravel()
        if query_keys is None:
            nq = int(images.max()) + 1 if len(images) else 0
            query_keys = [str(i) for i in range(nq)]
        query_keys = list(query_keys)
        nq = len(query_keys)
        if len(vectors) != len(words) or len(images) != len(words):
            raise ValueError("search: vectors, words and query indices differ in length")
        if len(words) and (images.min() < 0 or images.max() >= nq):
            raise ValueError(f"search: query indices must be in [0, {nq})")
        if len(words) and (words.min() < 0 or words.max() >= self.n_words):
            raise ValueError(f"search: word ids must be in [0, {self.n_words})")
        if vectors.ndim != 2 or vectors.shape[1] != self.vector_width:
            raise ValueError(f"search: query vectors {vectors.shape} do not match the index "
                             f"({'binary' if self.binary else 'float'}, width {self.vector_width})")
        weight, db_scale = self._weights(use_idf)
        order = np.argsort(images, kind="stable")
        q_words = np.ascontiguousarray(words[order])
        q_off = np.zeros(nq + 1, np.int64)
        np.cumsum(np.bincount(images, minlength=nq), out=q_off[1:])
        q_norm = np.bincount(images, weights=weight[words], minlength=nq)
        q_scale = np.zeros(nq, np.float64)
        q_scale[q_norm > 0] = 1.0 / np.sqrt(q_norm[q_norm > 0])
        workers = max(1, min(nq, numba.get_num_threads()))
        if nq == 0:
            idx, sc = np.zeros((0, k), np.int64), np.zeros((0, k), np.float64)
        elif self.binary:
            q_codes = np.ascontiguousarray(vectors[order], np.uint64)
            table = asmk.kernel_table(self.dim, alpha, tau)
            idx, sc = _search_binary(q_off, q_words, q_codes, q_scale, self._offsets, self._vectors,
                                     self._image_ids, db_scale, weight, table, k, workers)
        else:
            q_vecs = np.ascontiguousarray(vectors[order], np.float32)
            idx, sc = _search_float(q_off, q_words, q_vecs, q_scale, self._offsets, self._vectors,
                                    self._image_ids, db_scale, weight, alpha, tau, k, workers)
        return Neighbours(query_keys, self._keys, idx, sc.astype(np.float32))

    def search_aggregated(self, aggregated: asmk.Aggregated, k: int = 100,
                          query_keys: Optional[Sequence[str]] = None, **kwargs) -> Neighbours:
        return self.search(aggregated.vectors, aggregated.words, aggregated.images, k=k,
                           query_keys=query_keys, **kwargs)

    def postings(self, word: int) -> Tuple[np.ndarray, np.ndarray]:
        """(vectors, image positions) of one word (for inspection and tests)."""
        self.consolidate()
        a, b = self._offsets[word], self._offsets[word + 1]
        return self._vectors[a:b], self._image_ids[a:b]

    def image_vectors(self, key: str) -> asmk.Aggregated:
        """The aggregated vectors stored for one database image (a scan of all postings)."""
        self.consolidate()
        pos = self._position[key]
        hit = np.flatnonzero(self._image_ids == pos)
        words = np.searchsorted(self._offsets, hit, side="right") - 1
        return asmk.Aggregated(np.asarray(self._vectors[hit]), words.astype(np.int64), np.zeros(len(hit), np.int64))

    # -- files -----------------------------------------------------------------------------------
    def _meta(self) -> dict:
        arrays = self._arrays()
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "n_words": self.n_words, "dim": self.dim, "binary": self.binary,
            "use_idf": self.use_idf, "alpha": self.alpha, "tau": self.tau,
            "n_images": self.n_slots, "n_alive": len(self), "n_postings": self.n_postings,
            "codebook_fingerprint": self.codebook_fingerprint, "extractor": self.extractor,
            "created": self.created, "saved": _now(),
            "arrays": {name: {"shape": list(a.shape), "dtype": a.dtype.str} for name, a in arrays.items()},
        }

    def _arrays(self) -> Dict[str, np.ndarray]:
        return {"offsets": self._offsets, "vectors": self._vectors, "image_ids": self._image_ids,
                "n_vectors": self._n_vectors, "alive": self._alive}

    def save(self, path: os.PathLike) -> Path:
        """Write the index (directory, or HDF5 for a .h5/.hdf5 path) atomically."""
        path = Path(path)
        self.consolidate()
        meta = self._meta()
        if path.suffix.lower() in (".h5", ".hdf5"):
            if path.is_dir():
                raise ValueError(f"{path}: is a directory, not an HDF5 index file")
            with atomic_path(path) as tmp:
                with h5py.File(tmp, "w") as f:
                    f.attrs["meta"] = json.dumps(meta)
                    for name, arr in self._arrays().items():
                        f.create_dataset(name, data=np.asarray(arr))  # contiguous: mmap-able
                    f.create_dataset("keys", data=np.array(self._keys, dtype=object),
                                     dtype=h5py.string_dtype("utf-8"))
        else:
            if path.exists() and not (path.is_dir() and ((path / "meta.json").exists() or not any(path.iterdir()))):
                raise ValueError(f"{path}: exists and is not a how-met index directory (not overwritten)")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            for stale in (tmp, old):
                if stale.exists():
                    shutil.rmtree(stale)
            try:
                tmp.mkdir()
                for name, arr in self._arrays().items():
                    with open(tmp / f"{name}.npy", "wb") as fh:
                        np.save(fh, np.asarray(arr), allow_pickle=False)
                (tmp / "keys.json").write_text(json.dumps(self._keys))
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # written last
                if path.exists():
                    os.replace(path, old)
                os.replace(tmp, path)
            finally:
                for stale in (tmp, old):
                    if stale.exists():
                        shutil.rmtree(stale, ignore_errors=True)
        self.path = path
        return path

    @classmethod
    def load(cls, path: os.PathLike, mmap: bool = True, verify: bool = False) -> "InvertedFile":
        """Read an index saved by ``save`` (memory-mapped by default: postings stay on disk
        until touched). ``verify`` also checks every posting's image id (reads all postings)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: inverted file does not exist")
        if path.is_dir():
            meta, arrays, keys = _read_dir(path, mmap)
        else:
            meta, arrays, keys = _read_h5(path, mmap)
        ivf = cls(meta["n_words"], meta["dim"], meta["binary"], meta["use_idf"], meta["alpha"], meta["tau"],
                  meta.get("codebook_fingerprint"), meta.get("extractor"))
        _check_consistency(path, meta, arrays, keys, ivf.vector_width, ivf.vector_dtype, verify)
        ivf.created = meta.get("created", ivf.created)
        ivf._offsets = arrays["offsets"]
        ivf._vectors = arrays["vectors"]
        ivf._image_ids = arrays["image_ids"]
        ivf._n_vectors = arrays["n_vectors"]
        ivf._alive = np.array(arrays["alive"], bool)  # small and mutable (remove)
        ivf._keys = list(keys)
        ivf._position = {k: i for i, k in enumerate(keys) if ivf._alive[i]}
        ivf.path = path
        return ivf

    def check_codebook(self, codebook) -> None:
        """Refuse a codebook other than the one this index was built with."""
        where = self.path or "the inverted file"
        if self.codebook_fingerprint and self.codebook_fingerprint != codebook.fingerprint:
            raise ValueError(f"{where}: was built with another codebook (fingerprint "
                             f"{self.codebook_fingerprint}, given {codebook.fingerprint})")
        if self.n_words != len(codebook.centroids) or self.dim != codebook.dim:
            raise ValueError(f"{where}: has {self.n_words} words of dim {self.dim}; the codebook has "
                             f"{len(codebook.centroids)} of dim {codebook.dim}")

    def __repr__(self) -> str:
        kind = "binary" if self.binary else "float"
        return (f"InvertedFile({len(self)} images, {self.n_postings} postings, {self.n_words} words, "
                f"{kind}, idf={self.use_idf})")


def _check_meta(where: Path, meta) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: not a how-met inverted file")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{where}: inverted-file format version {version} is not supported "
                         f"(this how-met reads <= {FORMAT_VERSION})")
    for name in ("n_words", "dim", "binary", "use_idf", "alpha", "tau", "n_images", "n_postings", "arrays"):
        if name not in meta:
            raise ValueError(f"{where}: metadata lacks {name!r}")
    return meta


def _read_dir(path: Path, mmap: bool):
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise ValueError(f"{meta_path}: missing (not a how-met inverted file, or an unfinished save)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path}: damaged ({exc})") from None
    _check_meta(meta_path, meta)
    arrays = {}
    for name in ARRAY_NAMES:
        file = path / f"{name}.npy"
        if not file.exists():
            raise ValueError(f"{file}: missing from the inverted file")
        try:
            arrays[name] = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"{file}: damaged ({exc})") from None
        _check_array(file, name, arrays[name], meta)
    keys_path = path / "keys.json"
    try:
        keys = json.loads(keys_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{keys_path}: damaged or missing ({exc})") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{keys_path}: not a list of image keys")
    return meta, arrays, keys


def _read_h5(path: Path, mmap: bool):
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 inverted file ({exc})") from None
    with f:
        try:
            meta = json.loads(f.attrs["meta"])
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a how-met inverted file (no readable metadata: {exc})") from None
        _check_meta(path, meta)
        arrays = {}
        for name in ARRAY_NAMES:
            if name not in f:
                raise ValueError(f"{path}: dataset {name!r} is missing")
            ds = f[name]
            try:
                offset = ds.id.get_offset() if mmap and ds.size else None
                if offset is not None and ds.chunks is None and ds.compression is None:
                    arr = np.memmap(path, mode="r", dtype=ds.dtype, shape=ds.shape, offset=offset)
                else:
                    arr = ds[()]
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: dataset {name!r} is damaged ({exc})") from None
            _check_array(path, name, arr, meta)
            arrays[name] = arr
        try:
            keys = [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in f["keys"][()]]
        except (KeyError, OSError) as exc:
            raise ValueError(f"{path}: image keys missing or damaged ({exc})") from None
    return meta, arrays, keys


def _check_array(where: Path, name: str, arr: np.ndarray, meta: dict) -> None:
    want = meta["arrays"].get(name)
    if not want:
        raise ValueError(f"{where}: metadata does not describe {name!r}")
    if list(arr.shape) != list(want["shape"]) or arr.dtype.str != want["dtype"]:
        raise ValueError(f"{where}: {name} is {arr.dtype.str}{list(arr.shape)}, metadata says "
                         f"{want['dtype']}{want['shape']} (damaged or mixed-up file)")


def _check_consistency(path: Path, meta: dict, arrays: dict, keys: list, width: int, dtype, verify: bool) -> None:
    n_words, n_images, n_postings = meta["n_words"], meta["n_images"], meta["n_postings"]
    expected = {"offsets": ((n_words + 1,), np.int64), "vectors": ((n_postings, width), dtype),
                "image_ids": ((n_postings,), np.uint32), "n_vectors": ((n_images,), np.uint32),
                "alive": ((n_images,), np.bool_)}
    for name, (shape, dt) in expected.items():
        arr = arrays[name]
        if arr.shape != shape or arr.dtype != np.dtype(dt):
            raise ValueError(f"{path}: {name} is {arr.dtype}{list(arr.shape)}, expected "
                             f"{np.dtype(dt)}{list(shape)}")
    if len(keys) != n_images:
        raise ValueError(f"{path}: {len(keys)} image keys for {n_images} images")
    off = np.asarray(arrays["offsets"])
    if off[0] != 0 or off[-1] != n_postings or (np.diff(off) < 0).any():
        raise ValueError(f"{path}: word offsets are inconsistent (damaged file)")
    if int(np.asarray(arrays["n_vectors"]).sum(dtype=np.int64)) != n_postings:
        raise ValueError(f"{path}: per-image vector counts do not add up to the postings (damaged file)")
    if verify and n_postings:
        ids = arrays["image_ids"]
        if int(ids.max()) >= n_images or \
                not np.array_equal(np.bincount(ids, minlength=n_images), arrays["n_vectors"]):
            raise ValueError(f"{path}: posting image ids disagree with the per-image counts (damaged file)")


# ---------------------------------------------------------------------------------------------
# building from a feature store
# ---------------------------------------------------------------------------------------------

def _load_codebook(codebook):
    from .codebook import Codebook
    return codebook if isinstance(codebook, Codebook) else Codebook.load(codebook)


def check_extractor(features_config: dict, expected: dict, features_name, expected_name) -> None:
    """Refuse features of another network/dimension than ``expected`` (warn on other settings)."""
    if not features_config or not expected or features_config == expected:
        return
    for field in ("model", "dim"):
        if field in features_config and field in expected and features_config[field] != expected[field]:
            raise ValueError(f"{features_name}: features come from another extractor than {expected_name} "
                             f"({field}: {json.dumps(features_config[field], sort_keys=True)} vs "
                             f"{json.dumps(expected[field], sort_keys=True)})")
    differing = sorted(k for k in set(features_config) | set(expected) if features_config.get(k) != expected.get(k))
    logger.warning("%s: extraction settings differ from %s in %s", features_name, expected_name, ", ".join(differing))


def iter_batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def aggregate_batch(codebook, descriptors: Sequence[np.ndarray], multiple_assignment: int = 1,
                    binary: bool = True) -> asmk.Aggregated:
    """Quantise (k nearest words) and aggregate a list of images' descriptors in one go."""
    counts = np.array([len(d) for d in descriptors], np.int64)
    if counts.sum() == 0:
        width = asmk.code_words(codebook.dim) if binary else codebook.dim
        dtype = np.uint64 if binary else np.float32
        return asmk.Aggregated(np.zeros((0, width), dtype), np.zeros(0, np.int64), np.zeros(0, np.int64))
    desc = np.concatenate([np.asarray(d, np.float32) for d in descriptors if len(d)])
    words = codebook.assign(desc, multiple_assignment)
    image_ids = np.repeat(np.arange(len(descriptors)), counts)
    return asmk.aggregate(desc, words, codebook.centroids, image_ids, binary=binary)


def build_index(features_path, codebook, out, append: bool = False, batch_size: int = 64,
                use_idf: bool = False, binary: bool = True, keys: Optional[Sequence[str]] = None,
                show_progress: bool = True) -> InvertedFile:
    """Index the images of a feature store (streamed in batches) and save the index to ``out``.

    append: extend an existing index at ``out`` with the store's images it does not hold yet
    (created if missing). Memory: one batch of descriptors plus the index itself.
    """
    from .features import FeatureStore
    codebook = _load_codebook(codebook)
    out = Path(out)
    with FeatureStore(features_path, "r") as store:
        extractor = store.config
        check_extractor(extractor, codebook.meta.get("extractor") or {}, features_path, "the codebook")
        if append and out.exists():
            ivf = InvertedFile.load(out, mmap=True)
            ivf.check_codebook(codebook)
            check_extractor(extractor, ivf.extractor, features_path, out)
        else:
            ivf = InvertedFile(len(codebook.centroids), codebook.dim, binary=binary, use_idf=use_idf,
                               codebook_fingerprint=codebook.fingerprint, extractor=extractor)
        todo = [k for k in (store.keys() if keys is None else keys) if k not in ivf]
        bar = progress(total=len(todo), desc="index", unit="img", disable=None if show_progress else True)
        for batch in iter_batches(todo, batch_size):
            descs = []
            for key in batch:
                d = store.descriptors(key)
                if d.ndim != 2 or (len(d) and d.shape[1] != codebook.dim):
                    raise ValueError(f"{features_path}: descriptors of {key!r} are {d.shape}, the "
                                     f"codebook's dimension is {codebook.dim}")
                descs.append(d)
            ivf.add_aggregated(batch, aggregate_batch(codebook, descs, 1, ivf.binary))
            bar.update(len(batch))
        bar.close()
    ivf.save(out)
    return ivf


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, required=True, help="feature store of the database images")
    p.add_argument("--codebook", type=Path, required=True, help="codebook (.npz)")
    p.add_argument("--out", type=Path, required=True,
                   help="index to write: a directory, or one HDF5 file if it ends in .h5")
    p.add_argument("--append", action="store_true",
                   help="add the store's images that the existing index does not hold yet")
    p.add_argument("--idf", action="store_true", help="idf-weighted scores (default off, as in SPEC)")
    p.add_argument("--float", dest="binary", action="store_false",
                   help="non-binary ASMK: L2-normalised float residuals (128 x 4 bytes each)")
    p.add_argument("--batch-size", type=int, default=64, help="images quantised together")


def run_cli(args) -> int:
    configure_threads()
    ivf = build_index(args.features, args.codebook, args.out, append=args.append, batch_size=args.batch_size,
                      use_idf=args.idf, binary=args.binary)
    stats = ivf.stats()
    print(json.dumps({"index": str(args.out), "images": stats["images"], "postings": stats["postings"],
                      "bytes_per_vector": round(stats["bytes"]["per_vector"], 2),
                      "bytes_per_image": round(stats["bytes"]["per_image_total"], 1)}))
    return 0
