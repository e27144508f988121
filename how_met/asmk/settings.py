"""ASMK settings: codebook search and training defaults, the named codebook recipes (how each
codebook in ``codebooks/`` is, or is to be, made; see codebooks/README.md) and query defaults.

Light on purpose (no faiss, no numba): the command line builds its options from these names.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict


# Word assignment: "exact" (faiss flat L2, batched BLAS on all configured threads), "bfloat16" and
# "grouped" (below), or faiss's approximate searches by name ("ivf", "hnsw"). "auto" (the
# default, and what codebook files of round 1 recorded) is exact below GROUPED_MIN_WORDS words.
# On real HOW descriptors (README "Fidelity: word assignment") faiss's searches reached
# recall@5 and database top-1 agreement >= 0.99 only at settings as slow as exact search or
# slower (one thread; IVF 4 probes, round 1's default, kept 65% of the exact top 5). Their
# defaults below are the cheapest measured settings that keep both at 0.99 or above.
SEARCH_METHODS = ("auto", "exact", "bfloat16", "grouped", "ivf", "hnsw")
LEGACY_METHOD_NAMES = {"flat": "exact"}   # round-1 name of the exact search, still read from files
DEFAULT_NPROBE = 128             # of K / 16 lists: recall@5 / top-1 0.997 / 0.9997 (8k words), 0.994 / 0.998 (65k)
# HNSW: M 64, efSearch 256: recall@5 / top-1 0.996 / 0.997 (8k words), 0.995 / 0.994 (65k); M 32
# lost the nearest word of 1.4% of real descriptors at 65k even with efSearch 512, at more cost
DEFAULT_HNSW_M = 64
# "grouped" (how_met.asmk.grouped_search): exact distances to the words of each descriptor's
# 80 nearest groups of K / 64 words, one matrix product per group; "bfloat16"
# (how_met.asmk.bfloat16_search): a bfloat16 product with every word, its 12 best re-ranked
# exactly. "auto" uses bfloat16 from GROUPED_MIN_WORDS words on where the CPU has AMX tiles,
# grouped elsewhere: at 65,536 words on real HOW descriptors, recall@5 / top-1
# 1.000 / 1.000 (bfloat16) and 0.995 / 0.999 (grouped) for ~4x and ~3.5x less CPU than exact
# (README "Fidelity: word assignment"); smaller codebooks were not measured with them and stay exact.
GROUPED_MIN_WORDS = 65536
# A codebook trained with "auto" whose grouped search keeps less than this recall@5 or top-1 on
# its held-out descriptors records (and uses) the exact search instead.
AUTO_MIN_RECALL = 0.99
DEFAULT_EF_SEARCH = 256
DEFAULT_MAX_DESCRIPTORS = 2_000_000
# faiss k-means wants this many training points per centroid; fewer give noisy words
KMEANS_POINTS_PER_WORD = 39
RECALL_SAMPLE = 2000             # held-out descriptors the recorded assignment recall is measured on
# faiss k-means' own cap on training points per centroid; None: train on every sampled descriptor.
# The official HOW/ASMK codebook uses faiss's default, 256, and faiss's default seed, 1234.
OFFICIAL_POINTS_PER_CENTROID = 256
OFFICIAL_SEED = 1234

DEFAULT_K = 100                       # database images returned per query
DEFAULT_MULTIPLE_ASSIGNMENT = 5       # visual words per query descriptor
CODEBOOK_DIR = Path("codebooks")  # where a codebook goes without --out (relative to the working directory)

# Named codebook recipes: how each codebook in codebooks/ is (to be) made. See codebooks/README.md.
CODEBOOK_RECIPES: Dict[str, dict] = {
    "lite0-museum-1k": {
        "extractor": "lite0",
        "size": 1024,
        "iterations": 10,
        "seed": 0,
        "max_descriptors": 231_000,
        "images": "the 231 database images of ../shared/data/museum",
        "description": "small codebook for the bundled museum set (SPEC section 5 setting)",
    },
    "lite0-met-64k": {
        "extractor": "lite0",
        "size": 65536,
        "iterations": 10,
        "seed": 0,
        "max_descriptors": 20_000_000,
        "images": "20,000 Met database images drawn at random (seed 0), features at scale [1]",
        "description": "the Met codebook with the default (EfficientNet-Lite0) extractor",
    },
    "how-r18-met-64k": {
        "extractor": "how-r18",
        "size": 65536,
        "iterations": 10,
        "seed": OFFICIAL_SEED,
        "points_per_centroid": OFFICIAL_POINTS_PER_CENTROID,
        "max_descriptors": 20_000_000,
        "images": "20,000 training images other than the database (the official codebook used "
                  "SfM120k), features at scale [1]",
        "description": "the published HOW + ASMK codebook settings (official how_r18.pth checkpoint)",
    },
}


def auto_codebook_size(n_descriptors: int) -> int:
    """~200 descriptors per visual word (the published 65k words for ~20M descriptors are ~300),
    rounded to a power of two and kept within [1024, 65536].

    Measured HOW+ASMK GAP (2-fold cross-tuned) with the default extractor: museum (231k
    database descriptors) 97.3 at 1k words, 90.6 at 4k, 89.8 at 16k; landmarks (9k) 68.1 at
    256, 69.7 at 1k, 71.1 at 4k; demo museum (36k) 33.8 at 256, 60.7 at 1k, 86.1 at 4k.
    Fewer than 1k words are never better: with query multiple assignment 5 nearly every word
    is hit and the binary signatures of large residual sums stop telling images apart.
    """
    words = 2 ** int(round(math.log2(max(n_descriptors, 1) / 200)))
    return int(min(65536, max(1024, words)))
