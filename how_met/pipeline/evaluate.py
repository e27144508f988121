"""The whole Met protocol behind one command: extract -> codebook -> index -> query -> global
baseline -> kNN classifier -> GAP, every stage resumable in a work directory.

Work directory layout (each file is written atomically; a stage whose output exists is skipped)::

    settings.json, data.json the settings and the data (lists, image files) it was made from;
                             a rerun with others is refused
    model.pt                 HOW model with the PCA-whitening learned on the database
    features.h5              local + GeM features of database and query images (journalled
                             while extracting: a killed run continues where it stopped)
    codebook.npz / .json     visual words
    index/                   binary ASMK inverted file of the database
    global_whitening.npz     PCA-whitening of the GeM descriptors (learned on the database)
    neighbours/<method>.h5   ranked database images per query
    predictions/<method>.json  per query: prediction, log-odds, confidence, accepted, top-5
    evidence.h5              inlier correspondences of each query's top candidates (for the report)
    recogniser/              the tuned recogniser (how_met.recognition.recogniser), for
                             ``how-met identify``
    timings.json             seconds and rates measured by the stages
    results.json, results.md  metrics per method
    repeats/seed-<s>/        with ``repeats`` > 1: codebook, index and neighbour lists of the
                             other codebook seeds (features and global lists are shared; with
                             a given or shipped codebook every repeat shares them all)

Protocol: a dataset with val and test queries is tuned on val and measured on test; a dataset
with one query set uses ``cv``-fold cross-tuning (default 2), which the output says. The
recogniser takes the method, (K, t) and accept threshold that the first fold's tuning queries
(val) chose; the figures of that threshold on those queries and on the held-out ones are
recorded with it.

Error bars: the codebook seed moves HOW+ASMK on the small shared sets by several GAP, so
``repeats`` reruns the chance-dependent stages (codebook seed and fold split) and every metric is
reported as mean +- std over the repeats.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..datasets import DISTRACTOR, Dataset, load_dataset
from ..features.store import FeatureStore
from ..recognition import fusion, knn
from ..recognition.acceptance import degenerate_confidence
from ..recognition.protocol import protocol_folds, tune_and_test
from ..utils import configure_threads, library_versions, write_json
from .evidence import stage_evidence
from .settings import METHODS, merge_settings, unsupervised_source
from .stages import (THREADED_STAGES, Timings, record_settings, aligned, dir_megabytes, given_extraction,
                     index_path, stage_asmk_query, stage_codebook, stage_extract, stage_global, stage_index,
                     stage_rerank)

logger = logging.getLogger(__name__)


def _predictions_json(ds: Dataset, outcome: dict) -> list:
    """Per tested query: label, prediction, log-odds (what GAP ranks by: the confidence
    saturates at 1.0 in float64), confidence, accepted, fold, top-5."""
    rows = []
    for q in np.flatnonzero(outcome["tested"]):
        label, p = int(ds.query_labels[q]), int(outcome["pred"][q])
        best = [{"key": ds.db_keys[i], "label": int(ds.db_labels[i]), "score": float(s)}
                for i, s in zip(outcome["top_indices"][q], outcome["top_scores"][q]) if i >= 0]
        log_odds = float(outcome["log_odds"][q])
        rows.append({"query": ds.query_keys[q], "label": label, "pred": p,
                     "log_odds": log_odds if np.isfinite(log_odds) else None,
                     "conf": float(outcome["conf"][q]), "accepted": bool(outcome["accepted"][q]),
                     "fold": int(outcome["fold"][q]),
                     "correct": bool(label != DISTRACTOR and p == label), "top": best})
    return rows


def _codebook_file(work: Path, settings: dict) -> Path:
    """The codebook of the run: the one given in the settings, else the one trained in ``work``."""
    return Path(settings["codebook"]) if settings.get("codebook") else work / "codebook.npz"


def _write_recogniser(ds: Dataset, work: Path, features: Path, settings: dict, protocol: str,
                      outcomes: Dict[str, dict]) -> dict:
    """The recogniser of this evaluation: the method whose tuning GAP on the first fold's tuning
    queries is highest, with that fold's (K, t), fusion weights and accept threshold."""
    from ..recognition.recogniser import write_recogniser
    method = max(outcomes, key=lambda m: outcomes[m]["per_fold"][0]["tune_GAP"])
    chosen = outcomes[method]["per_fold"][0]
    fusion_keys = ("weight",) if method == "fusion" else \
        ("global_weight", "asmk_weight", "inlier_weight", "inlier_half", "min_inliers") \
        if method == "global+rerank" else ()
    where = "the val queries" if protocol == "val -> test" else f"the tuning queries of fold 1 ({protocol})"
    accept = dict(chosen["accept"], chosen_on=f"{where} of {ds.name}: {chosen['accept']['tuning']['queries']}; "
                  f"'test': its {chosen['accept']['test']['queries']} held-out queries")
    recogniser = {"method": method, "K": chosen["K"], "t": chosen["t"],
                  "fusion": {k: chosen[k] for k in fusion_keys} or None,
                  "multiple_assignment": settings["multiple_assignment"],
                  "shortlist": settings["rerank_shortlist"] if method == "global+rerank" else settings["neighbours"],
                  "extract": settings["extract"], "tuned": True, "accept": accept,
                  "source": {"dataset": ds.name, "work": str(work.resolve()), "protocol": protocol}}
    write_recogniser(work / "recogniser", model_file=work / "model.pt", features=features,
                     keys=ds.db_keys, exhibit_ids=ds.db_labels, codebook_file=_codebook_file(work, settings),
                     index_dir=index_path(work, settings), global_whitening_file=work / "global_whitening.npz",
                     settings=recogniser)
    return recogniser


