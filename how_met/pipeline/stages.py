"""The stages of an evaluation run, each resumable in the work directory: extract -> codebook
-> index -> ASMK query, global search, rerank scores. A stage whose output exists is skipped."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Tuple

import numpy as np

from ..datasets import Dataset
from ..features.checkpoints import build_model, load_model, save_model
from ..features.extract import extract_to_store
from ..features.settings import shipped_path
from ..features.shipped import apply_whitening
from ..features.store import FeatureStore
from ..neighbours import Neighbours
from ..utils import atomic_path, configure_threads, configured_threads, write_json
from .settings import unsupervised_source

# Settings whose change makes a stage's saved output stale: a work directory made with other
# values is refused rather than silently resumed.
RESUME_KEYS = ("extract", "checkpoint", "codebook", "codebook_size", "codebook_iterations",
               "codebook_points_per_centroid", "multiple_assignment", "neighbours", "global_dims",
               "rerank_shortlist", "seed", "unsupervised", "features", "index")


def record_settings(work: Path, settings: dict) -> None:
    """Write ``work/settings.json``, refusing a work directory made with other RESUME_KEYS."""
    path = work / "settings.json"
    if path.exists():
        previous = json.loads(path.read_text())
        changed = [k for k in RESUME_KEYS if previous.get(k) != settings.get(k)]
        if changed:
            raise ValueError(f"{work}: was made with other settings ({', '.join(changed)}); "
                             f"use a new --work directory")
    write_json(path, settings)


class Timings:
    """Stage timings persisted beside the results, so a resumed run still reports them."""

    def __init__(self, path: Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.exists() else {}

    def set(self, key: str, value) -> None:
        self.values[key] = value
        write_json(self.path, self.values)

    def get(self, key: str, default=None):
        return self.values.get(key, default)


THREADED_STAGES = ("codebook", "index", "how-asmk", "global", "global+rerank")


def stage_threads(timings: Timings, stage: str) -> int:
    """Size the thread pools for a stage about to run, to the cores free now rather than once
    per run: an evaluate started while the machine was busy trained its 16k-word codebook (30+
    minutes) on one thread while the second core sat idle. Recorded as ``<stage>_threads``."""
    threads = configure_threads()
    timings.set(f"{stage}_threads", threads)
    return threads


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def given_extraction(features) -> dict:
    """The extraction settings a feature store given to evaluate (``settings["features"]``)
    was made with, as its own record says."""
    from ..features.extract import extraction_config_of
    with FeatureStore(features) as store:
        return extraction_config_of(store.config)


def _given_features(ds: Dataset, features: Path, model_path: Path, skip_bad: bool) -> Path:
    """A feature store the user already has, in place of the extraction: it must hold every
    image (with ``skip_bad`` the others take no part) and name its model, which the work
    directory keeps a copy of (the recogniser's)."""
    with FeatureStore(features) as store:
        missing = [key for key in ds.all_keys() if key not in store]
        model_file = store.model_file
    if missing and (not skip_bad or len(missing) == len(ds.all_keys())):
        raise ValueError(f"{features}: holds no features of {len(missing)} of the dataset's images (first: "
                         f"{missing[0]}); extract them into it, or evaluate without them (--skip-bad)")
    if model_file is None or not model_file.is_file():
        raise FileNotFoundError(f"{features}: names no model file (or it is missing); evaluate needs the "
                                f"model that made the descriptors")
    if not model_path.exists():
        with atomic_path(model_path) as tmp:
            shutil.copyfile(model_file, tmp)
    return features


def stage_extract(ds: Dataset, work: Path, settings: dict, timings: Timings, device: str,
                  ray=None) -> Path:
    """Features of every image: the store given in the settings (``features``), else extracted;
    the model's whitening is the shipped one (unsupervised_source) or is learned from the
    database images. ``ray``: extract on a Ray cluster (see ``extract_to_store``)."""
    features = work / "features.h5"
    model_path = work / "model.pt"
    if settings.get("features"):
        return _given_features(ds, Path(settings["features"]), model_path, settings.get("skip_bad", False))
    if model_path.exists():
        model = load_model(str(model_path), device)
    else:
        model = build_model(**settings["extract"]["model"], checkpoint=settings.get("checkpoint"),
                            device=device)
        shipped = unsupervised_source(settings, len(ds.db_keys))
        if shipped:
            apply_whitening(model, shipped)
    stats = extract_to_store(ds.image_root, ds.all_keys(), features, config=settings["extract"],
                             model=model, device=device, whiten_keys=ds.db_keys,
                             model_out=model_path, skip_bad=settings.get("skip_bad", False), ray=ray)
    if not model_path.exists():
        save_model(model, model_path)
    if stats["extracted"]:
        timings.set("extract_images_per_s", stats["images_per_s"])
        timings.set("extract_threads", configured_threads())
    return features


def stage_codebook(ds: Dataset, work: Path, features: Path, settings: dict, timings: Timings):
    """The codebook file given in the settings (trained separately, as the published one was),
    else the shipped one when the whitening is shipped (unsupervised_source), else one trained
    on the database descriptors and kept in the work directory."""
    from ..asmk.codebook import Codebook, codebook_size_for
    if settings.get("codebook"):  # build_index checks that it fits the features
        return Codebook.load(settings["codebook"])
    path = work / "codebook.npz"
    if path.exists():
        return Codebook.load(path)
    shipped = unsupervised_source(settings, len(ds.db_keys))
    if shipped and not settings.get("codebook_size"):  # the one learned with the shipped whitening
        codebook = Codebook.load(shipped_path(shipped, "codebook"))
        codebook.save(path)  # the run's codebook lives in the work directory (recogniser, report)
        return codebook
    stage_threads(timings, "codebook")
    size = settings.get("codebook_size") or codebook_size_for(features, ds.db_keys)
    codebook = Codebook(size=size, iterations=settings["codebook_iterations"], seed=settings["seed"],
                        points_per_centroid=settings.get("codebook_points_per_centroid"))
    codebook.train(features, keys=ds.db_keys)
    codebook.save(path)
    return codebook


def index_path(work: Path, settings: dict) -> Path:
    """The inverted file of the run: the one given in the settings, else the one built in ``work``."""
    return Path(settings["index"]) if settings.get("index") else work / "index"


def stage_index(ds: Dataset, work: Path, features: Path, codebook, settings: dict, timings: Timings):
    """The index given in the settings (``index``: it must hold exactly the database images),
    else one built from the features in the work directory."""
    from ..asmk.indexing import build_index
    from ..asmk.inverted_file import InvertedFile, load_index
    if settings.get("index"):
        index = load_index(settings["index"], codebook)
        extra, missing = set(index.keys) - set(ds.db_keys), set(ds.db_keys) - set(index.keys)
        if extra or missing:
            raise ValueError(f"{settings['index']}: holds {len(extra)} images outside the dataset's database "
                             f"and lacks {len(missing)} of its images; give the index of the database")
        return index
    path = work / "index"
    if not path.exists():
        stage_threads(timings, "index")
        started = time.perf_counter()
        build_index(features, codebook, keys=ds.db_keys).save(path)
        timings.set("index_build_s", time.perf_counter() - started)
    return InvertedFile.load(path)


def dir_megabytes(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2 ** 20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2 ** 20


def stage_asmk_query(ds: Dataset, work: Path, features: Path, codebook, index, settings: dict,
                     timings: Timings) -> Neighbours:
    from ..asmk.query import query_store
    path = work / "neighbours" / "how-asmk.h5"
    if path.exists():
        return Neighbours.load(path)
    stage_threads(timings, "how-asmk")
    # The first query compiles the numba kernels (tens of ms per image on a first run): timed
    # apart, so that the per-image time is what every later query costs.
    started = time.perf_counter()
    query_store(index, codebook, features, keys=ds.query_keys[:1], k=settings["neighbours"],
                multiple_assignment=settings["multiple_assignment"], show_progress=False)
    timings.set("how-asmk_first_query_ms", 1000 * (time.perf_counter() - started))
    started = time.perf_counter()
    result = query_store(index, codebook, features, keys=ds.query_keys, k=settings["neighbours"],
                         multiple_assignment=settings["multiple_assignment"])
    timings.set("how-asmk_query_ms", 1000 * (time.perf_counter() - started) / max(1, len(ds.query_keys)))
    result.save(path)
    return result


def stage_global(ds: Dataset, work: Path, features: Path, settings: dict, timings: Timings) -> Neighbours:
    from ..features.whitening import PCAWhitening
    from ..recognition.global_search import global_neighbours
    path = work / "neighbours" / "global.h5"
    if path.exists():
        return Neighbours.load(path)
    stage_threads(timings, "global")
    with FeatureStore(features) as store:
        db = store.global_descriptors(ds.db_keys)
        queries = store.global_descriptors(ds.query_keys)
    whitening_path = work / "global_whitening.npz"
    if whitening_path.exists():
        whitening = PCAWhitening.load(whitening_path)
    else:
        whitening = PCAWhitening.learn(db, dims=settings["global_dims"])
        whitening.save(whitening_path)
    db_w = whitening.apply(db)
    started = time.perf_counter()
    result = global_neighbours(db_w, whitening.apply(queries), settings["neighbours"],
                               ds.db_keys, ds.query_keys)
    timings.set("global_query_ms", 1000 * (time.perf_counter() - started) / max(1, len(ds.query_keys)))
    timings.set("global_index_mb", db_w.nbytes / 2 ** 20)
    timings.set("global_whitening", whitening.note or whitening.mode)
    result.save(path)
    return result


def aligned(neigh: Neighbours, ds: Dataset) -> Tuple[np.ndarray, np.ndarray]:
    """(indices into ds.db_keys, scores) with rows in ds.query_keys order."""
    row_of = {k: i for i, k in enumerate(neigh.query_keys)}
    rows = np.array([row_of[k] for k in ds.query_keys])
    db_pos = {k: i for i, k in enumerate(ds.db_keys)}
    remap = np.array([db_pos[k] for k in neigh.db_keys] + [-1], np.int64)
    indices = remap[neigh.indices[rows]]  # -1 padding maps to the appended -1
    return indices, neigh.scores[rows]


def stage_rerank(ds: Dataset, work: Path, features: Path, codebook, global_neigh: Neighbours,
                 settings: dict, timings: Timings):
    """Score components (global, ASMK, inliers) of the global top-``rerank_shortlist`` from the
    local-feature reranker, saved to neighbours/global+rerank.npz (plain arrays)."""
    from ..verify.reranker import Reranker
    from ..verify.scores import score_shortlist
    saved = load_rerank_scores(work)
    if saved is not None:
        return saved
    stage_threads(timings, "global+rerank")
    shortlist_size = settings["rerank_shortlist"]
    shortlist = Neighbours(global_neigh.query_keys, global_neigh.db_keys,
                           global_neigh.indices[:, :shortlist_size], global_neigh.scores[:, :shortlist_size])
    with Reranker(features, codebook, multiple_assignment=settings["multiple_assignment"]) as reranker:
        started = time.perf_counter()  # the first query compiles the RANSAC kernels: timed apart
        first = Neighbours(shortlist.query_keys[:1], shortlist.db_keys, shortlist.indices[:1], shortlist.scores[:1])
        score_shortlist(reranker, features, first, show_progress=False)
        timings.set("global+rerank_first_query_ms", 1000 * (time.perf_counter() - started))
        reranker.clear_cache()
        started = time.perf_counter()
        scores = score_shortlist(reranker, features, shortlist)
    timings.set("global+rerank_query_ms", 1000 * (time.perf_counter() - started) / max(1, len(ds.query_keys))
                + timings.get("global_query_ms", 0.0))
    with atomic_path(work / RERANK_SCORES, suffix=".npz") as tmp:
        np.savez(tmp, query_keys=np.array(scores.query_keys, dtype=str),
                 db_keys=np.array(list(scores.db_keys), dtype=str),
                 **{name: getattr(scores, name) for name in _RERANK_FIELDS})
    return scores


RERANK_SCORES = Path("neighbours") / "global+rerank.npz"
_RERANK_FIELDS = ("indices", "global_scores", "asmk", "inliers")


def load_rerank_scores(work: Path):
    """The saved ShortlistScores of the global+rerank stage, or None if not computed yet."""
    from ..verify.scores import ShortlistScores
    path = Path(work) / RERANK_SCORES
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as saved:
        return ShortlistScores(query_keys=saved["query_keys"].tolist(), db_keys=saved["db_keys"].tolist(),
                               **{name: saved[name] for name in _RERANK_FIELDS})

