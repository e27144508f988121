"""Extraction speed: how-met's extractor against a naive loop, in the same process.

    python eval/bench_extract.py [--images 20] [--data ../shared/data/museum] [--device cpu]

For each backbone (the default EfficientNet-Lite0 and ResNet18 -- random weights, speed only)
it extracts the same real images twice and prints images/s:
  naive    : image decoded in the main process, batch 1, one scale at a time through a plain
             eager model under torch.no_grad (what the research code does);
  how-met  : extract_to_store (inference mode, BatchNorm folded into the convolutions,
             channels_last for ResNets, GeM sharing the local passes, decoding in worker
             processes when there are spare cores, JPEG draft decoding of large images).
Both compute the same outputs (local features at every scale + multi-scale GeM).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from how_met.features.extract import extract_to_store  # noqa: E402
from how_met.features.settings import default_config  # noqa: E402
from how_met.features.images import load_image  # noqa: E402
from how_met.features.network import GEM_SCALES, HOWNet, ModelConfig  # noqa: E402
from how_met.utils import configure_threads  # noqa: E402


def naive_extract(model: HOWNet, root: Path, keys, config) -> float:
    """Research-code style loop; returns seconds."""
    start = time.perf_counter()
    with torch.no_grad():
        for key in keys:
            arr, _ = load_image(root / key, config["image_size"])
            x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255
            x = (x - model.mean) / model.std
            feats, atts, gems = [], [], []
            for scale in sorted(set(config["scales"]) | set(GEM_SCALES), reverse=True):
                xs = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False) \
                    if scale != 1 else x
                if scale in config["scales"]:
                    local = model.trunk(xs)
                    atts.append(local.norm(dim=1).flatten())
                    red = model.dim_reduction(F.avg_pool2d(local, 3, 1, 1, count_include_pad=False))
                    feats.append(red[0].flatten(1).t())
                if scale in GEM_SCALES:  # separate global pass, as a separate script would do
                    glob = model.trunk.forward_pair(xs)[1]
                    gems.append(F.normalize(glob.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3)))
            att = torch.cat(atts)
            torch.topk(att / att.max(), min(config["features_num"], att.numel()))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "museum")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbones", default="efficientnet-lite0,resnet18")
    args = parser.parse_args()
    threads = configure_threads()
    db = json.loads((args.data / "database.json").read_text())
    keys = [e["path"] for e in db[: args.images]]
    root = args.data / "images"
    print(f"{len(keys)} images from {args.data}, device {args.device}, {threads} torch threads")
    rows = []
    for backbone in args.backbones.split(","):
        config = default_config()
        config["model"]["backbone"] = backbone
        model = HOWNet(ModelConfig(backbone), imagenet=backbone.startswith("efficientnet"))
        rng = np.random.default_rng(0)  # any whitening will do for timing
        c = model.trunk.channels
        model.set_whitening(np.zeros(c, np.float32), rng.standard_normal((128, c)).astype(np.float32))
        model.to(args.device)
        naive_extract(model, root, keys[:2], config)  # warm-up
        naive_s = naive_extract(model, root, keys, config)
        with tempfile.TemporaryDirectory() as tmp:
            fast_model = copy.deepcopy(model)
            extract_to_store(root, keys[:2], Path(tmp) / "warm.h5", config=config, model=fast_model,
                             device=args.device)
            stats = extract_to_store(root, keys, Path(tmp) / "f.h5", config=config, model=fast_model,
                                     device=args.device)
        fast_ips = stats["images_per_s"]
        naive_ips = len(keys) / naive_s
        rows.append((backbone, naive_ips, fast_ips, fast_ips / naive_ips))
    print(f"\nscales {config['scales']} + GeM {[round(s, 3) for s in GEM_SCALES]}, "
          f"image_size {config['image_size']}, features {config['features_num']}\n")
    print("| backbone | naive images/s | how-met images/s | speed-up |")
    print("|---|---:|---:|---:|")
    for backbone, naive_ips, fast_ips, ratio in rows:
        print(f"| {backbone} | {naive_ips:.2f} | {fast_ips:.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
