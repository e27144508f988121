"""Evaluation, demo and report settings: the methods, the default and quick settings and how
settings are merged, the demo museum sizes, the report's query limit. Light on purpose (no
torch): the command line builds its options from these names."""
from __future__ import annotations

import copy
from typing import Optional

from ..asmk.settings import OFFICIAL_POINTS_PER_CENTROID, OFFICIAL_SEED
from ..features.settings import CONFIGS, DEFAULT_CONFIG, SHIPPED_MODELS, shipped_parts_for
from ..recognition.acceptance import DEFAULT_TARGET_PRECISION

METHODS = ("global", "how-asmk", "fusion", "global+rerank")

DEFAULT_SETTINGS = {
    "extract": copy.deepcopy(CONFIGS[DEFAULT_CONFIG]),
    "checkpoint": None,
    "codebook": None,                 # a codebook file trained separately; None: train on the database
    "codebook_size": None,            # None: ~200 database descriptors per word, in [1024, 65536]
    "codebook_iterations": 10,
    "codebook_points_per_centroid": None,  # faiss k-means' cap; None: every sampled descriptor
    "multiple_assignment": 5,
    "neighbours": 100,                # database images kept per query (>= the largest K)
    "global_dims": 128,
    "rerank_shortlist": 100,
    # global+rerank's fusion weights: "default" (FusionWeights(), fixed; only K and t are tuned)
    # or "tuned" (every point of recognition.fusion.DEFAULT_FUSION_GRID competes on the tuning
    # queries; worse on every shared set, see FusionWeights, but there for large validation sets)
    "rerank_weights": "default",
    "methods": list(METHODS),
    "seed": 0,
    "target_precision": DEFAULT_TARGET_PRECISION,  # the recogniser's accept threshold: validation precision
    # Where the whitening and the codebook come from: "auto" (the shipped parts for a database
    # smaller than their training corpus, see unsupervised_source), "database", or a name in
    # SHIPPED_MODELS.
    "unsupervised": "auto",
}
# Fast settings for the test suite and `how-met demo --quick`.
QUICK_SETTINGS = {
    **copy.deepcopy(DEFAULT_SETTINGS),
    "extract": {**copy.deepcopy(CONFIGS[DEFAULT_CONFIG]), "features_num": 400, "image_size": 320,
                "scales": [1.0, 0.707]},
}


# The published configurations (Tolias et al. ECCV 2020 + the Met paper), reproduced exactly
# with ``--config how-r18`` / ``how-r50``: the extraction config of that name (official resize
# rule and image loading), the official codebook settings (65,536 words, 10 iterations, faiss's
# cap of 256 points per centroid and seed 1234 -- the run's seed, so --repeats continues from
# it; the official codebook was trained on separate images: give it with ``codebook``) and the
# Met evaluation's 512-D global baseline.
PUBLISHED = {
    name: {"extract": copy.deepcopy(CONFIGS[name]), "codebook_size": 65536, "codebook_iterations": 10,
           "seed": OFFICIAL_SEED, "codebook_points_per_centroid": OFFICIAL_POINTS_PER_CENTROID,
           "global_dims": 512}
    for name in ("how-r18", "how-r50")
}


def unsupervised_source(settings: dict, n_db_images: int) -> Optional[str]:
    """The shipped model whose whitening and codebook an evaluation uses, or None when the
    database learns its own. "auto": ``shipped_parts_for`` (the rule ``how-met recogniser``
    follows too), unless a checkpoint or codebook is given (their whitening is another one)."""
    choice = settings.get("unsupervised", "auto")
    if choice == "database":
        return None
    if choice != "auto":
        if choice not in SHIPPED_MODELS:
            raise ValueError(f"unknown unsupervised source {choice!r}; choose auto, database or "
                             f"one of {', '.join(SHIPPED_MODELS)}")
        return choice
    if settings.get("checkpoint") or settings.get("codebook"):  # their whitening is another one
        return None
    return shipped_parts_for(settings["extract"]["model"], n_db_images)


def merge_settings(settings: Optional[dict], overrides: dict) -> dict:
    merged = copy.deepcopy(DEFAULT_SETTINGS)
    for source in (settings or {}, overrides):
        for key, value in source.items():
            if value is None:
                continue
            if key == "extract":
                merged["extract"] = {**merged["extract"], **copy.deepcopy(value)}
            else:
                merged[key] = copy.deepcopy(value)
    return merged


DEMO_SIZE = {"n_exhibits": 35, "n_queries": 45, "n_distractors": 15}
QUICK_SIZE = {"n_exhibits": 12, "n_queries": 18, "n_distractors": 6}
DEFAULT_QUERIES_SHOWN = 3000  # a Met test run has 19k queries; the report shows this many (in pages)
