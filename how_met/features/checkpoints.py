"""HOW model files: the official HOW checkpoints (``how_r18.pth``, ``how_r50-.pth``; old "meta"
and new "net_params" layouts) and how-met's own files, read with ``torch.load(weights_only=True)``,
which cannot execute code from the file; and ``build_model``, a checkpoint or the offline
ImageNet weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Tuple

import torch

from .backbones import BACKBONES
from .network import IMAGENET_MEAN, IMAGENET_STD, HOWNet, ModelConfig, model_fingerprint
from .settings import SHIPPED_MODELS
from .shipped import load_shipped_model
from ..utils import atomic_path

CHECKPOINT_FORMAT = "how-met/1"


def cached_download(url: str) -> Path:
    """The local copy of ``url`` in the cache (``$HOW_MET_CACHE``, default ~/.cache/how-met),
    downloaded once. The cache is keyed by the whole URL (two URLs ending in the same file name
    are two files); a ``#sha256=<hex>`` fragment is checked against the file's SHA-256."""
    url, _, fragment = url.partition("#")
    expected = fragment[len("sha256="):].lower() if fragment.startswith("sha256=") else None
    cache = Path(os.environ.get("HOW_MET_CACHE", Path.home() / ".cache" / "how-met"))
    name = Path(url.split("?")[0]).name or "download"
    target = cache / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target, suffix=".part") as tmp:
            try:
                urllib.request.urlretrieve(url, tmp)
            except OSError as exc:
                raise RuntimeError(f"{url}: download failed ({exc})") from None
    if expected:
        digest = hashlib.sha256()
        with open(target, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != expected:
            raise RuntimeError(f"{url}: sha256 {digest.hexdigest()} of the downloaded file ({target}) "
                               f"is not the expected {expected}")
    return target


def _read_checkpoint(source: str) -> dict:
    """torch.load(weights_only=True) of a path or http(s) URL (never runs code from the file)."""
    if str(source).startswith(("http://", "https://")):
        source = cached_download(str(source))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        reason = str(exc).split("\n")[0][:200]
        raise RuntimeError(f"{path}: not a loadable checkpoint ({reason})") from None


def _official_backbone(arch: str, skip_layer: int) -> Tuple[str, str]:
    """how-met backbone name and layer for an official HOW architecture + skip_layer."""
    arch = arch.lower()
    if not arch.startswith("resnet") or arch not in BACKBONES:
        raise ValueError(f"unsupported HOW architecture {arch!r}")
    return arch, ("layer3" if skip_layer else "layer4")


def load_model(source: str, device: str = "cpu") -> HOWNet:
    """Load an official HOW checkpoint (old or new layout), a how-met model file, or a shipped
    whitening (its name in ``SHIPPED_MODELS`` or a ``.whitening.npz`` file) on the offline trunk."""
    if str(source) in SHIPPED_MODELS or str(source).endswith(".whitening.npz"):
        return load_shipped_model(source, device)
    ckpt = _read_checkpoint(source)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise RuntimeError(f"{source}: no 'state_dict' in checkpoint")
    state = ckpt["state_dict"]
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        return model_from_payload(ckpt, source, device)
    if "meta" in ckpt:  # old official layout
        meta = ckpt["meta"]
        arch, skip = meta.get("architecture"), int(meta.get("skip_layer", 0))
        w_key, b_key = "whiten.weight", "whiten.bias"
    elif "net_params" in ckpt:  # new official layout
        meta = ckpt["net_params"]
        arch, skip = meta.get("architecture"), int(meta.get("skip_layer", 0))
        w_key, b_key = "dim_reduction.weight", "dim_reduction.bias"
    else:
        raise RuntimeError(f"{source}: unknown checkpoint layout (keys {sorted(ckpt)[:5]})")
    backbone, layer = _official_backbone(str(arch), skip)
    if w_key not in state:
        raise RuntimeError(f"{source}: missing {w_key}")
    dim = int(state[w_key].shape[0])
    model = HOWNet(ModelConfig(backbone, layer, dim, checkpoint=str(source)), imagenet=False)
    trunk_state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    expected = model.trunk.features.state_dict()
    missing = sorted(set(expected) - set(trunk_state))
    extra = sorted(set(trunk_state) - set(expected))
    if missing:
        raise RuntimeError(f"{source}: trunk weights missing ({missing[:3]}...)")
    if extra:  # e.g. layer4 weights in a skip_layer checkpoint: ignore what the trunk drops
        trunk_state = {k: v for k, v in trunk_state.items() if k in expected}
    model.trunk.features.load_state_dict(trunk_state)
    model.set_reduction(state[w_key], state[b_key])
    return model.to(device).eval()


def model_payload(model: HOWNet) -> dict:
    """A how-met model as plain data (format, config JSON, fingerprint, CPU tensors): what
    ``save_model`` writes and what distributed extraction ships to its workers."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(asdict(model.config)),
        "model_fingerprint": model_fingerprint(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def model_from_payload(payload: dict, source="the model", device: str = "cpu") -> HOWNet:
    """The model of a ``model_payload`` (read from a file or received by a worker), its weights
    checked against the fingerprint it records; ``source`` names it in errors."""
    try:
        config = ModelConfig(**json.loads(payload["config"]))
    except (TypeError, ValueError) as exc:  # unknown or missing fields, not JSON
        raise RuntimeError(f"{source}: model config is not valid ({exc})") from None
    model = HOWNet(config, imagenet=False)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{source}: checkpoint does not match its config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    recorded = payload.get("model_fingerprint")
    if recorded is not None and recorded != model_fingerprint(model):
        raise RuntimeError(f"{source}: weights do not match the model fingerprint the file records "
                           f"({recorded}, computed {model_fingerprint(model)}): damaged or edited file")
    return model.to(device).eval()


def write_checkpoint(payload: dict, path: os.PathLike) -> None:
    """``torch.save`` of plain tensors, numbers, strings, lists and dicts (what
    ``torch.load(weights_only=True)`` reads back), atomically."""
    with atomic_path(path) as tmp:
        # A file object, not the path: torch names the zip's top folder after the file, and
        # the temporary name holds the process id -- the bytes would differ on every run.
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)


def save_model(model: HOWNet, path: os.PathLike) -> None:
    """Save a how-met model (weights + config + learned whitening), loadable without pickle."""
    write_checkpoint(model_payload(model), path)


def check_official_layout(backbone: str) -> None:
    """Refuse a backbone the official HOW checkpoint layout cannot describe (it knows ResNets)."""
    if BACKBONES[backbone][0] != "resnet":
        raise ValueError(f"the official HOW checkpoint layout describes ResNet trunks only, not "
                         f"{backbone}: use the how-met model file")


def save_official(model: HOWNet, path: os.PathLike) -> None:
    """Save a ResNet HOW model in the official HOW checkpoint layout (the "net_params" one that
    ``how_r18.pth`` uses), for the HOW and ASMK reference code. That layout knows ResNet trunks
    only: other backbones are refused (their how-met file is the one to share)."""
    check_official_layout(model.config.backbone)
    if not model.has_whitening:
        raise ValueError("the model has no learned whitening: the official layout needs its reduction layer")
    state = {f"features.{k}": v.detach().cpu() for k, v in model.trunk.features.state_dict().items()}
    state["dim_reduction.weight"] = model.dim_reduction.weight.detach().cpu()
    state["dim_reduction.bias"] = model.dim_reduction.bias.detach().cpu()
    write_checkpoint({
        "net_params": {"architecture": BACKBONES[model.config.backbone][1],
                       "skip_layer": int(model.config.layer == "layer3"), "dim": int(model.config.dim),
                       "pretrained": False, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "state_dict": state,
        "_version": "how/2020",
    }, path)


def build_model(backbone: str = "efficientnet-lite0", layer: Optional[str] = None, dim: int = 128,
                checkpoint: Optional[str] = None, device: str = "cpu") -> HOWNet:
    """A checkpoint if given, else the backbone with its offline ImageNet weights."""
    if checkpoint:
        return load_model(checkpoint, device)
    if BACKBONES[backbone][0] != "effnet":
        raise ValueError(f"{backbone}: no offline ImageNet weights; pass a HOW checkpoint "
                         f"(path or URL) with --checkpoint")
    return HOWNet(ModelConfig(backbone, layer, dim), imagenet=True).to(device).eval()
