"""Shipped PCA-whitening of the HOW reduction layer: a small, versioned file in ``codebooks/``
that turns the offline ImageNet trunk into a complete model without learning anything from the
user's images (see codebooks/README.md for how it was made).

File: ``.npz`` of plain arrays (read with ``allow_pickle=False``): ``weight`` (dim, C) and
``bias`` (dim,) float32 of the 1x1 reduction, stored exactly as used, so the model's
fingerprint is reproducible bit for bit; ``meta_json``: name, version, the extractor config
(backbone, layer, dim), the model fingerprint it gives and the training set.

Loading rebuilds the trunk from its offline weights, sets the reduction and recomputes the
model fingerprint: another extractor (other backbone, layer, dimension or trunk weights) is
refused with one line naming the file and both values.
"""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Union

import numpy as np

from .network import HOWNet, ModelConfig, model_fingerprint
from .settings import SHIPPED_MODELS, shipped_path
from ..utils import atomic_path, check_file_format

FORMAT = "how-met-whitening"
FORMAT_VERSION = 1


def save_whitening(model: HOWNet, path: os.PathLike, name: str, version: int, training: dict) -> dict:
    """Write the reduction layer of ``model`` (and what it was learned from) to ``path``."""
    if not model.has_whitening:
        raise ValueError("the model has no learned whitening to save")
    weight = model.dim_reduction.weight.detach().cpu().numpy()[:, :, 0, 0].astype(np.float32)
    bias = model.dim_reduction.bias.detach().cpu().numpy().astype(np.float32)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "version": int(version),
            "model": asdict(model.config), "model_fingerprint": model_fingerprint(model),
            "training": training,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, weight=weight, bias=bias, meta_json=np.array(json.dumps(meta, sort_keys=True)))
    return meta


def read_whitening(source: Union[str, os.PathLike]) -> tuple:
    """(weight, bias, meta) of a shipped model name or whitening file."""
    path = shipped_path(str(source), "whitening") if str(source) in SHIPPED_MODELS else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: whitening file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            weight, bias = data["weight"], data["bias"]
            meta = json.loads(str(data["meta_json"]))
    except (KeyError, ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a how-met whitening file ({type(exc).__name__}: {exc})") from None
    check_file_format(path, meta, FORMAT, FORMAT_VERSION, "whitening file")
    meta["path"] = str(path)
    return weight, bias, meta


def apply_whitening(model: HOWNet, source: Union[str, os.PathLike]) -> dict:
    """Set the shipped reduction on ``model`` after checking it is the extractor it was learned
    for; returns the file's metadata. Raises ValueError on any mismatch."""
    weight, bias, meta = read_whitening(source)
    expected = ModelConfig(**meta["model"]).resolved()
    if (model.config.backbone, model.config.layer, model.config.dim) != \
            (expected.backbone, expected.layer, expected.dim):
        raise ValueError(f"{meta['path']}: learned for {expected.backbone} {expected.layer} dim {expected.dim}, "
                         f"not for this extractor ({model.config.backbone} {model.config.layer} dim {model.config.dim})")
    model.set_reduction(weight, bias)
    found = model_fingerprint(model)
    if found != meta["model_fingerprint"]:
        model.whitening_learned.fill_(False)
        raise ValueError(f"{meta['path']}: model fingerprint {found} of this extractor differs from the "
                         f"recorded {meta['model_fingerprint']} (other trunk weights?)")
    return meta


def load_shipped_model(source: Union[str, os.PathLike], device: str = "cpu") -> HOWNet:
    """The offline ImageNet trunk with a shipped whitening (name or file), fingerprint-checked."""
    _, _, meta = read_whitening(source)
    config = ModelConfig(**meta["model"])
    model = HOWNet(config, imagenet=True)
    apply_whitening(model, source)
    return model.to(device).eval()
