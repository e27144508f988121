"""ASMK maths as plain array functions (SPEC section 3): aggregation of residuals per (image,
visual word), binarisation and bit packing, the selective similarity kernel and idf weights.

Everything here is stateless and vectorised; the inverted file (``how_met.ivf``) and the query
stage (``how_met.query``) compose these functions.

Conventions
- A *code* is the sign pattern of an aggregated residual, ``bit = sum > 0``, packed into
  ``ceil(d / 64)`` little-endian uint64 words (two for d = 128): 16 bytes per aggregated vector.
- The similarity of two codes with Hamming distance h is ``s = 1 - 2 h / d`` in [-1, 1]; the
  selective kernel is ``sigma(s) = s**alpha if s >= tau else 0``.
- The non-binary variant keeps the L2-normalised float residual sums; ``s`` is their dot product.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

DEFAULT_ALPHA = 3.0
DEFAULT_TAU = 0.0
CHUNK_PAIRS = 4096  # (descriptor, word) pairs aggregated per pass


class Aggregated(NamedTuple):
    """Aggregated vectors of one or several images, sorted by (image, word).

    vectors: (m, ceil(d/64)) uint64 packed codes, or (m, d) float32 unit vectors (non-binary).
    words: (m,) int64 visual word of each vector.
    images: (m,) int64 image index of each vector (0 for a single image).
    """

    vectors: np.ndarray
    words: np.ndarray
    images: np.ndarray

    def __len__(self) -> int:
        return len(self.words)


def _as_word_matrix(word_ids: np.ndarray, n: int) -> np.ndarray:
    word_ids = np.asarray(word_ids)
    if word_ids.ndim == 1:
        word_ids = word_ids[:, None]
    if word_ids.ndim != 2 or word_ids.shape[0] != n:
        raise ValueError(f"word ids of shape {word_ids.shape} do not match {n} descriptors")
    return word_ids.astype(np.int64, copy=False)


def residual_sums(descriptors: np.ndarray, word_ids: np.ndarray, centroids: np.ndarray,
                  image_ids: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum of residuals (descriptor - centroid) per (image, visual word).

    descriptors: (n, d); word_ids: (n,) or (n, k) with k assignments per descriptor (multiple
    assignment: a descriptor contributes to each of its k words once; -1 entries are ignored);
    image_ids: (n,) image index of each descriptor (default: all one image).

    Returns (sums (m, d) float32, words (m,) int64, images (m,) int64), sorted by (image, word).
    """
    parts = [_residual_sums(*chunk) for chunk in _image_chunks(descriptors, word_ids, centroids, image_ids)]
    return _concatenate(parts, np.asarray(descriptors).shape[-1], np.float32)


def _concatenate(parts, width, dtype):
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.zeros((0, width), dtype), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


