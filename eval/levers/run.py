"""Issue-13 lever runs from the raw-feature cache (cache.py): emulate an extraction config
(scales, upscale cap, features_num, whitening source) into a FeatureStore, then run
how_met.pipeline.evaluate.run_evaluation for several seeds (each seed = codebook seed + fold
split) and print mean +- std of GAP per method; every run is appended to results.jsonl.

    python eval/levers/run.py --set grocery --scales 2,1.414,1,0.707,0.5 --cap 500 --white corpus --cb corpus
"""
import argparse, json, os, shutil, time
from pathlib import Path
import h5py, numpy as np
from how_met.datasets import load_dataset
from how_met.features.store import FeatureStore, LocalFeatures
from how_met.features.whitening import PCAWhitening, whitening_from_moments
from how_met.asmk.codebook import Codebook
from how_met.pipeline.evaluate import run_evaluation
from how_met.pipeline.settings import DEFAULT_SETTINGS
import copy

OBJ = Path(os.environ.get("HOW_MET_LEVERS_CACHE", "/tmp/obj"))

def pick(g, scales, cap, fn, input_size):
    w, h = input_size
    chosen = [s for s in scales if f"{s:g}" in g and (s <= 1 or max(w, h) * s <= cap)]
    att = np.concatenate([g[f"{s:g}"]["att"][:] for s in chosen])
    order = np.argsort(-att, kind="stable")[:fn]
    desc = np.concatenate([g[f"{s:g}"]["desc"][:] for s in chosen])[order].astype(np.float32)
    loc = np.concatenate([g[f"{s:g}"]["loc"][:] for s in chosen])[order]
    sc = np.concatenate([np.full(len(g[f"{s:g}"]["att"]), s, np.float32) for s in chosen])[order]
    return desc, att[order] / att.max(), loc, sc

def moments(descs):
    n = sum(len(d) for d in descs)
    s1 = sum(d.astype(np.float64).sum(0) for d in descs)
    s2 = sum(d.astype(np.float64).T @ d.astype(np.float64) for d in descs)
    mean = s1 / n
    return mean, (s2 - n * np.outer(mean, mean)) / (n - 1), n

def corpus_keys(h5):
    found = []
    h5.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Group) and "done" in obj.attrs else None)
    return sorted(found)

def corpus_whitening():
    path = OBJ / "corpus_whitening.npz"
    if not path.exists():
        with h5py.File(OBJ / "corpus.h5", "r") as h5:
            mean, cov, n = moments([h5[k]["desc"][:] for k in corpus_keys(h5)])
        m, p = whitening_from_moments(mean, cov, n, 128)
        np.savez(path, mean=m, projection=p)
    z = np.load(path)
    return z["mean"], z["projection"]

def corpus_codebook(size, seed, per_image=300):
    path = OBJ / f"corpus_cb{size}_s{seed}.npz"
    if not path.exists():
        mean, proj = corpus_whitening()
        rng = np.random.default_rng(seed)
        parts = []
        with h5py.File(OBJ / "corpus.h5", "r") as h5:
            for k in corpus_keys(h5):
                d = h5[k]["desc"][:]
                d = d[np.sort(rng.choice(len(d), min(per_image, len(d)), replace=False))]
                parts.append((d.astype(np.float32) - mean) @ proj.T)
        cb = Codebook(size=size, seed=seed).train(np.concatenate(parts))
        cb.save(path)
    return path

