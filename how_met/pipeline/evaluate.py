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

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..datasets import DISTRACTOR, Dataset, load_dataset
from ..recognition import fusion, knn
from ..recognition.protocol import protocol_folds, tune_and_test
from ..utils import configure_threads, write_json
from .settings import METHODS, merge_settings
from .stages import (Timings, aligned, dir_megabytes, stage_asmk_query, stage_codebook, stage_extract,
                     stage_global, stage_index, stage_rerank)

logger = logging.getLogger(__name__)


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



def run_evaluation(data_dir=None, work_dir="how-met-work", settings: Optional[dict] = None,
                   cv: Optional[int] = None, dataset: Optional[Dataset] = None, device: str = "cpu",
                   **overrides) -> dict:
    """Run (or resume) every stage on a Met-format directory and return the results dict."""
    settings = merge_settings(settings, overrides)
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
    timings = Timings(work / "timings.json")
    protocol, folds = protocol_folds(ds, cv, settings["seed"])
    methods = [m for m in settings["methods"] if m in METHODS]

    features = stage_extract(ds, work, settings, timings, device)
    lists: Dict[str, List[Tuple[dict, np.ndarray, np.ndarray]]] = {}
    index_mb = {}
    if "global" in methods or "fusion" in methods or "global+rerank" in methods:
        global_neigh = stage_global(ds, work, features, settings, timings)
        lists["global"] = [({}, *aligned(global_neigh, ds))]
        index_mb["global"] = timings.get("global_index_mb")
    if {"how-asmk", "fusion", "global+rerank"} & set(methods):
        codebook = stage_codebook(ds, work, features, settings)
    if "how-asmk" in methods or "fusion" in methods:
        index = stage_index(ds, work, features, codebook, timings)
        asmk_neigh = stage_asmk_query(ds, work, features, codebook, index, settings, timings)
        lists["how-asmk"] = [({}, *aligned(asmk_neigh, ds))]
        index_mb["how-asmk"] = dir_megabytes(work / "index")
    if "fusion" in methods:
        a, b = lists["global"][0][1:], lists["how-asmk"][0][1:]
        lists["fusion"] = [({"weight": float(w)}, *fusion.fuse_neighbours(a[0], a[1], b[0], b[1], w))
                           for w in fusion.DEFAULT_WEIGHTS]
    if "global+rerank" in methods:
        scores = stage_rerank(ds, work, features, codebook, global_neigh, settings, timings)
        lists["global+rerank"] = [(weights.as_dict(), *aligned(scores.fuse(weights), ds))
                                  for weights in fusion.fusion_grid()]

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

