"""What training learns from: the training images (labelled exhibit databases and unlabelled
folders under one root), their positive pairs, and the augmentation that makes a synthetic pair.

Positives as the Met paper builds them (its Appendix A.1): two images of one class are a real
pair; every image is also a synthetic pair with itself, query and positive being two random
augmentations of it (``augment``). An image without a label is a class of its own, so it trains
with synthetic pairs only.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from ..datasets import Dataset
from ..features.images import ImageError, image_file, list_images, load_image
from .settings import CROP_RATIO, CROP_SCALE, GRAYSCALE_P, JITTER, JITTER_P

logger = logging.getLogger(__name__)


@dataclass
class TrainingImages:
    """Images under one ``root`` (keys relative to it) and their classes (int64; an unlabelled
    image has a class of its own)."""

    root: Path
    keys: list
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, positions: Sequence[int]) -> "TrainingImages":
        positions = np.asarray(positions, np.int64)
        return TrainingImages(self.root, [self.keys[i] for i in positions], self.labels[positions])

    def digest(self) -> str:
        """What a saved training state was made from (keys and labels)."""
        h = hashlib.sha256()
        for key, label in zip(self.keys, self.labels.tolist()):
            h.update(f"{key}\0{label}\n".encode())
        return h.hexdigest()[:16]

    def positive_pairs(self) -> np.ndarray:
        """(n, 2) int64 (query, positive) positions: (i, i) for every image -- its synthetic pair
        -- and every ordered pair of two images of one class (real pairs)."""
        pairs = [np.stack([np.arange(len(self))] * 2, axis=1)]
        order = np.argsort(self.labels, kind="stable")
        bounds = np.flatnonzero(np.diff(self.labels[order])) + 1
        for members in np.split(order, bounds):
            if len(members) > 1:
                q, p = np.meshgrid(members, members, indexing="ij")
                keep = q != p
                pairs.append(np.stack([q[keep], p[keep]], axis=1))
        return np.concatenate(pairs).astype(np.int64)


def training_images(datasets: Iterable[Dataset] = (), folders: Iterable[os.PathLike] = ()) -> TrainingImages:
    """The database images of ``datasets`` (their classes kept apart: class c of two datasets
    is two classes) and every image under ``folders`` (unlabelled), under their common root."""
    parts = []  # (image root, keys, labels or None)
    for ds in datasets:
        parts.append((Path(ds.image_root), list(ds.db_keys), np.asarray(ds.db_labels, np.int64)))
    for folder in folders:
        parts.append((Path(folder), list_images(folder), None))
    if not parts:
        raise ValueError("training needs images: give a Met-format database (--data / --met) or a folder (--images)")
    roots = [part[0].resolve() for part in parts]
    root = Path(os.path.commonpath(roots))
    keys, labels, next_class = [], [], 0
    for (_, part_keys, part_labels), part_root in zip(parts, roots):
        if not part_keys:
            raise ValueError(f"{part_root}: no images to train on")
        prefix = part_root.relative_to(root).as_posix()
        keys += [k if prefix == "." else f"{prefix}/{k}" for k in part_keys]
        if part_labels is None:
            classes = np.arange(len(part_keys))
        else:
            classes = np.unique(part_labels, return_inverse=True)[1].ravel()
        labels.append(classes + next_class)
        next_class += int(classes.max()) + 1
    if len(set(keys)) != len(keys):
        raise ValueError(f"{root}: an image is listed twice among the training sources")
    return TrainingImages(root, keys, np.concatenate(labels).astype(np.int64))


def load_pixels(root: Path, key: str, image_size: int) -> torch.Tensor:
    """(3, H, W) uint8 of image ``key``, shrunk so its longer side is at most ``image_size``."""
    pixels, _ = load_image(image_file(root, key), image_size)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def augment(pixels: torch.Tensor, image_size: int, generator: torch.Generator,
            crop_scale: Tuple[float, float] = CROP_SCALE, jitter_p: float = JITTER_P,
            grayscale_p: float = GRAYSCALE_P) -> torch.Tensor:
    """One random augmentation of a (3, H, W) uint8 image, drawn from ``generator``: a crop of
    an area fraction in ``crop_scale`` (aspect changed by up to ``CROP_RATIO``) resized so its
    longer side is ``image_size``; colour jitter (brightness, contrast, saturation, hue, in a
    random order) with probability ``jitter_p``; grayscale with probability ``grayscale_p``."""
    _, height, width = pixels.shape
    area = _uniform(generator, *crop_scale) * height * width
    ratio = math.exp(_uniform(generator, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    crop_w = min(width, max(1, round(math.sqrt(area * ratio))))
    crop_h = min(height, max(1, round(math.sqrt(area / ratio))))
    top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
    left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
    scale = image_size / max(crop_w, crop_h)
    size = [max(1, round(crop_h * scale)), max(1, round(crop_w * scale))]
    out = TF.resized_crop(pixels, top, left, crop_h, crop_w, size, antialias=True)
    if float(torch.rand((), generator=generator)) < jitter_p:
        adjust = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
                  "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
        for i in torch.randperm(len(adjust), generator=generator).tolist():
            name = list(adjust)[i]
            strength = JITTER[name]
            factor = _uniform(generator, -strength, strength) if name == "hue" else \
                _uniform(generator, max(0.0, 1 - strength), 1 + strength)
            out = adjust[name](out, factor)
    if float(torch.rand((), generator=generator)) < grayscale_p:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    return out


def seeded(*seed: int) -> torch.Generator:
    """A torch generator whose stream is a function of ``seed`` (e.g. run seed, epoch, tuple)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))


def image_of(root: Path, key: str, image_size: int, augmentation: Optional[Sequence[int]] = None,
             crop_scale: Tuple[float, float] = CROP_SCALE) -> torch.Tensor:
    """Image ``key`` as the network sees it: plain (shrunk to ``image_size``), or augmented with
    the random stream ``seeded(*augmentation)`` (the same seed gives the same image)."""
    pixels = load_pixels(root, key, image_size)
    if augmentation is None:
        return pixels
    return augment(pixels, image_size, seeded(*augmentation), crop_scale)


class BadImages:
    """The training images that could not be read. With ``skip`` (``--skip-bad``) an unreadable
    image is logged once, naming it, and takes no part (no tuple, negative or validation image
    uses it); without, the first one stops training with its one-line error. Which images are
    bad is found as they are read, so a run's tuples, pools and seeds do not depend on it."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.keys: set = set()

    def load(self, root: Path, key: str, image_size: int, augmentation: Optional[Sequence[int]] = None,
             crop_scale: Tuple[float, float] = CROP_SCALE) -> Optional[torch.Tensor]:
        """``image_of``, or None for an unreadable image when skipping."""
        if key in self.keys:
            return None
        try:
            return image_of(root, key, image_size, augmentation, crop_scale)
        except ImageError as exc:
            if not self.skip:
                raise ImageError(f"{exc} (use --skip-bad to train without it)") from None
            self.keys.add(key)
            logger.warning("skipping %s", exc)
            return None

    def kept(self, keys: Sequence[str]) -> np.ndarray:
        """bool per key: not found unreadable."""
        return np.array([key not in self.keys for key in keys], bool)
