"""Verification quality of compact records against the feature store, on a finished
``how-met evaluate`` work directory (one with the global+rerank method):

    python eval/bench_record_rerank.py ../shared/data/museum WORK --kinds int8,pq8x8,pq16x8,pq16x6 [--repeats 5]

For each record kind (``int8``, ``pq`` = the default code, ``pqMxB`` = M sub-quantisers of B
bits, ``full``, ``none`` = no verification: ASMK scores only) the
database images of ``WORK/features.h5`` are written to records (``records_from_stores``), the
index is assembled from them, and the global top-``rerank_shortlist`` of every query is scored
by a ``Reranker`` reading those records with ``index=`` (ASMK codes from the index), exactly as
evaluate scores it from the store. Reported per kind: global+rerank GAP (mean +- std over fold
splits 0..repeats-1, tuned and tested as evaluate does), the ASMK scores' largest difference
from the store's, and how the inlier counts moved (median and 90th percentile of |difference|
over the pairs the store verified with >= 10 inliers, and the pairs whose top candidate
changed). The store's scores are evaluate's own (``neighbours/global+rerank.npz``), scored
again here only when they are missing. Every record kind writes its records under ``--tmp``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from how_met.asmk.codebook import Codebook  # noqa: E402
from how_met.asmk.indexing import index_from_records, records_from_stores  # noqa: E402
from how_met.datasets import load_dataset  # noqa: E402
from how_met.neighbours import Neighbours  # noqa: E402
from how_met.pipeline.stages import aligned, load_rerank_scores  # noqa: E402
from how_met.recognition.fusion import rerank_weightings  # noqa: E402
from how_met.recognition.protocol import protocol_folds, tune_and_test  # noqa: E402
from how_met.utils import configure_threads  # noqa: E402
from how_met.verify.reranker import Reranker, SpatialParams  # noqa: E402
from how_met.verify.scores import score_shortlist  # noqa: E402


def gaps(scores, ds, settings, repeats: int):
    grid = rerank_weightings(settings)  # evaluate's
    out = []
    for seed in range(repeats):
        _, folds = protocol_folds(ds, settings.get("cv") or 2, seed)
        cands = [(w.as_dict(), *aligned(scores.fuse(w), ds)) for w in grid]
        out.append(tune_and_test(cands, ds, folds, settings["target_precision"])["metrics"]["GAP"])
    return out


def compare(store, other) -> dict:
    valid = store.indices >= 0
    a, b = store.inliers[valid].astype(int), other.inliers[valid].astype(int)
    verified = a >= 10
    diff = np.abs(a - b)
    top_changed = 0
    for row in range(len(store.indices)):
        v = np.flatnonzero(store.indices[row] >= 0)
        if len(v) and store.inliers[row, v].max() > 0:
            top_changed += int(np.argmax(store.inliers[row, v]) != np.argmax(other.inliers[row, v]))
    return {"asmk_max_abs_diff": float(np.abs(store.asmk[valid] - other.asmk[valid]).max()),
            "pairs": int(valid.sum()), "pairs_store_inliers_ge_10": int(verified.sum()),
            "inliers_abs_diff_median_ge10": float(np.median(diff[verified])) if verified.any() else None,
            "inliers_abs_diff_p90_ge10": float(np.percentile(diff[verified], 90)) if verified.any() else None,
            "inliers_rel_diff_median_ge10": float(np.median(diff[verified] / a[verified])) if verified.any() else None,
            "inliers_mean_store_ge10": float(a[verified].mean()) if verified.any() else None,
            "inliers_mean_records_ge10": float(b[verified].mean()) if verified.any() else None,
            "queries_top_inlier_candidate_changed": top_changed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("work", type=Path)
    p.add_argument("--kinds", default="int8,pq8x8,pq16x8,pq16x6")
    p.add_argument("--repeats", type=int, default=5, help="fold splits (seeds 0..N-1)")
    p.add_argument("--tmp", type=Path, help="where the records go (default: a temporary folder)")
    p.add_argument("--json", type=Path)
    p.add_argument("--spatial", nargs="*", default=[], metavar="KEY=VALUE",
                   help="SpatialParams for the record kinds (e.g. min_similarity=0.5); the store keeps evaluate's")
    args = p.parse_args(argv)
    configure_threads()
    params = {k: float(v) for k, v in (kv.split("=") for kv in args.spatial)}
    if "min_similarity" in params:  # for every record kind, pq included
        params.setdefault("min_similarity_pq", params["min_similarity"])
    spatial = SpatialParams(**params)
    ds = load_dataset(args.data)
    results = json.loads((args.work / "results.json").read_text())
    settings = results["settings"]
    features = args.work / "features.h5"
    codebook = Codebook.load(args.work / "codebook.npz")
    g = Neighbours.load(args.work / "neighbours" / "global.h5")
    n = settings["rerank_shortlist"]
    short = Neighbours(g.query_keys, g.db_keys, g.indices[:, :n], g.scores[:, :n])
    ma = settings["multiple_assignment"]
    store_scores = load_rerank_scores(args.work)
    if store_scores is None:
        with Reranker(features, codebook, multiple_assignment=ma) as r:
            store_scores = score_shortlist(r, features, short, show_progress=False)
    out = {"set": ds.name, "queries": len(ds.query_keys), "database": len(ds.db_keys), "spatial": args.spatial,
           "store": {"gap": gaps(store_scores, ds, settings, args.repeats)}}
    print(ds.name, "store", json.dumps(out["store"]), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="record-rerank-", dir=args.tmp))
    try:
        for kind in args.kinds.split(","):
            descriptors, pq_code = ("pq", kind[2:] or None) if kind.startswith("pq") else (kind, None)
            path = tmp / f"{kind}.records"
            records_from_stores([features], codebook, path, descriptors=descriptors, pq_code=pq_code,
                                keys=ds.db_keys, show_progress=False)
            index = index_from_records(path, tmp / f"{kind}.index", show_progress=False)
            started = time.perf_counter()
            with Reranker(path, codebook, multiple_assignment=ma, index=index, spatial=spatial) as r:
                # "none" keeps no descriptors: ASMK scores only, no inliers (the no-verification baseline)
                scores = score_shortlist(r, features, short, verify=kind != "none", show_progress=False)
                lookups = r.index_lookups
            entry = {"gap": gaps(scores, ds, settings, args.repeats),
                     "record_bytes_per_image": path.stat().st_size / len(ds.db_keys),
                     "rerank_s": time.perf_counter() - started, "index_lookups": lookups,
                     **compare(store_scores, scores)}
            out[kind] = entry
            print(ds.name, kind, json.dumps(entry), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for kind, entry in out.items():
        if isinstance(entry, dict) and "gap" in entry:
            gap = np.asarray(entry["gap"])
            print(f"{ds.name} {kind}: global+rerank {gap.mean():.1f} +- {gap.std(ddof=1) if len(gap) > 1 else 0:.1f} "
                  f"({' '.join(f'{x:.1f}' for x in gap)})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
