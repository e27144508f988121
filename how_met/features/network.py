"""The HOW network (Tolias, Jenicek, Chum, ECCV 2020) on top of a CNN trunk.

trunk -> attention (L2 norm of each feature vector) -> 3x3 average smoothing -> 1x1 conv
(dimensionality reduction initialised as PCA-whitening). Multi-scale extraction keeps the
``features_num`` features with the highest attention over all scales. Model files are read and
written by ``how_met.features.checkpoints``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import BACKBONES, build_trunk, trunk_layer_name
from .settings import DEFAULT_RESIZE_RULE, RESIZE_RULES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights were trained on (x - 127) / 128 inputs (TF Lite convention);
# ImageNet mean/std costs them confidence (measured on the cat photo: 0.79 -> 0.80/0.89/0.95).
LITE_MEAN = (127.0 / 255, 127.0 / 255, 127.0 / 255)
LITE_STD = (128.0 / 255, 128.0 / 255, 128.0 / 255)

GEM_SCALES = (1.0, 1 / math.sqrt(2), 0.5)                     # SPEC section 4 (global baseline)


@dataclass
class ModelConfig:
    """What defines a HOW model (recorded in every feature store it writes)."""

    backbone: str = "efficientnet-lite0"
    layer: Optional[str] = None          # None: the backbone's default local layer
    dim: int = 128                        # reduced descriptor dimension
    checkpoint: Optional[str] = None      # HOW / how-met checkpoint the weights came from

    def resolved(self) -> "ModelConfig":
        return ModelConfig(self.backbone, trunk_layer_name(self.backbone, self.layer), self.dim,
                           self.checkpoint)


@dataclass
class LocalOutput:
    """Top-N local features of one image, as tensors on the model's device."""

    descriptors: torch.Tensor   # (n, dim) whitened, not L2-normalised
    strengths: torch.Tensor     # (n,) attention / max attention over all scales
    locations: torch.Tensor     # (n, 2) (x, y) feature-map cells
    scales: torch.Tensor        # (n,)
    gem: Optional[torch.Tensor] = None  # (G,) multi-scale GeM global descriptor, L2-normalised