def build_store(ds, name, scales, cap, fn, white, out):
    with h5py.File(OBJ / f"{name}.h5", "r") as h5:
        picked = {k: pick(h5[k], scales, cap, fn, tuple(h5[k].attrs["input_size"])) + (tuple(int(v) for v in h5[k].attrs["input_size"]), h5[k]["gem"][:]) for k in ds.all_keys()}
    if white == "corpus":
        mean, proj = corpus_whitening()
    else:
        mean, cov, n = moments([picked[k][0][:1000] for k in ds.db_keys])
        mean, proj = whitening_from_moments(mean, cov, n, 128)
    tmp = Path(str(out) + ".tmp")
    if tmp.exists(): tmp.unlink()
    with FeatureStore(tmp, "a") as store:
        store.set_config({"model": {"backbone": "efficientnet-lite0", "layer": "blocks.11.expand", "dim": 128, "checkpoint": None},
                          "stride": 16, "scales": [float(s) for s in scales], "features_num": fn,
                          "image_size": 500, "dim": 128, "gem": True, "upscale_to_image_size": True})
        for k, (desc, att, loc, sc, size, gem) in picked.items():
            store.write(k, LocalFeatures(((desc - mean) @ proj.T).astype(np.float32), att.astype(np.float32),
                                         loc.astype(np.int16), sc, size, size, gem.astype(np.float32)))
    os.replace(tmp, out)
    return {k: len(v[0]) for k, v in picked.items()}

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", required=True)
    ap.add_argument("--scales", default="1,0.707,0.5")
    ap.add_argument("--cap", type=float, default=10000)
    ap.add_argument("--fn", type=int, default=1000)
    ap.add_argument("--white", default="db")
    ap.add_argument("--cb", default="db")
    ap.add_argument("--cbsize", type=int, default=1024)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="global,how-asmk,fusion")
    ap.add_argument("--tag", default="")
    ap.add_argument("--gwhite", default="db")
    a = ap.parse_args()
    scales = [float(s) for s in a.scales.split(",")]
    ds = load_dataset(Path("/work/shared/data") / a.set)
    label = f"{a.set} scales={a.scales} cap={a.cap:g} fn={a.fn} white={a.white} cb={a.cb}{a.cbsize if a.cb == 'corpus' else ''} gw={a.gwhite} {a.tag}"
    base = OBJ / "runs" / label.replace(" ", "_").replace("=", "-")
    base.mkdir(parents=True, exist_ok=True)
    feats = base / "features.h5"
    t0 = time.time()
    if not feats.exists():
        counts = build_store(ds, a.set, scales, a.cap, a.fn, a.white, feats)
        dbn = np.mean([counts[k] for k in ds.db_keys]); qn = np.mean([counts[k] for k in ds.query_keys])
        (base / "counts.json").write_text(json.dumps({"db_mean": dbn, "query_mean": qn}))
    counts = json.loads((base / "counts.json").read_text())
    rows = {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        work = base / f"seed{seed}"
        work.mkdir(exist_ok=True)
        if not (work / "features.h5").exists():
            os.symlink(feats, work / "features.h5")
        if a.cb == "corpus" and not (work / "codebook.npz").exists():
            src = corpus_codebook(a.cbsize, seed)
            shutil.copy(src, work / "codebook.npz"); shutil.copy(str(src)[:-4] + ".json", work / "codebook.json")
        if a.gwhite == "corpus" and not (work / "global_whitening.npz").exists():
            with h5py.File(OBJ / "corpus.h5", "r") as h5:
                gem = np.stack([h5[k]["gem"][:] for k in corpus_keys(h5)])
            PCAWhitening.learn(gem, dims=128).save(work / "global_whitening.npz")
        settings = copy.deepcopy(DEFAULT_SETTINGS)
        settings["extract"]["scales"] = scales; settings["extract"]["features_num"] = a.fn
        settings["methods"] = a.methods.split(","); settings["seed"] = seed
        settings["unsupervised"] = "database"  # the parts are given above (store, codebook.npz)
        res = run_evaluation(work_dir=work, settings=settings, cv=2, dataset=ds)
        for m, v in res["methods"].items():
            rows.setdefault(m, []).append(v["GAP"])
    out = {"label": label, "counts": counts, "gap": rows, "seconds": time.time() - t0}
    with open(OBJ / "results.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")
    print(label, f"feats db/q {counts['db_mean']:.0f}/{counts['query_mean']:.0f}")
    for m, v in rows.items():
        print(f"  {m:14s} {np.mean(v):5.1f} +- {np.std(v):4.1f}   {' '.join(f'{x:.1f}' for x in v)}")

if __name__ == "__main__":
    main()
