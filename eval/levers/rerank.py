"""Verification variants on finished exp_eval run dirs: global+rerank GAP with other
SpatialParams (model, threshold, min_similarity). Usage: exp_rerank.py RUN_BASE SEEDS KEY=VAL..."""
import json, os, sys
from pathlib import Path
import numpy as np
from how_met.datasets import load_dataset
from how_met.neighbours import Neighbours
from how_met.asmk.codebook import Codebook
from how_met.verify.reranker import Reranker, SpatialParams
from how_met.verify.scores import score_shortlist
from how_met.recognition.fusion import fusion_grid
from how_met.recognition.protocol import protocol_folds, tune_and_test
from how_met.pipeline.stages import aligned

base = Path(sys.argv[1]); seeds = [int(s) for s in sys.argv[2].split(",")]
params = {}
for kv in sys.argv[3:]:
    k, v = kv.split("=")
    params[k] = v if k in ("model", "matching") else (v == "1" if k in ("scale_check", "scale_prefilter") else float(v))
name = base.name.split("_")[0]
ds = load_dataset(Path("/work/shared/data") / name)
gaps = []
for seed in seeds:
    work = base / f"seed{seed}"
    g = Neighbours.load(work / "neighbours" / "global.h5")
    short = Neighbours(g.query_keys, g.db_keys, g.indices[:, :100], g.scores[:, :100])
    cb = Codebook.load(work / "codebook.npz")
    with Reranker(work / "features.h5", cb, spatial=SpatialParams(**params)) as r:
        scores = score_shortlist(r, work / "features.h5", short, show_progress=False)
    _, folds = protocol_folds(ds, 2, seed)
    cands = [(w.as_dict(), *aligned(scores.fuse(w), ds)) for w in fusion_grid()]
    gaps.append(tune_and_test(cands, ds, folds)["metrics"]["GAP"])
print(base.name, params, f"global+rerank {np.mean(gaps):.1f} +- {np.std(gaps):.1f}", " ".join(f"{x:.1f}" for x in gaps))
with open(Path(os.environ.get("HOW_MET_LEVERS_CACHE", "/tmp/obj")) / "rerank.jsonl", "a") as f:
    f.write(json.dumps({"run": base.name, "params": params, "gap": gaps}) + "\n")
