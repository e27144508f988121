"""numba kernels of the inverted file: postings merge and compaction, per-word and per-image
sums, and the batched search (a stamp-and-accumulate loop per query, then a heap top-k).

Search runs queries spread over threads, each thread with its own dense score buffer (reset
sparsely: only touched entries) and touched-image bitmap, a hardware popcount and a
(d + 1)-entry kernel table; no n_queries x n_images matrix is ever built.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _popcount(typingctx, x):
    """Hardware population count of an unsigned 64-bit integer (LLVM ctpop)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(x), codegen


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch arr[idx] into cache for writing (LLVM prefetch); no effect on results."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, array, [args[1]], wraparound=False)
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [byte_pointer, i32, i32, i32]), "llvm.prefetch")
        builder.call(fn, [builder.bitcast(pointer, byte_pointer), i32(1), i32(3), i32(1)])  # write, keep, data
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


@njit(cache=True)
def copy_blocks(src_vec, src_ids, src_off, dst_vec, dst_ids, cursor):
    """Append each word's block of a word-sorted chunk at that word's cursor in dst."""
    for w in range(len(src_off) - 1):
        a, b = src_off[w], src_off[w + 1]
        if b > a:
            c = cursor[w]
            dst_vec[c:c + b - a] = src_vec[a:b]
            dst_ids[c:c + b - a] = src_ids[a:b]
            cursor[w] = c + b - a


@njit(cache=True)
def compact_postings(offsets, vectors, image_ids, new_position, keep, out_off, out_vec, out_ids):
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
def alive_df(offsets, image_ids, alive):
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
def weighted_norms(offsets, image_ids, weight, n_images):
    """Per image, the sum of the weights of its words."""
    out = np.zeros(n_images, np.float64)
    for w in range(len(offsets) - 1):
        wt = weight[w]
        for p in range(offsets[w], offsets[w + 1]):
            out[image_ids[p]] += wt
    return out


@njit(cache=True, inline="always")
def _worse(sa, ia, sb, ib):
    """Ranking order: higher score first, then lower database position."""
    return sa < sb or (sa == sb and ia > ib)


@njit(cache=True, inline="always")
def _sift_down(heap_s, heap_i, size, s, img):
    """Place (s, img) at the root of the min-heap heap[:size] and sift it down."""
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


@njit(cache=True)
def top_k(touched, n_touched, acc, db_scale, q_scale, k, heap_s, heap_i, out_i, out_s):
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
            _sift_down(heap_s, heap_i, size, s, img)  # replace the worst
    # pop the worst repeatedly: fills the output from the back
    for r in range(size - 1, -1, -1):
        out_s[r] = heap_s[0]
        out_i[r] = heap_i[0]
        size -= 1
        _sift_down(heap_s, heap_i, size, heap_s[size], heap_i[size])


@njit(cache=True, inline="always")
def _accumulate(img, value, q, stamp, acc, touched, n_touched):
    """acc[img] += value for query q, resetting img's entry the first time q touches it (the
    stamp says which query last wrote it); returns the new number of touched images."""
    if stamp[img] != q:
        stamp[img] = q
        acc[img] = 0.0
        touched[n_touched] = img
        n_touched += 1
    acc[img] += value
    return n_touched


@njit(cache=True, inline="always")
def _query_buffers(n_db, k):
    """One search thread's buffers: scores, stamps (the last query that wrote an entry: entries
    are reset lazily), touched images, and the top-k heap."""
    return (np.zeros(n_db, np.float64), np.full(n_db, -1, np.int32), np.empty(n_db, np.int64),
            np.empty(k, np.float64), np.empty(k, np.int64))


@njit(cache=True, inline="always")
def _collect_touched(bits, touched):
    """Positions of the set bits of ``bits`` into touched (ascending), clearing the bitmap;
    returns their number."""
    n = 0
    one = np.uint64(1)
    for b in range(len(bits)):
        word = bits[b]
        if word != 0:
            bits[b] = 0
            base = b * 64
            while word != 0:
                low = word & (~word + one)  # lowest set bit
                touched[n] = base + _popcount(low - one)
                n += 1
                word ^= low
    return n


# Postings ahead whose score entry is prefetched: the entries are random reads over the whole
# database (397k images: 3 MB of float64, beyond this CPU's 2 MB L2); measured on a synthetic
# 397k-image index, 12.1 -> 9.1 ns per posting of CPU time (8: 10.0, 32: 9.3).
PREFETCH_AHEAD = 16


