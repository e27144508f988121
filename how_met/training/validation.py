"""Validation GAP of a model in training, as the Met paper chooses its best epoch: the kNN
classifier on the training descriptor (one scale, no PCA-whitening), (K, t) tuned on the
validation queries themselves.

The validation queries are either a dataset's own validation split (the Met's val queries) or,
when the data has none, synthetic: training images held out of training, whose originals are the
validation database and whose harder augmentations (crops of ``VAL_CROP_SCALE``) are the
queries; a quarter of the held-out images stay out of the database and are the distractors.
Neither uses an evaluation's query images.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..datasets import DISTRACTOR, Dataset
from ..features.network import HOWNet
from ..recognition.global_search import global_search
from ..recognition.knn import DEFAULT_KS
from ..recognition.protocol import tune
from .data import BadImages, TrainingImages
from .objective import describe
from .settings import VAL_CROP_SCALE, VAL_DISTRACTOR_FRACTION

_VALIDATION_STREAM = 1 << 20  # seeds the held-out draw and query augmentations apart from training's


@dataclass
class ValidationSet:
    root: Path
    db_keys: List[str]
    db_labels: np.ndarray
    query_keys: List[str]
    query_labels: np.ndarray
    query_augmentations: Optional[List[Tuple[int, ...]]]  # per query its augmentation seed; None: as they are
    description: str

    def digest(self) -> str:
        h = hashlib.sha256(self.description.encode())
        for part in (self.db_keys, self.db_labels.tolist(), self.query_keys, self.query_labels.tolist(),
                     self.query_augmentations):
            h.update(repr(part).encode())
        return h.hexdigest()[:16]


def dataset_validation(ds: Dataset) -> ValidationSet:
    """The validation queries of ``ds`` (its "val" split, else all its queries) against its database."""
    split = "val" if "val" in ds.query_splits else "all"
    keys, labels, _ = ds.split(split)
    if not np.any(labels != DISTRACTOR):
        raise ValueError(f"{ds.name}: the {split} queries hold no query of a database class to validate with")
    return ValidationSet(Path(ds.image_root), list(ds.db_keys), np.asarray(ds.db_labels, np.int64), keys,
                         np.asarray(labels, np.int64), None, f"{ds.name} {split} queries")


def synthetic_validation(images: TrainingImages, n: int, seed: int) -> Tuple[ValidationSet, TrainingImages]:
    """``n`` images of classes with a single image held out of ``images`` as a synthetic
    validation set (see the module docstring); returns it and the images left to train on."""
    counts = np.unique(images.labels, return_counts=True)
    singletons = np.flatnonzero(np.isin(images.labels, counts[0][counts[1] == 1]))
    n_distractors = int(round(n * VAL_DISTRACTOR_FRACTION))
    if n - n_distractors < 2 or len(singletons) < n or len(images) - n < 2:
        raise ValueError(f"a synthetic validation set of {n} images needs at least {n} images of single-image "
                         f"classes and 2 left to train on ({len(singletons)} of {len(images)} images qualify); "
                         f"give fewer validation images or a validation dataset")
    rng = np.random.default_rng([seed, _VALIDATION_STREAM])
    held = rng.choice(singletons, n, replace=False)
    distractors, database = np.sort(held[:n_distractors]), np.sort(held[n_distractors:])
    queries = np.concatenate([database, distractors])
    labels = np.concatenate([images.labels[database], np.full(len(distractors), DISTRACTOR)])
    val = ValidationSet(images.root, [images.keys[i] for i in database], images.labels[database],
                        [images.keys[i] for i in queries], labels.astype(np.int64),
                        [(seed, _VALIDATION_STREAM, int(i)) for i in queries],
                        f"{n} held-out training images ({len(distractors)} as distractors), "
                        f"augmented queries (crops {VAL_CROP_SCALE[0]:g}-{VAL_CROP_SCALE[1]:g})")
    return val, images.subset(np.setdiff1d(np.arange(len(images)), held))


def validation_gap(model: HOWNet, val: ValidationSet, image_size: int, autocast: bool = False,
                   bad: Optional[BadImages] = None) -> float:
    """GAP (percent) of the kNN classifier on ``val`` with the training descriptor, at the best
    (K, t) of the Met grid. Images that a skipping ``bad`` finds unreadable take no part."""
    bad = bad or BadImages()
    db = describe(model, val.root, val.db_keys, image_size, autocast, desc="validation database", bad=bad)
    queries = describe(model, val.root, val.query_keys, image_size, autocast, val.query_augmentations,
                       VAL_CROP_SCALE, desc="validation queries", bad=bad)
    db_kept, query_kept = bad.kept(val.db_keys), bad.kept(val.query_keys)
    if not db_kept.any() or not np.any(val.query_labels[query_kept] != DISTRACTOR):
        raise ValueError(f"{val.description}: no readable validation image left to validate with")
    indices, scores = global_search(db[db_kept], queries[query_kept], max(DEFAULT_KS))
    _, grid = tune(indices, scores, val.db_labels[db_kept], val.query_labels[query_kept])
    return float(100 * grid.max())
