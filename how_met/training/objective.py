"""What HOW training optimises (SPEC section 2): the contrastive loss on the attention-weighted
global descriptor of one scale, over tuples whose negatives are mined with the current model."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..features.network import HOWNet
from ..utils import progress
from .data import BadImages
from .settings import CROP_SCALE


def autocast_context(model: HOWNet, enabled: bool):
    """bfloat16 autocast of the trunk on CUDA (the one place it is safe: convolutions); a no-op
    elsewhere and when not ``enabled``."""
    if enabled and model.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pooled_descriptor(model: HOWNet, pixels: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """The training descriptor of one (3, H, W) uint8 image at scale 1: the sum of the reduced
    local features (smoothed, through the frozen whitening) weighted by their attention, then
    L2-normalised -- (dim,), differentiable with respect to the trunk.

    Not ``HOWNet.project``: its float16 rounding of the input would round the gradient too.
    Attention, smoothing, reduction and pooling run in float32 (autocast covers the trunk).
    """
    with autocast_context(model, autocast):
        local = model.trunk(model.normalize(pixels[None]))
    local = local.float()
    attention = model.attention(local)
    reduced = F.conv2d(model.smooth(local), model.dim_reduction.weight, model.dim_reduction.bias)
    return F.normalize((reduced * attention[:, None]).sum(dim=(2, 3)), dim=1)[0]


def contrastive_loss(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                     margin: float) -> torch.Tensor:
    """Contrastive loss of one tuple: half the squared distance to the positive, plus half the
    squared shortfall of each negative's distance from ``margin`` (0 beyond it)."""
    pull = (query - positive).norm().pow(2)
    push = F.relu(margin - (query[None] - negatives).norm(dim=1)).pow(2).sum()
    return 0.5 * (pull + push)


@torch.no_grad()
def describe(model: HOWNet, root: Path, keys: Sequence[str], image_size: int, autocast: bool = False,
             augmentations: Optional[Sequence[Sequence[int]]] = None,
             crop_scale: Tuple[float, float] = CROP_SCALE, desc: str = "describe",
             bad: Optional[BadImages] = None) -> np.ndarray:
    """(n, dim) float32 training descriptors of images: plain, or each augmented with its seed
    (crops of ``crop_scale``). An unreadable image raises, or with a skipping ``bad`` is added
    to it and leaves its row zero (``bad.kept(keys)`` says which rows hold descriptors)."""
    bad = bad or BadImages()
    out = np.zeros((len(keys), model.config.dim), np.float32)
    for i, key in enumerate(progress(keys, desc=desc, unit="img")):
        seed = None if augmentations is None else augmentations[i]
        pixels = bad.load(root, key, image_size, seed, crop_scale)
        if pixels is not None:
            out[i] = pooled_descriptor(model, pixels, autocast).cpu().numpy()
    return out


def hard_negatives(query_desc: np.ndarray, query_labels: np.ndarray, pool_desc: np.ndarray,
                   pool_labels: np.ndarray, n: int, chunk: int = 1024) -> np.ndarray:
    """(nq, n) positions in the pool: for each query the ``n`` most similar pool images of other
    classes than its own, at most one per class (HOW's mining; a class of look-alikes gives one
    negative, not five). Rows are padded with -1 when the pool has too few classes."""
    negatives = np.full((len(query_desc), n), -1, np.int64)
    for start in range(0, len(query_desc), chunk):
        sims = query_desc[start:start + chunk] @ pool_desc.T
        order = np.argsort(-sims, axis=1, kind="stable")
        for row, ranked in enumerate(order):
            label = query_labels[start + row]
            taken = set()
            found = 0
            for j in ranked:
                other = pool_labels[j]
                if other == label or other in taken:
                    continue
                taken.add(other)
                negatives[start + row, found] = j
                found += 1
                if found == n:
                    break
    return negatives