def _image_chunks(descriptors, word_ids, centroids, image_ids):
    """Validate, then yield (desc, words (n, k), centroids, images) a few images at a time.

    Aggregating a few images per pass gives the same result with small temporaries, which the
    allocator reuses and the cache keeps (one pass over 32 query images was ~2x slower).
    """
    desc = np.asarray(descriptors, np.float32)
    if desc.ndim != 2:
        raise ValueError(f"descriptors must be (n, d), got {desc.shape}")
    n, d = desc.shape
    centroids = np.asarray(centroids, np.float32)
    if centroids.ndim != 2 or centroids.shape[1] != d:
        raise ValueError(f"centroids {centroids.shape} do not match descriptors of dimension {d}")
    n_words = centroids.shape[0]
    words = _as_word_matrix(word_ids, n)
    images = np.zeros(n, np.int64) if image_ids is None else np.asarray(image_ids, np.int64)
    if images.shape != (n,):
        raise ValueError(f"image ids of shape {images.shape} do not match {n} descriptors")
    if words.size and words.max() >= n_words:
        raise ValueError(f"word id {int(words.max())} is outside the codebook of {n_words} words")
    k = words.shape[1]
    if k > 1:
        words = _drop_repeated_words(words)
    rows_per_chunk = max(1, CHUNK_PAIRS // k)
    if n <= rows_per_chunk:
        yield desc, words, centroids, images
        return
    if (np.diff(images) < 0).any():
        order = np.argsort(images, kind="stable")
        desc, words, images = desc[order], words[order], images[order]
    firsts = np.flatnonzero(np.concatenate(([True], images[1:] != images[:-1])))
    cuts = np.unique(firsts[np.searchsorted(firsts, np.arange(0, n, rows_per_chunk), side="right") - 1])
    bounds = np.append(cuts, n)
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield desc[a:b], words[a:b], centroids, images[a:b]


def _drop_repeated_words(words: np.ndarray) -> np.ndarray:
    """A descriptor counts once per word even if an approximate search repeated a word."""
    ordered = np.sort(words, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if not repeated.any():
        return words
    words = words.copy()
    for r in np.unique(np.nonzero(repeated)[0]):
        _, first = np.unique(words[r], return_index=True)
        keep = np.zeros(words.shape[1], bool)
        keep[first] = True
        words[r, ~keep] = -1
    return words


def _residual_sums(desc, words, centroids, images):
    n, d = desc.shape
    k = words.shape[1]
    n_words = centroids.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    flat = words.ravel()
    valid = flat >= 0
    if not valid.all():
        rows, flat = rows[valid], flat[valid]
    if len(flat) == 0:
        return np.zeros((0, d), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    key = images[rows] * n_words + flat
    # Stable: within a segment descriptors keep their input order, so float sums are computed
    # in the same order as a per-word loop would.
    order = np.argsort(key, kind="stable")
    key = key[order]
    rows, flat = rows[order], flat[order]
    starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
    residuals = desc[rows]
    residuals -= centroids[flat]
    # Most (image, word) segments hold one descriptor; reduceat pays per segment, so it only
    # runs over the segments with several (same sequential float32 order either way).
    lengths = np.diff(np.append(starts, len(key)))
    sums = residuals[starts]
    several = lengths > 1
    if several.any():
        members = np.repeat(several, lengths)
        sub_lengths = lengths[several]
        sub_starts = np.concatenate(([0], np.cumsum(sub_lengths)[:-1]))
        sums[several] = np.add.reduceat(residuals[members], sub_starts, axis=0)
    return sums, flat[starts], images[rows[starts]]


def code_words(dim: int) -> int:
    """uint64 words per packed code of a dim-dimensional residual."""
    return (int(dim) + 63) // 64


def pack_signs(bits: np.ndarray) -> np.ndarray:
    """(m, d) bool -> (m, ceil(d/64)) uint64; bit j of a vector is bit j % 64 of word j // 64."""
    bits = np.asarray(bits, bool)
    m, d = bits.shape
    width = code_words(d) * 64
    if width != d:
        bits = np.concatenate([bits, np.zeros((m, width - d), bool)], axis=1)
    packed = np.packbits(bits, axis=1, bitorder="little")  # (m, width / 8) uint8
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def unpack_signs(codes: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of pack_signs: (m, w) uint64 -> (m, dim) bool."""
    codes = np.ascontiguousarray(codes, dtype="<u8")
    bits = np.unpackbits(codes.view(np.uint8), axis=1, bitorder="little")
    return bits[:, :dim].astype(bool)


def binarize(sums: np.ndarray) -> np.ndarray:
    """Packed sign codes of residual sums: bit = sum > 0 (a zero component gives bit 0)."""
    return pack_signs(np.asarray(sums) > 0)


def l2_normalize(sums: np.ndarray) -> np.ndarray:
    """Unit-length rows (a zero row stays zero)."""
    sums = np.asarray(sums, np.float32)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)


def aggregate(descriptors: np.ndarray, word_ids: np.ndarray, centroids: np.ndarray,
              image_ids: Optional[np.ndarray] = None, binary: bool = True) -> Aggregated:
    """Aggregated ASMK vectors of one or several images: residual sums per (image, word), then
    sign codes (binary) or L2-normalised floats."""
    parts = []
    for chunk in _image_chunks(descriptors, word_ids, centroids, image_ids):
        sums, words, images = _residual_sums(*chunk)
        parts.append((binarize(sums) if binary else l2_normalize(sums), words, images))
    d = np.asarray(descriptors).shape[-1]
    return Aggregated(*_concatenate(parts, code_words(d) if binary else d, np.uint64 if binary else np.float32))


# -- similarity --------------------------------------------------------------------------------

def popcount(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each unsigned integer."""
    return np.bitwise_count(np.asarray(x)).astype(np.int64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances of packed codes (broadcast over leading axes, summed over the last)."""
    return popcount(np.bitwise_xor(a, b)).sum(axis=-1)


def hamming_similarity(distance, dim: int = 128):
    """s = 1 - 2 h / d."""
    return 1.0 - 2.0 * np.asarray(distance, np.float64) / dim


def selective_kernel(s, alpha: float = DEFAULT_ALPHA, tau: float = DEFAULT_TAU):
    """sigma(s) = s**alpha where s >= tau, else 0."""
    s = np.asarray(s, np.float64)
    keep = s >= tau
    out = np.zeros_like(s)
    out[keep] = np.power(s[keep], alpha)
    return out


def kernel_table(dim: int = 128, alpha: float = DEFAULT_ALPHA, tau: float = DEFAULT_TAU) -> np.ndarray:
    """(dim + 1,) float64: the selective kernel of every possible Hamming distance."""
    return selective_kernel(hamming_similarity(np.arange(dim + 1), dim), alpha, tau)


def idf_weights(df: np.ndarray, n_images: int) -> np.ndarray:
    """idf(w) = log(N / df(w))**2; a word no database image has weighs 1 (as asmk 0.1.1 does:
    it only changes the query's normalisation, never which image ranks first)."""
    df = np.asarray(df, np.float64)
    out = np.ones_like(df)
    seen = df > 0
    out[seen] = np.log(float(n_images) / df[seen]) ** 2
    return out
