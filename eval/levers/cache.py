"""Lever cache (issue 13): per image and per scale, the raw (un-reduced) smoothed trunk features
of every position (the CAP_PER_SCALE strongest), their un-normalised attention and cells, plus
the GeM global descriptor, so that any whitening source, scale subset and features_num can be
emulated by run.py without running the network again (HOWNet.extract normalises attention per
call and keeps only the top features of the scales it is given, hence this loop).

    python eval/levers/cache.py SET $HOW_MET_LEVERS_CACHE/SET.h5      # museum, landmarks, grocery
    python eval/levers/cache.py corpus $HOW_MET_LEVERS_CACHE/corpus.h5 --corpus

The corpus keeps the combined 1000 strongest of scales [1, 0.707, 0.5] (what the default
extractor learns its whitening from). Grocery keeps every upscale; other sets only upscales
that stay within 500 px."""
import sys, time
from pathlib import Path
import h5py, numpy as np, torch
import torch.nn.functional as F
from how_met.datasets import load_dataset
from how_met.features.checkpoints import build_model
from how_met.features.images import load_image
from how_met.features.network import GEM_SCALES
from how_met.utils import configure_threads

ALL_SCALES = [2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25]
CAP_PER_SCALE = 3000

def main():
    name, out = sys.argv[1], Path(sys.argv[2])
    corpus = "--corpus" in sys.argv
    up_cap = 10000 if name == "grocery" else 500  # grocery: every upscale; others: only up to 500 px
    layer = None
    backbone = "efficientnet-lite0"
    for a in sys.argv[3:]:
        if a.startswith("--layer="): layer = a.split("=", 1)[1]
        if a.startswith("--backbone="): backbone = a.split("=", 1)[1]
    configure_threads()
    root = Path("/work/shared/data") / name
    if corpus:
        import json
        keys = [e["path"] for e in json.loads((root / "list.json").read_text())]
        image_root = root
        if not (image_root / keys[0]).exists():
            image_root = root / "images"
    else:
        ds = load_dataset(root)
        keys, image_root = ds.all_keys(), Path(ds.image_root)
    model = build_model(backbone=backbone, layer=layer)
    runner = model.fused().eval()
    t0 = time.time()
    with h5py.File(out, "a") as h5:
        for n, key in enumerate(keys):
            if key in h5 and "done" in h5[key].attrs:
                continue
            arr, original = load_image(image_root / key, 500)
            x = runner.normalize(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None])
            h, w = x.shape[-2:]
            scales = [1.0, 0.707, 0.5] if corpus else [s for s in ALL_SCALES if s <= 1 or max(h, w) * s <= up_cap]
            g = h5.require_group(key)
            for k in list(g.keys()):
                del g[k]
            g.attrs["input_size"] = (w, h)
            gem_sum = 0
            parts = []
            with torch.inference_mode():
                for s in list(dict.fromkeys(scales + list(GEM_SCALES))):
                    xs = runner._scaled(x, s)
                    want_gem = any(abs(s - gs) < 1e-6 for gs in GEM_SCALES)
                    if want_gem:
                        local, glob = runner.trunk.forward_pair(xs)
                        pooled = F.normalize(glob.float().clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3), dim=1)
                        gem_sum = gem_sum + pooled
                    else:
                        local = runner.trunk(xs)
                    if s not in scales:
                        continue
                    local = local.float()
                    att = runner.attention(local)[0].reshape(-1)
                    feats = runner.smooth(local)[0]
                    C, fh, fw = feats.shape
                    feats = feats.reshape(C, -1).t()
                    ys, xs_ = torch.meshgrid(torch.arange(fh), torch.arange(fw), indexing="ij")
                    loc = torch.stack([xs_.reshape(-1), ys.reshape(-1)], 1)
                    parts.append((s, att, feats, loc))
            if corpus:  # combined top-1000 over the three scales (common maximum)
                att = torch.cat([p[1] for p in parts]); order = torch.topk(att, min(1000, att.numel())).indices
                g.create_dataset("desc", data=torch.cat([p[2] for p in parts])[order].numpy().astype(np.float16))
                g.create_dataset("att", data=att[order].numpy())
            else:
                for s, att, feats, loc in parts:
                    order = torch.topk(att, min(CAP_PER_SCALE, att.numel())).indices
                    sg = g.create_group(f"{s:g}")
                    sg.create_dataset("desc", data=feats[order].numpy().astype(np.float16))
                    sg.create_dataset("att", data=att[order].numpy())
                    sg.create_dataset("loc", data=loc[order].numpy().astype(np.int16))
            g.create_dataset("gem", data=F.normalize(gem_sum[0], dim=0).numpy())
            g.attrs["done"] = 1
            if n % 50 == 0:
                print(f"{n}/{len(keys)} {time.time()-t0:.0f}s", flush=True)
    print("done", time.time() - t0)

main()
