"""A small, independent port of the published reference behaviour, for the parity tests.

Written for how-met from the papers and the behaviour of the public code (gtolias/how with
cirtorch, jenicek/asmk, nikosips/met), not copied from it. Each function does what the
reference does, including its known failure modes, so that a test can show where how-met
agrees and where (and why) it deliberately differs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- checkpoints --------------------------------------------------------------------------------

def write_official_checkpoint(path: Path, layout: str, arch: str = "resnet18", skip_layer: int = 0,
                              dim: int = 16, seed: int = 0):
    """Write ``path``: a HOW checkpoint in the official "old" (meta/whiten) or "new"
    (net_params/dim_reduction) layout with random weights and random BatchNorm statistics (so a
    misplaced tensor shows). Returns the trunk (torchvision children, the way the reference
    builds it) and the 1x1 reduction's weight and bias."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    children = list(net.children())[:-2]  # conv1, bn1, relu, maxpool, layer1..4
    state = {f"features.{k}": v for k, v in torch.nn.Sequential(*children).state_dict().items()}
    channels = {"resnet18": 512, "resnet50": 2048}[arch] // (2 ** skip_layer)
    weight, bias = torch.randn(dim, channels, 1, 1) * 0.05, torch.randn(dim) * 0.05
    if layout == "old":
        ckpt = {"meta": {"architecture": arch, "skip_layer": skip_layer, "dim": dim, "feat_pool_k": 3,
                         "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                "state_dict": {**state, "whiten.weight": weight, "whiten.bias": bias}}
    else:
        ckpt = {"net_params": {"architecture": arch, "skip_layer": skip_layer, "dim": dim},
                "state_dict": {**state, "dim_reduction.weight": weight, "dim_reduction.bias": bias},
                "_version": "how/2020"}
    torch.save(ckpt, path)
    trunk = torch.nn.Sequential(*(children[:-skip_layer] if skip_layer else children)).eval()
    return trunk, weight, bias


# -- image loading (cirtorch's loader: RGB, LANCZOS thumbnail, EXIF ignored) ---------------------

def reference_load_image(path, image_size: int) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB")
    img.thumbnail((image_size, image_size), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


# -- multi-scale HOW extraction -----------------------------------------------------------------

@torch.no_grad()
def reference_extract(trunk, weight, bias, image_uint8: np.ndarray, scales, features_num: int):
    """The official multi-scale local extraction of one (H, W, 3) uint8 image.

    Per scale: resize by the scale factor (output floor(h * s), as interpolate does with
    ``recompute_scale_factor=True``), trunk, L2-norm attention, 3x3 average smoothing without
    padded cells, 1x1 reduction. Attention is divided by the maximum over all scales; the
    features of all scales are laid out scale by scale, row-major, and the ``features_num``
    strongest kept (sorted descending). Returns numpy arrays (descriptors, strengths,
    locations (x, y), scales).
    """
    x = torch.from_numpy(np.array(image_uint8)).permute(2, 0, 1)[None].float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    maps, atts = [], []
    for s in scales:
        xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False,
                           recompute_scale_factor=True)
        o = trunk(xs)
        atts.append(o.pow(2).sum(1).sqrt()[0])
        o = F.avg_pool2d(o, 3, stride=1, padding=1, count_include_pad=False)
        maps.append(F.conv2d(o, weight, bias)[0])
    top = max(float(a.max()) for a in atts)
    desc, strength, loc, scl = [], [], [], []
    for s, o, a in zip(scales, maps, atts):
        h, w = a.shape
        desc.append(o.reshape(o.shape[0], -1).T)
        strength.append(a.reshape(-1) / top)
        ys, xs_ = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        loc.append(torch.stack([xs_.reshape(-1), ys.reshape(-1)], 1))
        scl.append(torch.full((h * w,), float(s)))
    strength = torch.cat(strength)
    order = torch.argsort(strength, descending=True)[:features_num]
    return (torch.cat(desc)[order].numpy(), strength[order].numpy(), torch.cat(loc)[order].numpy(),
            torch.cat(scl)[order].numpy())


# -- the Met evaluation's kNN classifier and GAP ------------------------------------------------

def reference_knn(neighbour_labels, similarities, n_classes: int, K: int, t: float):
    """The public Met kNN: per neighbour class the maximum similarity, starting from 0 (so a
    negative similarity counts as 0), confidences exp(t s) / (sum + n - m) in float64."""
    preds, confs = [], []
    for labels, sims in zip(neighbour_labels, similarities):
        labels, sims = np.asarray(labels)[:K], np.asarray(sims, np.float64)[:K]
        classes = np.unique(labels)
        best = np.zeros(len(classes))
        for label, s in zip(labels, sims):
            j = int(np.searchsorted(classes, label))
            best[j] = max(best[j], s)
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(t * best)
            conf = e / (e.sum() + (n_classes - len(classes)))
        preds.append(int(classes[np.argmax(conf)]))
        confs.append(float(np.max(conf)))
    return np.array(preds), np.array(confs)


def reference_gap(preds, confs, labels) -> float:
    """GAP as the reference computes it: queries sorted by confidence (ties keep no defined
    order: numpy's default sort), precision at every correct prediction, / #non-distractors."""
    preds, confs, labels = map(np.asarray, (preds, confs, labels))
    rel = (preds == labels)[np.argsort(-confs)]
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / np.count_nonzero(labels != -1))


def reference_tune_t_at_k1(neighbour_labels, similarities, labels, n_classes: int, ts):
    """The reference tuning script's behaviour: t swept with K fixed at 1."""
    scores = [reference_gap(*reference_knn(neighbour_labels, similarities, n_classes, 1, t), labels) for t in ts]
    best = int(np.argmax(scores))
    return (1, float(ts[best])), float(scores[best])
