"""ASMK settings: codebook search and training defaults, the named codebook recipes (how each
codebook in ``codebooks/`` is, or is to be, made; see codebooks/README.md) and query defaults.

Light on purpose (no faiss, no numba): the command line builds its options from these names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

SEARCH_METHODS = ("auto", "flat", "ivf", "hnsw")
APPROX_THRESHOLD = 8192          # codebooks at least this large use an approximate search
DEFAULT_NPROBE = 4
DEFAULT_HNSW_M = 32
DEFAULT_EF_SEARCH = 32
DEFAULT_MAX_DESCRIPTORS = 2_000_000

DEFAULT_K = 100                       # database images returned per query
DEFAULT_MULTIPLE_ASSIGNMENT = 5       # visual words per query descriptor
REPO_CODEBOOKS = Path(__file__).resolve().parents[2] / "codebooks"

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
        "seed": 0,
        "max_descriptors": 20_000_000,
        "images": "20,000 Met database images drawn at random (seed 0), features at scale [1]",
        "description": "the published HOW + ASMK setting (official how_r18.pth checkpoint)",
    },
}


def default_codebook_dir() -> Path:
    """The repository's codebooks/ folder in a source checkout, else ./codebooks."""
    return REPO_CODEBOOKS if REPO_CODEBOOKS.is_dir() else Path.cwd() / "codebooks"


