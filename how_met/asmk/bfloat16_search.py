"""Word assignment by a bfloat16 product with every word, then exact distances to the best few.

One matrix product of the descriptors with ALL K words, in bfloat16 (torch/oneDNN: AMX tiles on
CPUs that have them), gives every descriptor's approximate score for every word; a numba kernel
keeps the CANDIDATES best of each row as the blocks of the product come out (one vector compare
per span of 32 words marks the few better than the row's current worst), and the candidates
are re-ranked by their exact squared L2 distances (float64 sums). The result is the exact search's
unless a true top-k word falls outside the CANDIDATES best of the bfloat16 scores: on 20,000 real
HOW descriptors and 65,536 words the true top 5 ranked at most 7th there, the true nearest word
at most 3rd, so CANDIDATES = 12 leaves a margin of five (16 candidates cost ~4 ms more per 1000
descriptors than 8).

Why: the distances ||x - c||^2 = ||x||^2 - 2 (x.c - ||c||^2 / 2) rank as the score x.c - ||c||^2 / 2,
which is a single product when the words carry -||c||^2 / 2 as one more coordinate and the
descriptors a 1 there. In bfloat16 on AMX that product of 1,000 descriptors with 65,536 words takes
~17 ms on one core of this machine (float32 BLAS: ~90 ms), and it reads each word once per block of
1,024 descriptors, where a probed search reads its probed words once per descriptor (README
"Fidelity: word assignment"). Without AMX they are not fast enough: on an AMD Zen 5 (AVX512-BF16,
no AMX) the product alone took ~48 ms and the search 80 ms per 1000 real descriptors against
the grouped search's 56, so ``"auto"`` keeps the grouped search there (``bfloat16_products_fast``).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Tuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .grouped_search import exact_top_k, insert_sorted, search_in_parts
from .kernels import splat

CANDIDATES = 12        # best bfloat16 scores per descriptor re-ranked exactly (see the docstring)
SPAN = 32              # words one vector compare of _merge_scores covers
BLOCK_WORDS = 512      # words per product block; measured per 1000 descriptors (65k words, one
BLOCK_ROWS = 1024      # thread): 27 ms at 1,024 x 512, 29 at 1,024 x 256 or 512 x 512
PART_DESCRIPTORS = 4096  # descriptors one thread searches at a time


@lru_cache(maxsize=None)
def bfloat16_products_fast() -> bool:
    """Whether this CPU multiplies bfloat16 matrices on AMX tiles (with AVX512-BF16), as torch
    reports it; False where torch cannot tell. AVX512-BF16 alone is not enough (module docstring)."""
    try:
        import torch
        return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported())
    except (ImportError, AttributeError, RuntimeError):
        return False


@intrinsic
def _bf16_value(typingctx, bits):
    """The float32 value of a bfloat16 given by its 16 bits (the high half of a float32)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        wide = builder.zext(builder.trunc(args[0], ir.IntType(16)), i32)
        return builder.bitcast(builder.shl(wide, ir.Constant(i32, 16)), ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _above(typingctx, scores, row, start, threshold):
    """Bit j set for each of the SPAN bfloat16 values scores[row, start + j] (int16 bits of a
    C-contiguous 2-D array) above the float32 threshold: one vector load, widen and compare."""
    if not (isinstance(scores, types.Array) and scores.ndim == 2 and scores.layout == "C"
            and scores.dtype == types.int16 and threshold == types.float32):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, signature.args[0], array, [args[1], args[2]],
                                           wraparound=False)
        i16, i32, real = ir.IntType(16), ir.IntType(32), ir.FloatType()
        v_i16, v_i32, v_real = ir.VectorType(i16, SPAN), ir.VectorType(i32, SPAN), ir.VectorType(real, SPAN)
        bits = builder.load(builder.bitcast(pointer, v_i16.as_pointer()), align=2)
        values = builder.bitcast(builder.shl(builder.zext(bits, v_i32), ir.Constant(v_i32, [16] * SPAN)), v_real)
        above = builder.bitcast(builder.fcmp_ordered(">", values, splat(builder, args[3], SPAN)), ir.IntType(SPAN))
        return builder.zext(above, ir.IntType(64))

    return types.int64(scores, row, start, threshold), codegen


