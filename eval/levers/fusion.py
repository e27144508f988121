"""global+rerank fusion weights (issue 13): tuned per fold over the grid vs fixed, on finished
`how-met evaluate --repeats N` work directories. GAP mean +- std over the repeats; each row is
tuned and tested exactly as evaluate does (only the candidate list differs).

    python eval/levers/fusion.py museum=WORK1 grocery=WORK2 landmarks=WORK3 [--sweep]

--sweep also scores every fixed weighting of a wider grid and prints the best by worst set.
"""
import sys
from pathlib import Path
import json
import numpy as np
from how_met.datasets import load_dataset
from how_met.recognition.fusion import fusion_grid
from how_met.recognition.protocol import protocol_folds, tune_and_test
from how_met.pipeline.evaluate import codebook_is_seeded, repeat_dir
from how_met.pipeline.stages import aligned, load_rerank_scores
from how_met.verify.scores import FusionWeights

OLD_DEFAULT = FusionWeights(1.0, 1.0, 1.0, 10.0)
SWEEP = {"global_weight": (0.0, 0.25, 0.5, 1.0), "asmk_weight": (0.0, 0.5, 1.0, 2.0, 4.0),
         "inlier_weight": (0.0, 0.5, 1.0, 2.0, 4.0, 8.0), "inlier_half": (5.0, 10.0, 20.0)}


def closest_first(grid, to):
    d = lambda w: (abs(w.global_weight - to.global_weight) + abs(w.asmk_weight - to.asmk_weight) +
                   abs(w.inlier_weight - to.inlier_weight) + abs(np.log2(w.inlier_half / to.inlier_half)))
    return sorted(grid, key=d)  # stable: grid order among equals


def gaps(name, work, weights):
    """global+rerank GAP of every repeat with ``weights`` as the candidates."""
    ds = load_dataset(Path(__file__).resolve().parents[2].parent / "shared" / "data" / name)
    results = json.loads((work / "results.json").read_text())
    settings, seeds = results["settings"], results["repeats"]["seeds"]
    seeded = codebook_is_seeded(settings, len(ds.db_keys))
    out = []
    for seed in seeds:
        scores = load_rerank_scores(repeat_dir(work, settings["seed"], seed, seeded))
        _, folds = protocol_folds(ds, settings.get("cv") or 2, seed)
        cands = [(w.as_dict(), *aligned(scores.fuse(w), ds)) for w in weights]
        out.append(tune_and_test(cands, ds, folds, settings["target_precision"])["metrics"]["GAP"])
    return out


sets = dict(arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg)
rows = {"tuned over the grid (155 points), ties to the first in grid order": fusion_grid(),
        "tuned over the grid, ties to the point closest to (1, 1, 1, 10)": closest_first(fusion_grid(), OLD_DEFAULT),
        "tuned over the grid, ties to the point closest to the default": closest_first(fusion_grid(), FusionWeights()),
        "fixed (1, 1, 1, 10)": [OLD_DEFAULT],
        f"fixed default {tuple(FusionWeights().as_dict().values())[:4]}": [FusionWeights()]}
print("| global+rerank fusion weights (global, ASMK, inliers, half) | " + " | ".join(sets) + " |")
print("|---|" + "---:|" * len(sets))
for label, weights in rows.items():
    cells = [gaps(name, Path(work), weights) for name, work in sets.items()]
    print(f"| {label} | " + " | ".join(f"{np.mean(c):.1f} +- {np.std(c, ddof=1):.1f}" for c in cells) + " |", flush=True)
if "--sweep" in sys.argv:
    table = []
    for w in fusion_grid(SWEEP):
        means = [np.mean(gaps(name, Path(work), [w])) for name, work in sets.items()]
        table.append((min(means), tuple(w.as_dict().values())[:4], means))
    for worst, w, means in sorted(table, key=lambda r: -r[0])[:10]:
        print(w, " ".join(f"{m:.1f}" for m in means))