@njit(parallel=True, cache=True)
def search_binary(q_off, q_words, q_codes, q_scale, offsets, codes, image_ids, db_scale,
                  word_weight, table, k, workers):
    """Top-k of every query: per posting, one Hamming distance (two popcounts for 128-bit
    codes), one lookup in the query word's weighted kernel table and one add into a dense
    score buffer; a bitmap (n_db / 8 bytes, cache resident) records which images were touched,
    so the per-posting loop has no branch. Each image's contributions are added in the same
    order as a per-word loop would (query words in order, postings in order): the float64
    scores do not depend on the kernel's layout."""
    nq = len(q_off) - 1
    n_db = len(db_scale)
    nb = codes.shape[1]
    nt = len(table)
    out_i = np.full((nq, k), -1, np.int64)
    out_s = np.full((nq, k), -np.inf, np.float64)
    one = np.uint64(1)
    for worker in prange(workers):
        acc = np.zeros(n_db, np.float64)
        bits = np.zeros((n_db + 63) // 64, np.uint64)
        touched = np.empty(n_db, np.int64)
        heap_s, heap_i = np.empty(k, np.float64), np.empty(k, np.int64)
        weighted = np.empty(nt, np.float64)
        qc = np.empty(nb, np.uint64)
        for q in range(worker, nq, workers):
            for j in range(q_off[q], q_off[q + 1]):
                w = q_words[j]
                wt = word_weight[w]
                if wt == 0.0:
                    continue
                for h in range(nt):  # the same products the per-posting wt * table[h] gives
                    weighted[h] = wt * table[h]
                start, stop = offsets[w], offsets[w + 1]
                ahead = stop - PREFETCH_AHEAD
                if nb == 2:  # 128-bit codes: the common case, unrolled
                    q0, q1 = q_codes[j, 0], q_codes[j, 1]
                    for p in range(start, stop):
                        if p < ahead:
                            _prefetch(acc, image_ids[p + PREFETCH_AHEAD])
                        img = image_ids[p]
                        h = _popcount(q0 ^ codes[p, 0]) + _popcount(q1 ^ codes[p, 1])
                        acc[img] += weighted[h]
                        bits[img >> 6] |= one << (img & 63)
                else:
                    for b in range(nb):
                        qc[b] = q_codes[j, b]
                    for p in range(start, stop):
                        img = image_ids[p]
                        h = 0
                        for b in range(nb):
                            h += _popcount(qc[b] ^ codes[p, b])
                        acc[img] += weighted[h]
                        bits[img >> 6] |= one << (img & 63)
            n_touched = _collect_touched(bits, touched)
            # removed (or empty) images have db_scale 0 and are left out by top_k
            top_k(touched, n_touched, acc, db_scale, q_scale[q], k, heap_s, heap_i, out_i[q], out_s[q])
            for t in range(n_touched):
                acc[touched[t]] = 0.0
    return out_i, out_s


@njit(parallel=True, cache=True)
def search_float(q_off, q_words, q_vecs, q_scale, offsets, vecs, image_ids, db_scale,
                 word_weight, alpha, tau, k, workers):
    nq = len(q_off) - 1
    n_db = len(db_scale)
    d = vecs.shape[1]
    cube = alpha == 3.0
    out_i = np.full((nq, k), -1, np.int64)
    out_s = np.full((nq, k), -np.inf, np.float64)
    for worker in prange(workers):
        acc, stamp, touched, heap_s, heap_i = _query_buffers(n_db, k)
        for q in range(worker, nq, workers):
            n_touched = 0
            for j in range(q_off[q], q_off[q + 1]):
                w = q_words[j]
                wt = word_weight[w]
                if wt == 0.0:
                    continue
                for p in range(offsets[w], offsets[w + 1]):
                    s = 0.0
                    for t in range(d):
                        s += q_vecs[j, t] * vecs[p, t]
                    v = 0.0
                    if s >= tau:
                        v = s * s * s if cube else s ** alpha
                    n_touched = _accumulate(image_ids[p], wt * v, q, stamp, acc, touched, n_touched)
            top_k(touched, n_touched, acc, db_scale, q_scale[q], k, heap_s, heap_i, out_i[q], out_s[q])
    return out_i, out_s
