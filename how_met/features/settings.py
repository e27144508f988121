"""Extraction settings: the named configs, how a config is resolved, what a feature store
records about its extractor, and the check that two such records are compatible.

Light on purpose (no torch): the command line builds its options from these names.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple

logger = logging.getLogger(__name__)

# How a scale's input size is computed (see HOWNet._scaled) and how images are decoded (see
# images.load_image). "floor" is the official HOW rule (output floor(h * s)), used by the
# published configs; how-met's own configs keep round 1's "round": on the shared sets "floor" was
# not free (README "Fidelity: resize rule").
RESIZE_RULES = ("floor", "round")
DEFAULT_RESIZE_RULE = "round"
IMAGE_LOADING = ("how-met", "official")
# What stores written before these settings existed were made with.
LEGACY_EXTRACTION = {"resize_rule": "round", "image_loading": "how-met"}
# Extraction settings the command line can override one by one.
OVERRIDABLE = ("scales", "features_num", "image_size", "resize_rule", "image_loading")
# Backbone name -> (kind, architecture, skip_layer, default local layer); the trunks are built by
# features.backbones, here only the names (the command line lists them without importing torch).
BACKBONES: Dict[str, Tuple[str, str, int, Optional[str]]] = {
    "efficientnet-lite0": ("effnet", "efficientnet-lite0", 0, "blocks.11.expand"),
    "efficientnet-lite1": ("effnet", "efficientnet-lite1", 0, "blocks.15.expand"),
    "efficientnet-lite2": ("effnet", "efficientnet-lite2", 0, "blocks.15.expand"),
    "resnet18": ("resnet", "resnet18", 0, None),
    "resnet50": ("resnet", "resnet50", 1, None),   # "-R50": layer4 dropped, as in HOW
    "resnet101": ("resnet", "resnet101", 1, None),
}

# Named extraction configs (the "model" part builds the network; the rest drives extraction).
# Defaults measured on ../shared/data/museum (see README "Choosing the defaults"): the
# stride-16 expansion of block 11, 3 scales and images <= 500 px.
# "upscale_to_image_size": a scale above 1 is used only while it keeps the longer side within
# image_size, so a 200 px catalogue photo is also seen at 400 px like a 500 px one at 1.0 (see
# README "Choosing the defaults": grocery HOW+ASMK 48 -> 62 GAP, museum and landmarks unchanged).
CONFIGS: Dict[str, dict] = {
    "lite0": {
        "model": {"backbone": "efficientnet-lite0", "layer": None, "dim": 128},
        "scales": [2.0, 1.414, 1.0, 0.707, 0.5],
        "upscale_to_image_size": True,
        "features_num": 1000,
        "image_size": 500,
        "gem": True,
        "resize_rule": DEFAULT_RESIZE_RULE,
        "image_loading": "how-met",
    },
    "lite0-7scales": {
        "model": {"backbone": "efficientnet-lite0", "layer": None, "dim": 128},
        "scales": [2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25],
        "upscale_to_image_size": False,  # the SPEC's scales on every image (and so how-r18/r50)
        "features_num": 1000,
        "image_size": 500,
        "gem": True,
        "resize_rule": DEFAULT_RESIZE_RULE,
        "image_loading": "how-met",
    },
}
# The published HOW settings, reproduced exactly (need an official checkpoint: --checkpoint
# how_r18.pth / how_r50-.pth): 7 scales, images <= 1024 px, the official resize rule and image
# loading. The rest of the published pipeline (codebook, global baseline) is
# pipeline.settings.PUBLISHED.
for _name, _backbone in (("how-r18", "resnet18"), ("how-r50", "resnet50")):
    CONFIGS[_name] = {**CONFIGS["lite0-7scales"], "model": {"backbone": _backbone, "layer": None, "dim": 128},
                      "image_size": 1024, "resize_rule": "floor", "image_loading": "official"}

DEFAULT_CONFIG = "lite0"

# Shipped unsupervised parts (package data in how_met/shipped/; codebooks/README.md says how they
# were made): the PCA-whitening of the reduction layer
# and a visual codebook, learned from ../shared/data/corpus (generic photos, no evaluation
# image) with the extractor named in "model". A small database uses them instead of learning
# its own (shipped_parts_for).
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "shipped"  # installed with the package
SHIPPED_MODELS: Dict[str, dict] = {
    "lite0-corpus-v1": {
        "model": {"backbone": "efficientnet-lite0", "layer": "blocks.11.expand", "dim": 128},
        "whitening": "lite0-corpus-v1.whitening.npz",
        "codebook": "lite0-corpus-v1-1k.npz",
        "training_images": 1092,
    },
}
DEFAULT_SHIPPED = "lite0-corpus-v1"


def shipped_parts_for(model: dict, n_images: int) -> Optional[str]:
    """The default shipped parts (whitening + codebook) for a collection of ``n_images`` images
    extracted with ``model`` (a ModelConfig dict), or None when the collection should learn its
    own: when the extractor is not theirs, or the collection has at least as many images as the
    corpus they were learned from (more images to learn the same parts from). Measured (README
    "Choosing the defaults"): HOW+ASMK with corpus-learned parts vs database-learned ones,
    landmarks (9 images) 91.6 +- 1.3 vs 79.4 +- 2.4, grocery (31) 48.1 +- 5.5 vs 12.5 +- 1.2 (3
    seeds each); museum (231, one run, with the upscales) 98.8 vs 96.6. The large-collection side
    is reasoned, not measured: no shared set is that large."""
    shipped = SHIPPED_MODELS[DEFAULT_SHIPPED]
    theirs = shipped["model"]
    same_extractor = (model["backbone"] == theirs["backbone"] and model.get("dim") == theirs["dim"]
                      and model.get("layer") in (None, theirs["layer"]))
    return DEFAULT_SHIPPED if same_extractor and n_images < shipped["training_images"] else None


def shipped_path(name: str, part: str) -> Path:
    """The file of a shipped model's ``part`` ("whitening" or "codebook")."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"unknown shipped model {name!r}; choose from {', '.join(SHIPPED_MODELS)}")
    return SHIPPED_DIR / SHIPPED_MODELS[name][part]