def format_table(results: dict) -> str:
    """Markdown table: one row per method; "mean \u00b1 std" when the run was repeated."""
    lines = [f"Dataset {results['dataset']['name']}: {results['dataset']['n_db']} database images "
             f"({results['dataset']['n_classes']} classes), {results['dataset']['n_queries']} queries "
             f"({results['dataset']['n_distractors']} distractors); protocol: {results['protocol']}",
             "",
             "| method | GAP | GAP- | ACC | K | t | extraction images/s | query ms/image | index MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def num(v, fmt):
        return "-" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))

    def metric(m, key):
        std = m.get(f"{key}_std")
        return num(m[key], "{:.1f}") + ("" if std is None else f" \u00b1 {std:.1f}")

    for name, m in results["methods"].items():
        lines.append(f"| {name} | {metric(m, 'GAP')} | {metric(m, 'GAP-')} | {metric(m, 'ACC')} | "
                     f"{num(m['K'], '{}')} | {num(m['t'], '{:g}')} | "
                     f"{num(m.get('extract_images_per_s'), '{:.2f}')} | "
                     f"{num(m.get('query_ms_per_image'), '{:.1f}')} | {num(m.get('index_mb'), '{:.2f}')} |")
    return "\n".join(lines)


REPEATED_METRICS = ("GAP", "GAP-", "ACC")


