"""The aggregated codes of database images, read from the inverted file instead of a record:
compact records (``how_met.asmk.records``, format 2) do not keep the ~12.5 KB per image the index
already holds, so the reranker looks each (image, word) up in the word's postings.

Within a word, postings are sorted by image position (``InvertedFile.add`` and the assembly
from records append images in order; ``subset``/``compact`` keep it), so one lookup is a binary
search over that word's image ids (log2 of its postings) and one 16-byte read of the code.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _find_postings(offsets, image_ids, slots, words, out):
    """out[i] = the posting of image slots[i] in word words[i], or -1 if the word does not hold it."""
    for i in range(len(words)):
        start, stop = offsets[words[i]], offsets[words[i] + 1]
        lo, hi, target = start, stop, slots[i]
        while lo < hi:
            mid = (lo + hi) // 2
            if np.int64(image_ids[mid]) < target:
                lo = mid + 1
            else:
                hi = mid
        out[i] = lo if lo < stop and np.int64(image_ids[lo]) == target else -1


def codes_from_index(index, slots: np.ndarray, words: np.ndarray, keys=None) -> np.ndarray:
    """(m, width) uint64 codes of (image position, word) pairs from ``index``'s postings;
    ValueError (one line) when the index holds no such vector (records of another database)."""
    arrays = index.arrays()
    slots = np.ascontiguousarray(slots, np.int64)
    words = np.ascontiguousarray(words, np.int64)
    found = np.empty(len(words), np.int64)
    if len(words):
        _find_postings(arrays["offsets"], arrays["image_ids"], slots, words, found)
    missing = np.flatnonzero(found < 0)
    if len(missing):
        i = missing[0]
        image = keys[int(slots[i])] if keys is not None else f"position {int(slots[i])}"
        raise ValueError(f"{index.path or 'the inverted file'}: holds no vector of word {int(words[i])} for "
                         f"{image!r} ({len(missing)} missing): the index was not assembled from these records")
    return np.asarray(arrays["vectors"][found])