WHITEN_IMAGES = 1000       # images PCA-whitening is learned from when a model has none
WHITEN_FEATURES = 1000     # features per image for it (SPEC: up to 1000)


# Bounds on what one image may cost: the network input at the largest scale (longer side, px),
# the number of scales and the features kept (the published setting: 1024 px x 2, 7 scales,
# 1000 features). `--scales 40` asked for 18 GB before these.
MAX_INPUT_SIDE = 4096
MAX_SCALES = 16
MAX_FEATURES = 100_000


def check_extraction_config(config: dict, where="extraction settings") -> dict:
    """Refuse settings that are malformed or would make one image cost unbounded memory/time
    (``where`` names their source: the command line, an index's metadata, ...)."""
    scales = config.get("scales")
    if not isinstance(scales, (list, tuple)) or not scales or len(scales) > MAX_SCALES or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
            for s in scales):
        raise ValueError(f"{where}: scales {scales!r} must be 1 to {MAX_SCALES} positive finite numbers")
    for name, low, high in (("image_size", 1, MAX_INPUT_SIDE), ("features_num", 1, MAX_FEATURES)):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{where}: {name} {value!r} must be an integer in [{low}, {high}]")
    if config["image_size"] * max(scales) > MAX_INPUT_SIDE:
        raise ValueError(f"{where}: image_size {config['image_size']} x scale {max(scales):g} exceeds "
                         f"the {MAX_INPUT_SIDE} px network input limit")
    return config


def default_config() -> dict:
    return copy.deepcopy(CONFIGS[DEFAULT_CONFIG])


def resolve_config(config) -> dict:
    if config is None:
        return default_config()
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown extraction config {config!r}; choose from {', '.join(CONFIGS)}")
        return copy.deepcopy(CONFIGS[config])
    merged = default_config()
    merged.update(copy.deepcopy(config))
    return merged


def store_config(model, config: dict) -> dict:
    """What a feature store records about how its features were made."""
    return {
        "model": asdict(model.config),
        "stride": model.stride,
        "scales": [float(s) for s in config["scales"]],
        "features_num": int(config["features_num"]),
        "image_size": int(config["image_size"]),
        "dim": int(model.config.dim),
        "gem": bool(config.get("gem", True)),
        "resize_rule": config.get("resize_rule", DEFAULT_RESIZE_RULE),
        "image_loading": config.get("image_loading", "how-met"),
        "upscale_to_image_size": bool(config.get("upscale_to_image_size", False)),
    }


def with_legacy_defaults(config: dict) -> dict:
    """A recorded extractor config with the settings it predates filled in (LEGACY_EXTRACTION)."""
    return {**LEGACY_EXTRACTION, **config} if config else config


def check_extractor(features_config: dict, expected: dict, features_name, expected_name) -> None:
    """Refuse features of another network/dimension than ``expected`` (warn on other settings)."""
    features_config, expected = with_legacy_defaults(features_config), with_legacy_defaults(expected)
    if not features_config or not expected or features_config == expected:
        return
    for field in ("model", "dim"):
        if field in features_config and field in expected and features_config[field] != expected[field]:
            raise ValueError(f"{features_name}: features come from another extractor than {expected_name} "
                             f"({field}: {json.dumps(features_config[field], sort_keys=True)} vs "
                             f"{json.dumps(expected[field], sort_keys=True)})")
    differing = sorted(k for k in set(features_config) | set(expected) if features_config.get(k) != expected.get(k))
    logger.warning("%s: extraction settings differ from %s in %s", features_name, expected_name, ", ".join(differing))


class ModelMismatchError(ValueError):
    """Two files whose descriptors come from different models (the message names both)."""


_UNCHECKED: set = set()


def check_model(fingerprint, expected, name, expected_name) -> None:
    """Refuse to combine ``name`` and ``expected_name`` when the models that made their
    descriptors differ (``fingerprint`` vs ``expected``, see features.network.model_fingerprint).

    Descriptors of two models -- one backbone with two PCA-whitenings, say -- live in different
    spaces: mixed, every score is noise. A file written before how-met recorded fingerprints
    (None) is accepted with a warning.
    """
    if fingerprint and expected:
        if fingerprint != expected:
            raise ModelMismatchError(
                f"{name} (model {fingerprint}) and {expected_name} (model {expected}) come from different "
                f"models, e.g. two PCA-whitenings; extract both with one model (how-met extract --like "
                f"DATABASE.h5, or extract_to_store(..., like=...))")
        return
    unchecked = name if not fingerprint else expected_name
    if (str(name), str(expected_name)) not in _UNCHECKED:
        _UNCHECKED.add((str(name), str(expected_name)))
        logger.warning("%s records no model fingerprint (written before how-met recorded them): cannot check "
                       "that %s and %s come from one model", unchecked, name, expected_name)
