"""Verification variants (issue 13) on a finished `how-met evaluate --repeats N` work directory:
global+rerank GAP, mean +- std over its repeats, with other SpatialParams (model, threshold,
scale_check, ...). The rerank scores of a variant are computed once per codebook (with the
shipped codebook every repeat shares them; only the fold split changes), then tuned and tested
exactly as evaluate does. Each result is appended to $HOW_MET_LEVERS_CACHE/rerank.jsonl.

    python eval/levers/rerank.py grocery WORK                     # the default verification
    python eval/levers/rerank.py grocery WORK model=affine threshold=2 scale_check=0
"""
import json, os, sys
from pathlib import Path
import numpy as np
from how_met.datasets import load_dataset
from how_met.neighbours import Neighbours
from how_met.asmk.codebook import Codebook
from how_met.verify.reranker import Reranker, SpatialParams
from how_met.verify.scores import score_shortlist
from how_met.recognition.fusion import rerank_weightings
from how_met.recognition.protocol import protocol_folds, tune_and_test
from how_met.pipeline.evaluate import codebook_is_seeded, repeat_dir
from how_met.pipeline.stages import aligned

name, work = sys.argv[1], Path(sys.argv[2])
params = {}
for kv in sys.argv[3:]:
    k, v = kv.split("=")
    params[k] = v if k in ("model", "matching") else (v == "1" if k in ("scale_check", "scale_prefilter") else float(v))
ds = load_dataset(Path("/work/shared/data") / name)
results = json.loads((work / "results.json").read_text())
settings, seeds = results["settings"], results["repeats"]["seeds"]
g = Neighbours.load(work / "neighbours" / "global.h5")
n = settings["rerank_shortlist"]
short = Neighbours(g.query_keys, g.db_keys, g.indices[:, :n], g.scores[:, :n])
features = work / "features.h5"
scores_by_codebook, gaps = {}, []
seeded = codebook_is_seeded(settings, len(ds.db_keys))
for seed in seeds:
    cb = Codebook.load(repeat_dir(work, settings["seed"], seed, seeded) / "codebook.npz")
    if cb.fingerprint not in scores_by_codebook:
        with Reranker(features, cb, multiple_assignment=settings["multiple_assignment"],
                      spatial=SpatialParams(**params)) as r:
            scores_by_codebook[cb.fingerprint] = score_shortlist(r, features, short, show_progress=False)
    scores = scores_by_codebook[cb.fingerprint]
    _, folds = protocol_folds(ds, settings.get("cv") or 2, seed)
    cands = [(w.as_dict(), *aligned(scores.fuse(w), ds)) for w in rerank_weightings(settings)]
    gaps.append(tune_and_test(cands, ds, folds, settings["target_precision"])["metrics"]["GAP"])
print(name, params, f"global+rerank {np.mean(gaps):.1f} +- {np.std(gaps, ddof=1):.1f}", " ".join(f"{x:.1f}" for x in gaps))
with open(Path(os.environ.get("HOW_MET_LEVERS_CACHE", "/tmp/obj")) / "rerank.jsonl", "a") as f:
    f.write(json.dumps({"set": name, "work": str(work), "params": params, "gap": gaps}) + "\n")
