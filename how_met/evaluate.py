"""The whole Met protocol behind one command: extract -> codebook -> index -> query -> global
baseline -> kNN classifier -> GAP, every stage resumable in a work directory.

Work directory layout (each file is written atomically; a stage whose output exists is skipped)::

    model.pt                 HOW model with the PCA-whitening learned on the database
    features.h5              local + GeM features of database and query images
    codebook.npz / .json     visual words
    index/                   binary ASMK inverted file of the database
    global_whitening.npz     PCA-whitening of the GeM descriptors (learned on the database)
    neighbours/<method>.h5   ranked database images per query
    predictions/<method>.json  per query: prediction, confidence, top-5 (for the report)
    timings.json             seconds and rates measured by the stages
    results.json, results.md  metrics per method

Protocol: a dataset with val and test queries is tuned on val and measured on test; a dataset
with one query set uses ``cv``-fold cross-tuning (default 2), which the output says.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import knn
from .datasets import DISTRACTOR, Dataset, load_dataset, load_met
from .extract import CONFIGS, DEFAULT_CONFIG, _floats, config_from_args, extract_to_store
from .features import FeatureStore
from .metrics import evaluate_predictions
from .neighbours import Neighbours
from .network import build_model, load_model, save_model
from .utils import atomic_path, configure_threads, write_json

logger = logging.getLogger(__name__)

METHODS = ("global", "how-asmk", "fusion", "global+rerank")

DEFAULT_SETTINGS = {
    "extract": copy.deepcopy(CONFIGS[DEFAULT_CONFIG]),
    "checkpoint": None,
    "codebook_size": None,            # None: ~200 database descriptors per word, in [1024, 65536]
    "codebook_iterations": 10,
    "multiple_assignment": 5,
    "neighbours": 100,                # database images kept per query (>= the largest K)
    "global_dims": 128,
    "rerank_shortlist": 100,
    "methods": list(METHODS),
    "seed": 0,
}
# Fast settings for the test suite and `how-met demo --quick`.
QUICK_SETTINGS = {
    **copy.deepcopy(DEFAULT_SETTINGS),
    "extract": {**copy.deepcopy(CONFIGS[DEFAULT_CONFIG]), "features_num": 400, "image_size": 320,
                "scales": [1.0, 0.707]},
}
DEMO_SETTINGS = copy.deepcopy(DEFAULT_SETTINGS)


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


class _Timings:
    """Stage timings persisted beside the results, so a resumed run still reports them."""

    def __init__(self, path: Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.exists() else {}

    def set(self, key: str, value) -> None:
        self.values[key] = value
        write_json(self.path, self.values)

    def get(self, key: str, default=None):
        return self.values.get(key, default)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def stage_extract(ds: Dataset, work: Path, settings: dict, timings: _Timings, device: str) -> Path:
    features = work / "features.h5"
    model_path = work / "model.pt"
    if model_path.exists():
        model = load_model(str(model_path), device)
    else:
        model = build_model(**settings["extract"]["model"], checkpoint=settings.get("checkpoint"),
                            device=device)
    stats = extract_to_store(ds.image_root, ds.all_keys(), features, config=settings["extract"],
                             model=model, device=device, whiten_keys=ds.db_keys,
                             model_out=model_path, skip_bad=settings.get("skip_bad", False))
    if not model_path.exists():
        save_model(model, model_path)
    if stats["extracted"]:
        timings.set("extract_images_per_s", stats["images_per_s"])
    return features


def stage_codebook(ds: Dataset, work: Path, features: Path, settings: dict):
    from .codebook import Codebook
    path = work / "codebook.npz"
    if path.exists():
        return Codebook.load(path)
    size = settings.get("codebook_size")
    if not size:
        with FeatureStore(features) as store:
            per_image = int(store.config.get("features_num", 1000))
        size = auto_codebook_size(per_image * len(ds.db_keys))
    codebook = Codebook(size=size, iterations=settings["codebook_iterations"], seed=settings["seed"])
    codebook.train(features, keys=ds.db_keys)
    codebook.save(path)
    return codebook


def stage_index(ds: Dataset, work: Path, features: Path, codebook, timings: _Timings):
    from .ivf import InvertedFile, build_index
    path = work / "index"
    if not path.exists():
        started = time.perf_counter()
        build_index(features, codebook, path, keys=ds.db_keys)
        timings.set("index_build_s", time.perf_counter() - started)
    return InvertedFile.load(path)


def _dir_megabytes(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2 ** 20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2 ** 20


def stage_asmk_query(ds: Dataset, work: Path, features: Path, codebook, index, settings: dict,
                     timings: _Timings) -> Neighbours:
    from .query import query_store
    path = work / "neighbours" / "how-asmk.h5"
    if path.exists():
        return Neighbours.load(path)
    started = time.perf_counter()
    result = query_store(index, codebook, features, keys=ds.query_keys, k=settings["neighbours"],
                         multiple_assignment=settings["multiple_assignment"])
    timings.set("how-asmk_query_ms", 1000 * (time.perf_counter() - started) / max(1, len(ds.query_keys)))
    result.save(path)
    return result


def stage_global(ds: Dataset, work: Path, features: Path, settings: dict, timings: _Timings) -> Neighbours:
    from .global_search import PCAWhitening, global_neighbours
    path = work / "neighbours" / "global.h5"
    if path.exists():
        return Neighbours.load(path)
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


def _aligned(neigh: Neighbours, ds: Dataset) -> Tuple[np.ndarray, np.ndarray]:
    """(indices into ds.db_keys, scores) with rows in ds.query_keys order."""
    row_of = {k: i for i, k in enumerate(neigh.query_keys)}
    rows = np.array([row_of[k] for k in ds.query_keys])
    db_pos = {k: i for i, k in enumerate(ds.db_keys)}
    remap = np.array([db_pos[k] for k in neigh.db_keys] + [-1], np.int64)
    indices = remap[neigh.indices[rows]]  # -1 padding maps to the appended -1
    return indices, neigh.scores[rows]


def stage_rerank(ds: Dataset, work: Path, features: Path, codebook, global_neigh: Neighbours,
                 settings: dict, timings: _Timings):
    """Score components (global, ASMK, inliers) of the global top-``rerank_shortlist`` from the
    local-feature reranker, saved to neighbours/global+rerank.npz (plain arrays)."""
    from .rerank import Reranker, score_shortlist
    saved = load_rerank_scores(work)
    if saved is not None:
        return saved
    shortlist_size = settings["rerank_shortlist"]
    shortlist = Neighbours(global_neigh.query_keys, global_neigh.db_keys,
                           global_neigh.indices[:, :shortlist_size], global_neigh.scores[:, :shortlist_size])
    started = time.perf_counter()
    with Reranker(features, codebook, multiple_assignment=settings["multiple_assignment"]) as reranker:
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
    from .rerank import ShortlistScores
    path = Path(work) / RERANK_SCORES
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as saved:
        return ShortlistScores(query_keys=saved["query_keys"].tolist(), db_keys=saved["db_keys"].tolist(),
                               **{name: saved[name] for name in _RERANK_FIELDS})


# ---------------------------------------------------------------------------------------------
# Tuning and testing
# ---------------------------------------------------------------------------------------------


def protocol_folds(ds: Dataset, cv: Optional[int], seed: int = 0) -> Tuple[str, List[Tuple[np.ndarray, np.ndarray]]]:
    """[(tune rows, test rows)] over ds.query_* and a description of the protocol."""
    if ds.has_splits and not cv:
        return "val -> test", [(ds.query_splits["val"], ds.query_splits["test"])]
    folds = knn.split_folds(ds.query_labels, cv or 2, seed)
    pairs = [(np.sort(np.concatenate([f for g, f in enumerate(folds) if g != i])), folds[i])
             for i in range(len(folds))]
    return f"{len(folds)}-fold cross-tuning", pairs


def tune_and_test(candidates: List[Tuple[dict, np.ndarray, np.ndarray]], ds: Dataset,
                  folds: List[Tuple[np.ndarray, np.ndarray]]) -> dict:
    """Choose (candidate, K, t) by GAP on each fold's tuning rows, predict its test rows.

    candidates: [(params, indices (nq, k), scores (nq, k))] aligned with ds.query_keys.
    Returns metrics averaged over folds (percent), chosen parameters, the mean GAP grid of the
    chosen candidate, and per-query predictions.
    """
    labels, n_classes = ds.query_labels, ds.n_classes
    nq = len(labels)
    pred = np.full(nq, DISTRACTOR, np.int64)
    conf = np.zeros(nq)
    tested = np.zeros(nq, bool)
    # each query's shortlist under the candidate its fold chose (for the report's top-5)
    top_indices = np.full((nq, 5), -1, np.int64)
    top_scores = np.full((nq, 5), -np.inf, np.float32)
    per_fold, grids = [], []
    for tune_rows, test_rows in folds:
        best = None
        for params, indices, scores in candidates:
            (K, t), grid = knn.tune(indices[tune_rows], scores[tune_rows], ds.db_labels,
                                    labels[tune_rows], n_classes)
            value = float(np.nanmax(grid))
            if best is None or value > best[0]:
                best = (value, params, indices, scores, K, t, grid)
        _, params, indices, scores, K, t, grid = best
        out = knn.knn_predict(indices[test_rows], scores[test_rows], ds.db_labels, K, t, n_classes)
        metrics = evaluate_predictions(out.labels, out.log_odds, labels[test_rows])
        pred[test_rows], conf[test_rows], tested[test_rows] = out.labels, out.confidence, True
        width = min(5, indices.shape[1])
        top_indices[test_rows, :width] = indices[test_rows, :width]
        top_scores[test_rows, :width] = scores[test_rows, :width]
        per_fold.append({**{k: 100 * v for k, v in metrics.items()}, "K": int(K), "t": float(t), **params})
        grids.append(np.asarray(grid) * 100)
    summary = {key: float(np.nanmean([f[key] for f in per_fold])) for key in ("GAP", "GAP-", "ACC")}
    for key in ["K", "t"] + sorted(set(per_fold[0]) - {"GAP", "GAP-", "ACC", "K", "t"}):
        values = [f[key] for f in per_fold]
        summary[key] = values[0] if len(set(map(str, values))) == 1 else "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return {"metrics": summary, "per_fold": per_fold, "grid": np.mean(grids, axis=0),
            "pred": pred, "conf": conf, "tested": tested, "top_indices": top_indices,
            "top_scores": top_scores}


def _predictions_json(ds: Dataset, outcome: dict) -> list:
    rows = []
    for q in np.flatnonzero(outcome["tested"]):
        label, p = int(ds.query_labels[q]), int(outcome["pred"][q])
        best = [{"key": ds.db_keys[i], "label": int(ds.db_labels[i]), "score": float(s)}
                for i, s in zip(outcome["top_indices"][q], outcome["top_scores"][q]) if i >= 0]
        rows.append({"query": ds.query_keys[q], "label": label, "pred": p,
                     "conf": float(outcome["conf"][q]), "correct": bool(label != DISTRACTOR and p == label),
                     "top": best})
    return rows


def format_table(results: dict) -> str:
    """Markdown table: one row per method."""
    lines = [f"Dataset {results['dataset']['name']}: {results['dataset']['n_db']} database images "
             f"({results['dataset']['n_classes']} classes), {results['dataset']['n_queries']} queries "
             f"({results['dataset']['n_distractors']} distractors); protocol: {results['protocol']}",
             "",
             "| method | GAP | GAP- | ACC | K | t | extraction images/s | query ms/image | index MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def num(v, fmt):
        return "-" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))

    for name, m in results["methods"].items():
        lines.append(f"| {name} | {num(m['GAP'], '{:.1f}')} | {num(m['GAP-'], '{:.1f}')} | "
                     f"{num(m['ACC'], '{:.1f}')} | {num(m['K'], '{}')} | {num(m['t'], '{:g}')} | "
                     f"{num(m.get('extract_images_per_s'), '{:.2f}')} | "
                     f"{num(m.get('query_ms_per_image'), '{:.1f}')} | {num(m.get('index_mb'), '{:.2f}')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _merge_settings(settings: Optional[dict], overrides: dict) -> dict:
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


def run_evaluation(data_dir=None, work_dir="how-met-work", settings: Optional[dict] = None,
                   cv: Optional[int] = None, dataset: Optional[Dataset] = None, device: str = "cpu",
                   **overrides) -> dict:
    """Run (or resume) every stage on a Met-format directory and return the results dict."""
    settings = _merge_settings(settings, overrides)
    configure_threads()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ds = dataset if dataset is not None else load_dataset(data_dir)
    settings_path = work / "settings.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        stage_keys = ("extract", "checkpoint", "codebook_size", "codebook_iterations",
                      "multiple_assignment", "neighbours", "global_dims", "seed")
        changed = [k for k in stage_keys if previous.get(k) != settings.get(k)]
        if changed:
            raise ValueError(f"{work}: was made with other settings ({', '.join(changed)}); "
                             f"use a new --work directory")
    write_json(settings_path, settings)
    timings = _Timings(work / "timings.json")
    protocol, folds = protocol_folds(ds, cv, settings["seed"])
    methods = [m for m in settings["methods"] if m in METHODS]

    features = stage_extract(ds, work, settings, timings, device)
    lists: Dict[str, List[Tuple[dict, np.ndarray, np.ndarray]]] = {}
    index_mb = {}
    if "global" in methods or "fusion" in methods or "global+rerank" in methods:
        global_neigh = stage_global(ds, work, features, settings, timings)
        lists["global"] = [({}, *_aligned(global_neigh, ds))]
        index_mb["global"] = timings.get("global_index_mb")
    if {"how-asmk", "fusion", "global+rerank"} & set(methods):
        codebook = stage_codebook(ds, work, features, settings)
    if "how-asmk" in methods or "fusion" in methods:
        index = stage_index(ds, work, features, codebook, timings)
        asmk_neigh = stage_asmk_query(ds, work, features, codebook, index, settings, timings)
        lists["how-asmk"] = [({}, *_aligned(asmk_neigh, ds))]
        index_mb["how-asmk"] = _dir_megabytes(work / "index")
    if "fusion" in methods:
        a, b = lists["global"][0][1:], lists["how-asmk"][0][1:]
        lists["fusion"] = [({"weight": float(w)}, *knn.fuse_neighbours(a[0], a[1], b[0], b[1], w))
                           for w in knn.DEFAULT_WEIGHTS]
    if "global+rerank" in methods:
        scores = stage_rerank(ds, work, features, codebook, global_neigh, settings, timings)
        from .rerank import fusion_grid
        lists["global+rerank"] = [(weights.as_dict(), *_aligned(scores.fuse(weights), ds))
                                  for weights in fusion_grid()]

    results = {"dataset": {"name": ds.name, "image_root": str(Path(ds.image_root).resolve()),
                           "n_db": len(ds.db_keys), "n_queries": len(ds.query_keys),
                           "n_distractors": ds.n_distractors, "n_classes": ds.n_classes},
               "settings": settings, "protocol": protocol, "methods": {}, "tuning": {},
               "notes": {}}
    if timings.get("global_whitening"):
        results["notes"]["global_whitening"] = timings.get("global_whitening")
    (work / "predictions").mkdir(exist_ok=True)
    query_ms = {"global": timings.get("global_query_ms"), "how-asmk": timings.get("how-asmk_query_ms"),
                "global+rerank": timings.get("global+rerank_query_ms")}
    if query_ms["global"] is not None and query_ms["how-asmk"] is not None:
        query_ms["fusion"] = query_ms["global"] + query_ms["how-asmk"]
    index_mb["fusion"] = (index_mb.get("global") or 0) + (index_mb.get("how-asmk") or 0) or None
    index_mb["global+rerank"] = index_mb.get("global")
    for name in methods:
        outcome = tune_and_test(lists[name], ds, folds)
        metrics = outcome["metrics"]
        results["methods"][name] = {**{k: (round(v, 2) if isinstance(v, float) else v) for k, v in metrics.items()},
                                    "extract_images_per_s": timings.get("extract_images_per_s"),
                                    "query_ms_per_image": query_ms.get(name),
                                    "index_mb": index_mb.get(name),
                                    "per_fold": outcome["per_fold"]}
        grid = outcome["grid"]
        if grid.ndim == 2:
            results["tuning"][name] = {"K": list(knn.DEFAULT_KS), "t": list(knn.DEFAULT_TS),
                                       "GAP": np.round(grid, 2).tolist()}
        write_json(work / "predictions" / f"{name}.json", _predictions_json(ds, outcome))
    write_json(work / "results.json", results)
    (work / "results.md").write_text(format_table(results) + "\n")
    return results


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def configure_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="Met-format directory (database.json + queries.json "
                                               "or val.json + test.json, images/)")
    src.add_argument("--met", type=Path, help="root of the official Met dataset")
    p.add_argument("--mini", action="store_true", help="with --met: the mini database")
    p.add_argument("--work", type=Path, required=True, help="work directory (created; resumed if it exists)")
    p.add_argument("--cv", type=int, help="k-fold cross-tuning (default 2 when there is no val/test split)")
    p.add_argument("--quick", action="store_true", help="small, fast settings (smoke tests)")
    p.add_argument("--config", choices=sorted(CONFIGS), help="named extraction config")
    p.add_argument("--checkpoint", help="HOW checkpoint or how-met model (path or URL)")
    p.add_argument("--backbone", help="override the extraction backbone")
    p.add_argument("--layer", help="trunk layer for local features")
    p.add_argument("--scales", type=_floats, help="comma-separated scales")
    p.add_argument("--features-num", type=int, help="local features per image")
    p.add_argument("--image-size", type=int, help="longer image side limit")
    p.add_argument("--codebook-size", type=int, help="visual words (default: ~200 descriptors per word)")
    p.add_argument("--global-dims", type=int, help="PCA-whitened global descriptor dims")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (logged)")
    p.add_argument("--skip-missing", action="store_true", help="skip images listed but not on disk")
    p.add_argument("--report", action="store_true", help="also write the HTML report")


def settings_from_args(args) -> dict:
    settings = copy.deepcopy(QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS)
    settings["extract"] = config_from_args(args, base=settings["extract"])
    for name in ("checkpoint", "codebook_size", "global_dims"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.methods:
        unknown = set(args.methods.split(",")) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
        settings["methods"] = args.methods.split(",")
    settings["skip_bad"] = args.skip_bad
    return settings


def run_cli(args) -> int:
    settings = settings_from_args(args)
    if args.met is not None:
        ds = load_met(args.met, mini=args.mini, skip_missing=args.skip_missing)
    else:
        ds = load_dataset(args.data, skip_missing=args.skip_missing)
    started = time.perf_counter()
    results = run_evaluation(work_dir=args.work, settings=settings, cv=args.cv, dataset=ds,
                             device=args.device)
    print(format_table(results))
    print(f"\nresults: {args.work / 'results.json'} ({time.perf_counter() - started:.0f} s)")
    if args.report:
        from .report import write_report
        print(f"report: {write_report(args.work)}")
    return 0