def repeat_seeds(seed: int, repeats: int) -> List[int]:
    """The seeds of ``repeats`` runs: ``seed`` (the run itself), then seed + 1, seed + 2, ..."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    return [seed + r for r in range(repeats)]


def codebook_is_seeded(settings: dict, n_db_images: int) -> bool:
    """Whether the run trains its codebook with the seed. A given or shipped codebook is the
    same in every repeat, and so are the index, the ASMK lists and the rerank scores built on
    it: repeats then differ in the fold split only and share those stages."""
    fixed = settings.get("codebook") or (unsupervised_source(settings, n_db_images)
                                         and not settings.get("codebook_size"))
    return not fixed


def repeat_dir(work: Path, base_seed: int, seed: int, seeded: bool = True) -> Path:
    """Where the seed-dependent stages of one repeat live: the work directory itself for the
    base seed (and for every seed when the codebook is not ``seeded``), ``repeats/seed-<s>/``
    for the others (codebook, index, ASMK and rerank lists)."""
    return work if seed == base_seed or not seeded else work / "repeats" / f"seed-{seed}"


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def _method_candidates(ds: Dataset, run: Path, features: Path, settings: dict, timings: Timings,
                       methods: Sequence[str], global_list) -> Dict[str, List[Tuple[dict, np.ndarray, np.ndarray]]]:
    """Candidate neighbour lists of every method for one codebook seed (``settings["seed"]``);
    the global list does not depend on it and is passed in."""
    lists: Dict[str, List[Tuple[dict, np.ndarray, np.ndarray]]] = {}
    if "global" in methods:
        lists["global"] = [({}, *global_list[0])]
    # the recogniser needs a codebook and an index whatever its method
    codebook = stage_codebook(ds, run, features, settings, timings)
    index = stage_index(ds, run, features, codebook, settings, timings)
    if "how-asmk" in methods or "fusion" in methods:
        asmk_neigh = stage_asmk_query(ds, run, features, codebook, index, settings, timings)
        lists["how-asmk"] = [({}, *aligned(asmk_neigh, ds))]
    if "fusion" in methods:
        a, b = global_list[0], lists["how-asmk"][0][1:]
        lists["fusion"] = [({"weight": float(w)}, *fusion.fuse_neighbours(a[0], a[1], b[0], b[1], w))
                           for w in fusion.DEFAULT_WEIGHTS]
    if "global+rerank" in methods:
        scores = stage_rerank(ds, run, features, codebook, global_list[1], settings, timings)
        lists["global+rerank"] = [(weights.as_dict(), *aligned(scores.fuse(weights), ds))
                                  for weights in fusion.rerank_weightings(settings)]
    return lists


def check_data(work: Path, ds: Dataset) -> None:
    """Refuse a work directory made from other data (lists or image files); record it in a new
    one. A resumed run must not answer with the results of another dataset."""
    path = work / "data.json"
    identity = ds.identity()
    if path.exists():
        previous = json.loads(path.read_text())
        changed = [name for name in identity if previous.get(name) != identity[name]]
        if changed:
            raise ValueError(f"{work}: was made from other data ({', '.join(changed)} changed); use a "
                             f"new --work directory")
    else:
        write_json(path, identity)


def run_evaluation(data_dir=None, work_dir="how-met-work", settings: Optional[dict] = None,
                   cv: Optional[int] = None, dataset: Optional[Dataset] = None, device: str = "cpu",
                   repeats: int = 1, ray=None, **overrides) -> dict:
    """Run (or resume) every stage on a Met-format directory and return the results dict.

    ``repeats`` > 1 reruns what depends on chance -- the codebook seed (k-means, hence index,
    ASMK lists and rerank scores) and the fold split -- with seeds ``seed``, ``seed + 1``, ...
    reusing the extracted features and the global lists; every metric is then reported as the
    mean and sample std over the repeats. Per-query predictions, tuning grids, K and t are those
    of the first repeat (the run with ``seed``). ``ray``: run the extraction stage on a Ray
    cluster (``extract_to_store``'s argument; the same features).
    """
    settings = merge_settings(settings, overrides)
    if settings.get("features"):  # what the given store was extracted with (the recogniser's)
        settings["extract"] = given_extraction(settings["features"])
    threads = configure_threads()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ds = dataset if dataset is not None else load_dataset(data_dir)
    check_data(work, ds)
    record_settings(work, settings)
    timings = Timings(work / "timings.json")
    seeds = repeat_seeds(settings["seed"], repeats)
    methods = [m for m in settings["methods"] if m in METHODS]

    features = stage_extract(ds, work, settings, timings, device, ray)
    with FeatureStore(features) as store:  # images --skip-bad skipped take no part in any stage
        skipped = [key for key in ds.all_keys() if key not in store]
    if skipped:
        logger.warning("%s: %d unreadable images skipped (first: %s)", features, len(skipped), skipped[0])
        ds = ds.without(skipped)
    protocol, _ = protocol_folds(ds, cv, settings["seed"])
    # the recogniser needs the global whitening whatever its method
    global_neigh = stage_global(ds, work, features, settings, timings)
    global_list = (aligned(global_neigh, ds), global_neigh)
    outcomes: List[Dict[str, dict]] = []  # per repeat: method -> tune_and_test outcome
    seeded = codebook_is_seeded(settings, len(ds.db_keys))
    for seed in seeds:
        run = repeat_dir(work, settings["seed"], seed, seeded)
        run_timings = timings if run == work else Timings(run / "timings.json")
        lists = _method_candidates(ds, run, features, {**settings, "seed": seed}, run_timings,
                                   methods, global_list)
        _, folds = protocol_folds(ds, cv, seed)
        outcomes.append({name: tune_and_test(lists[name], ds, folds, settings["target_precision"])
                         for name in methods})

    if repeats > 1:
        varied = " and ".join(name for name, varies in (("codebook seed", seeded),
                                                       ("fold split", protocol != "val -> test")) if varies)
        protocol += f"; mean \u00b1 std over {repeats} repeats ({varied or 'nothing varies'}: seeds {seeds[0]}..{seeds[-1]})"
    results = {"dataset": {"name": ds.name, "image_root": str(Path(ds.image_root).resolve()),
                           "n_db": len(ds.db_keys), "n_queries": len(ds.query_keys),
                           "n_distractors": ds.n_distractors, "n_classes": ds.n_classes},
               "settings": settings, "protocol": protocol, "repeats": {"n": repeats, "seeds": seeds},
               "environment": {"threads": {"extract": timings.get("extract_threads"),
                                           **{stage: timings.get(f"{stage}_threads", threads)
                                              for stage in THREADED_STAGES}},
                               "versions": library_versions()},
               "methods": {}, "tuning": {}, "notes": {}}
    results["notes"]["unsupervised"] = unsupervised_source(settings, len(ds.db_keys)) or "database"
    if timings.get("global_whitening"):
        results["notes"]["global_whitening"] = timings.get("global_whitening")
    if skipped:
        results["notes"]["skipped_images"] = skipped
    (work / "predictions").mkdir(exist_ok=True)
    costs = _method_costs(index_path(work, settings), timings)
    for name in methods:
        outcome = outcomes[0][name]
        flat = degenerate_confidence(outcome["log_odds"][outcome["tested"]])
        if flat:
            results["notes"][f"{name} confidence"] = flat
        metrics = dict(outcome["metrics"])
        per_repeat = [{"seed": seed, **{k: o[name]["metrics"][k] for k in ("K", "t", *REPEATED_METRICS)}}
                      for seed, o in zip(seeds, outcomes)]
        for key in REPEATED_METRICS:
            metrics[key], metrics[f"{key}_std"] = mean_std([r[key] for r in per_repeat])
        results["methods"][name] = {**{k: (round(v, 2) if isinstance(v, float) else v) for k, v in metrics.items()},
                                    **costs.get(name, {}), "first_query_ms": timings.get(f"{name}_first_query_ms"),
                                    "per_fold": outcome["per_fold"],
                                    "per_repeat": per_repeat}
        results["tuning"][name] = {"K": list(knn.DEFAULT_KS), "t": list(knn.DEFAULT_TS),
                                   "GAP": np.round(outcome["grid"], 2).tolist()}
        write_json(work / "predictions" / f"{name}.json", _predictions_json(ds, outcome))
    top_pairs = {(ds.query_keys[q], ds.db_keys[o["top_indices"][q, 0]]) for o in outcomes[0].values()
                 for q in np.flatnonzero(o["tested"] & (o["top_indices"][:, 0] >= 0))}
    stage_evidence(work, features, _codebook_file(work, settings), top_pairs, settings["multiple_assignment"])
    results["recogniser"] = _write_recogniser(ds, work, features, settings, protocol, outcomes[0])
    write_json(work / "results.json", results)
    (work / "results.md").write_text(format_table(results) + "\n")
    return results


def _method_costs(index: Path, timings: Timings) -> Dict[str, dict]:
    """Per method: extraction rate, query time and index size (what the stages measured)."""
    query_ms = {"global": timings.get("global_query_ms"), "how-asmk": timings.get("how-asmk_query_ms"),
                "global+rerank": timings.get("global+rerank_query_ms")}
    if query_ms["global"] is not None and query_ms["how-asmk"] is not None:
        query_ms["fusion"] = query_ms["global"] + query_ms["how-asmk"]
    index_mb = {"global": timings.get("global_index_mb"),
                "how-asmk": dir_megabytes(index) if index.exists() else None}
    index_mb["fusion"] = (index_mb["global"] or 0) + (index_mb["how-asmk"] or 0) or None
    index_mb["global+rerank"] = index_mb["global"]
    return {name: {"extract_images_per_s": timings.get("extract_images_per_s"),
                   "query_ms_per_image": query_ms.get(name), "index_mb": index_mb.get(name)}
            for name in ("global", "how-asmk", "fusion", "global+rerank")}