def strongest(attention: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the ``n`` largest values of a 1-D tensor, largest first; equal values keep
    their input order (scale by scale, row-major), so ties never depend on the sort kernel."""
    order = torch.sort(attention, descending=True, stable=True).indices
    return order[:min(int(n), attention.numel())]


class HOWNet(nn.Module):
    def __init__(self, config: Optional[ModelConfig] = None, imagenet: bool = True):
        super().__init__()
        self.config = (config or ModelConfig()).resolved()
        self.trunk = build_trunk(self.config.backbone, self.config.layer, imagenet=imagenet)
        kind = BACKBONES[self.config.backbone][0]
        mean, std = (LITE_MEAN, LITE_STD) if kind == "effnet" else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.dim_reduction = nn.Conv2d(self.trunk.channels, self.config.dim, 1)
        # Until PCA-whitening is learned (``set_whitening``) the reduction is undefined.
        self.register_buffer("whitening_learned", torch.zeros((), dtype=torch.bool))
        self.eval()

    # -- properties ------------------------------------------------------------------------------
    @property
    def stride(self) -> int:
        return self.trunk.stride

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def has_whitening(self) -> bool:
        return bool(self.whitening_learned)

    # -- building blocks -------------------------------------------------------------------------
    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 RGB -> normalised float input."""
        x = images_uint8.to(self.device, non_blocking=True).float().div_(255.0)
        return (x - self.mean) / self.std

    @staticmethod
    def attention(feats: torch.Tensor) -> torch.Tensor:
        """L2 norm of each spatial feature vector (B, H, W)."""
        return feats.norm(p=2, dim=1)

    @staticmethod
    def smooth(feats: torch.Tensor) -> torch.Tensor:
        """3x3 average pooling, stride 1, padded cells not counted."""
        return F.avg_pool2d(feats, 3, stride=1, padding=1, count_include_pad=False)

    def project(self, smoothed: torch.Tensor) -> torch.Tensor:
        """The reduction layer on smoothed trunk features (n, C) -> (n, dim).

        The input is rounded to float16 first. The whitening is learned from float16-rounded
        features (its sample is kept in memory as float16 to be projected without a second
        network pass), so rounding here makes every descriptor the same function of the trunk
        output: of an image in that sample or not, extracted fresh or on resume.
        """
        if not self.has_whitening:
            raise RuntimeError("the HOW reduction layer has no PCA-whitening yet: learn it "
                               "(how-met whiten / learn_whitening) or load a checkpoint")
        weight = self.dim_reduction.weight[:, :, 0, 0]
        rounded = smoothed.to(torch.float16).to(weight.dtype)
        return torch.addmm(self.dim_reduction.bias, rounded, weight.t())

    def reduce(self, smoothed: torch.Tensor) -> torch.Tensor:
        """``project`` at every cell of a smoothed map (B, C, H, W) -> (B, dim, H, W)."""
        b, c, h, w = smoothed.shape
        flat = self.project(smoothed.permute(0, 2, 3, 1).reshape(-1, c))
        return flat.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    def set_whitening(self, mean: np.ndarray, projection: np.ndarray) -> None:
        """Set the 1x1 reduction to x -> projection @ (x - mean). projection: (dim, C)."""
        projection = torch.as_tensor(projection, dtype=torch.float32)
        mean = torch.as_tensor(mean, dtype=torch.float32)
        self.set_reduction(projection, -projection @ mean)

    def set_reduction(self, weight, bias) -> None:
        """Set the 1x1 reduction to x -> weight @ x + bias (weight (dim, C) or (dim, C, 1, 1))."""
        weight = torch.as_tensor(weight, dtype=torch.float32)
        bias = torch.as_tensor(bias, dtype=torch.float32)
        expected = (self.config.dim, self.trunk.channels)
        if tuple(weight.shape[:2]) != expected or weight.numel() != expected[0] * expected[1] \
                or tuple(bias.shape) != (expected[0],):
            raise ValueError(f"reduction weight/bias have shapes {tuple(weight.shape)}/{tuple(bias.shape)}, "
                             f"expected {expected}/{(expected[0],)}")
        with torch.no_grad():
            self.dim_reduction.weight.copy_(weight.reshape(self.dim_reduction.weight.shape))
            self.dim_reduction.bias.copy_(bias)
        self.whitening_learned.fill_(True)

    def fused(self) -> "HOWNet":
        """A copy for inference with every BatchNorm folded into the conv before it.

        Mobile trunks spend a large share of CPU time in memory-bound BatchNorm passes; folding
        removes them without changing the outputs (up to float rounding). The copy cannot be
        saved as a how-met model (its state dict lacks the BN layers): keep the original.
        """
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        model = copy.deepcopy(self).eval()
        pairs = []
        for module in model.trunk.modules():
            names = [n for n, _ in module.named_children()]
            children = dict(module.named_children())
            for i, name in enumerate(names[:-1]):
                conv, bn = children[name], children[names[i + 1]]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    pairs.append((module, name, names[i + 1]))
        for module, conv_name, bn_name in pairs:
            fused_conv = fuse_conv_bn_eval(getattr(module, conv_name), getattr(module, bn_name))
            setattr(module, conv_name, fused_conv)
            setattr(module, bn_name, nn.Identity())
        return model

    # -- extraction ----------------------------------------------------------------------------
    @staticmethod
    def _scaled(x: torch.Tensor, scale: float, resize_rule: str = DEFAULT_RESIZE_RULE) -> torch.Tensor:
        """``x`` resized by ``scale`` (bilinear, align_corners=False). The output side is
        floor(side * scale) ("floor", what the official extraction gets from
        ``interpolate(scale_factor=s, recompute_scale_factor=True)``, computed the same way in
        double precision) or round(side * scale) ("round", how-met round 1); sampling follows
        the output size in both cases."""
        if scale == 1.0:
            return x
        if resize_rule not in RESIZE_RULES:
            raise ValueError(f"resize rule must be one of {RESIZE_RULES}, got {resize_rule!r}")
        to_int = math.floor if resize_rule == "floor" else round
        size = tuple(max(1, int(to_int(float(side) * scale))) for side in x.shape[-2:])
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def extract(self, images_uint8: torch.Tensor, scales: Sequence[float] = (1.0, 0.707, 0.5),
                features_num: int = 1000, gem: bool = True, reduce: bool = True,
                gem_scales: Sequence[float] = GEM_SCALES, gem_p: float = 3.0,
                resize_rule: str = DEFAULT_RESIZE_RULE,
                upscale_limit: Optional[int] = None) -> List[LocalOutput]:
        """Multi-scale HOW extraction for a batch of same-size images (B, 3, H, W) uint8.

        ``reduce=False`` returns the smoothed trunk features (C dims) instead of whitened
        ones -- what PCA-whitening is learned from. ``gem`` adds the multi-scale GeM global
        descriptor (trunk's global map, scales ``gem_scales``), sharing forward passes.
        ``upscale_limit``: a scale above 1 is used only if it keeps the longer side within
        this many pixels, so small images are enlarged up to the resolution large ones are
        seen at, and large ones are not enlarged at all (None: every scale is used).
        """
        x = self.normalize(images_uint8)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        batch = x.shape[0]
        if upscale_limit is not None:
            longer = max(x.shape[-2:])
            scales = [s for s in scales if s <= 1.0 or longer * s <= upscale_limit]
        all_scales = list(dict.fromkeys(list(scales) + (list(gem_scales) if gem else [])))
        per_scale = []  # (scale, attention (B,h,w), feats (B,D,h,w))
        gem_sum = None
        for scale in all_scales:
            xs = self._scaled(x, scale, resize_rule)
            want_gem = gem and scale in gem_scales
            if want_gem:
                local, glob = self.trunk.forward_pair(xs)
                pooled = glob.float().clamp(min=1e-6).pow(gem_p).mean(dim=(2, 3)).pow(1.0 / gem_p)
                pooled = F.normalize(pooled, dim=1)
                gem_sum = pooled if gem_sum is None else gem_sum + pooled
            else:
                local = self.trunk(xs)
            if scale not in scales:
                continue
            local = local.float()
            per_scale.append((scale, self.attention(local), self.smooth(local)))

        outputs = []
        for b in range(batch):
            atts, descs, locs, scs = [], [], [], []
            for scale, att, feats in per_scale:
                h, w = att.shape[-2:]
                atts.append(att[b].reshape(-1))
                descs.append(feats[b].reshape(feats.shape[1], -1).t())
                ys, xs_ = torch.meshgrid(torch.arange(h, device=att.device),
                                         torch.arange(w, device=att.device), indexing="ij")
                locs.append(torch.stack([xs_.reshape(-1), ys.reshape(-1)], dim=1))
                scs.append(torch.full((h * w,), float(scale), device=att.device))
            att = torch.cat(atts)
            att = att / att.max().clamp(min=1e-12)  # common maximum over all scales
            order = strongest(att, features_num)
            descriptors = torch.cat(descs)[order]
            outputs.append(LocalOutput(
                # only the kept features are reduced: cheaper than the 1x1 conv over every cell
                descriptors=self.project(descriptors) if reduce else descriptors,
                strengths=att[order],
                locations=torch.cat(locs)[order],
                scales=torch.cat(scs)[order],
                gem=None if gem_sum is None else F.normalize(gem_sum[b], dim=0),
            ))
        return outputs


def model_fingerprint(model: HOWNet) -> str:
    """What made a model's descriptors, as 16 hex digits: SHA-256 over the canonical JSON of its
    config and every tensor of its state dict in name order (name, dtype, shape, then bytes).

    The PCA-whitening lives in the reduction layer's weights, so two whitenings of one backbone
    have two fingerprints. ``config.checkpoint`` (where the weights were read from) is left out:
    the same weights read from another path are the same model. Feature stores, codebooks and
    inverted files record the fingerprint; every consumer refuses files that disagree.
    """
    config = {k: v for k, v in asdict(model.config).items() if k != "checkpoint"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]