@intrinsic
def _lowest_bit(typingctx, x):
    """Position of the lowest set bit of a nonzero int64 (LLVM cttz)."""
    if x != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.int64(x), codegen


@njit(cache=True, nogil=True)
def _merge_scores(scores, n_rows, first_row, first_word, best_neg, best_i):
    """Scores (rows, W) of a block of words (int16 bits of bfloat16, W a multiple of SPAN) into
    each row's running best, kept as negated scores (best_neg ascending, as distances are; ties
    keep the earlier word; NaN never enters). Only the words of a span above the row's current
    worst are looked at (the compare's mask)."""
    m = best_neg.shape[1]
    for r in range(n_rows):
        row = first_row + r
        worst = -best_neg[row, m - 1]
        for start in range(0, scores.shape[1], SPAN):
            mask = _above(scores, r, start, worst)
            while mask != 0:
                j = start + _lowest_bit(mask)
                mask &= mask - 1
                v = _bf16_value(scores[r, j])
                if v > worst:
                    worst = -insert_sorted(best_neg, best_i, row, -v, first_word + j)


@contextmanager
def _torch_threads(n: int):
    """torch's intra-op pool at n threads for the block (each search thread runs its own
    products: a pool per caller would put several threads on each core)."""
    import torch
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


class BFloat16Search:
    """Nearest words of ``centroids`` by a bfloat16 product with every word, re-ranked exactly."""

    def __init__(self, centroids: np.ndarray):
        import torch
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        n_words, dim = self.centroids.shape
        self.width = -(-(dim + 1) // 32) * 32  # AMX tiles take 32 bfloat16 per row
        self.block_words = int(min(BLOCK_WORDS, -(-n_words // SPAN) * SPAN))
        padded = -(-n_words // self.block_words) * self.block_words
        words = np.zeros((padded, self.width), np.float32)
        words[:n_words, :dim] = self.centroids
        words[:n_words, dim] = -0.5 * (self.centroids.astype(np.float64) ** 2).sum(1)
        words[n_words:, dim] = -np.inf  # padding words: never a candidate
        self.words = torch.from_numpy(words).to(torch.bfloat16)

    def search(self, descriptors: np.ndarray, k: int, threads: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        """((n, k) float32 squared L2 distances, (n, k) int64 word ids), nearest first, on
        ``threads`` threads (parts of at most PART_DESCRIPTORS, one torch thread each: torch's
        pool is set to one thread for the call, and restored). A descriptor with fewer than k
        candidates (fewer words, or NaN scores) gets id -1 (distance inf) in the remaining places."""
        x = np.ascontiguousarray(descriptors, np.float32)
        n = len(x)
        k = int(min(k, len(self.centroids)))
        dist = np.full((n, k), np.inf, np.float32)
        ids = np.full((n, k), -1, np.int64)
        with _torch_threads(1):
            search_in_parts(self._search_part, x, dist, ids, threads, PART_DESCRIPTORS)
        return dist, ids

    def _search_part(self, x, dist, ids) -> None:
        import torch
        n, dim = x.shape
        if n == 0:
            return
        # rows per product: a power of two up to BLOCK_ROWS, so that few product shapes occur
        # (oneDNN prepares a kernel for each new shape, ~1 ms)
        rows = int(min(BLOCK_ROWS, max(32, 1 << int(np.ceil(np.log2(n))))))
        m = int(min(CANDIDATES, len(self.centroids)))
        best_neg = np.full((n, m), np.inf, np.float32)
        best_i = np.full((n, m), -1, np.int64)
        lhs = torch.zeros((-(-n // rows) * rows, self.width), dtype=torch.bfloat16)
        lhs[:n, :dim] = torch.from_numpy(x)
        lhs[:n, dim] = 1.0
        out = torch.empty((rows, self.block_words), dtype=torch.bfloat16)
        scores = out.view(torch.int16).numpy()
        for r0 in range(0, n, rows):
            block = lhs[r0:r0 + rows]
            for w0 in range(0, len(self.words), self.block_words):
                torch.matmul(block, self.words[w0:w0 + self.block_words].T, out=out)
                _merge_scores(scores, min(rows, n - r0), r0, w0, best_neg, best_i)
        exact_top_k(x, self.centroids, best_i, dist, ids)
