"""Stage 1: images -> HOW local features (+ GeM global descriptor) in an HDF5 feature store.

hloc-style: ``main(config, image_root, keys, output)`` skips images already in the store, so an
interrupted run resumes where it stopped; ``--shard i/n`` splits the work between workers and
``how-met merge`` joins their files. Decoding runs in DataLoader worker processes while the
network runs in the main process.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .features import FeatureStore, LocalFeatures, merge_stores
from .images import ImageError, list_images, load_image
from .network import HOWNet, build_model, load_model, save_model, whitening_from_moments
from .backbones import BACKBONES
from .utils import configure_threads, free_cores, progress

logger = logging.getLogger(__name__)

# Named extraction configs (the "model" part builds the network; the rest drives extraction).
# Defaults measured on ../shared/data/museum (see README "Choosing the defaults"): the
# stride-16 expansion of block 11, 3 scales and images <= 500 px.
CONFIGS: Dict[str, dict] = {
    "lite0": {
        "model": {"backbone": "efficientnet-lite0", "layer": None, "dim": 128},
        "scales": [1.0, 0.707, 0.5],
        "features_num": 1000,
        "image_size": 500,
        "gem": True,
    },
    "lite0-7scales": {
        "model": {"backbone": "efficientnet-lite0", "layer": None, "dim": 128},
        "scales": [2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25],
        "features_num": 1000,
        "image_size": 500,
        "gem": True,
    },
    # The published HOW setting (needs an official checkpoint: --checkpoint how_r18.pth).
    "how-r18": {
        "model": {"backbone": "resnet18", "layer": None, "dim": 128},
        "scales": [2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25],
        "features_num": 1000,
        "image_size": 1024,
        "gem": True,
    },
}
DEFAULT_CONFIG = "lite0"
WHITEN_IMAGES = 1000       # images PCA-whitening is learned from when a model has none
WHITEN_FEATURES = 1000     # features per image for it (SPEC: up to 1000)
REUSE_RAW_MAX_IMAGES = 1500  # keep un-reduced features of at most this many images in memory


def default_config() -> dict:
    return copy.deepcopy(CONFIGS[DEFAULT_CONFIG])


def _resolve_config(config) -> dict:
    if config is None:
        return default_config()
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"unknown extraction config {config!r}; choose from {', '.join(CONFIGS)}")
        return copy.deepcopy(CONFIGS[config])
    merged = default_config()
    merged.update(copy.deepcopy(config))
    return merged


def store_config(model: HOWNet, config: dict) -> dict:
    """What a feature store records about how its features were made."""
    return {
        "model": asdict(model.config),
        "stride": model.stride,
        "scales": [float(s) for s in config["scales"]],
        "features_num": int(config["features_num"]),
        "image_size": int(config["image_size"]),
        "dim": int(model.config.dim),
        "gem": bool(config.get("gem", True)),
    }


# ---------------------------------------------------------------------------------------------
# Data loading
# ---------------------------------------------------------------------------------------------


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, image_root: Path, keys: Sequence[str], image_size: int):
        self.image_root, self.keys, self.image_size = image_root, list(keys), image_size

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        key = self.keys[i]
        try:
            arr, original = load_image(self.image_root / key, self.image_size)
        except ImageError as exc:
            return key, None, None, str(exc)
        return key, torch.from_numpy(arr.copy()).permute(2, 0, 1), original, None


def _collate(items):
    return items


def _batches(items, batch_size: int):
    """Group consecutive decoded images of identical size into batches of <= batch_size."""
    current: List = []
    for item in items:
        if current and (len(current) >= batch_size or item[1].shape != current[0][1].shape):
            yield current
            current = []
        current.append(item)
    if current:
        yield current


def _iter_decoded(image_root: Path, keys: Sequence[str], image_size: int, workers: int):
    dataset = _ImageDataset(image_root, keys, image_size)
    if workers <= 0:
        for i in range(len(dataset)):
            yield dataset[i]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers,
                                         collate_fn=_collate, prefetch_factor=4)
    for items in loader:
        yield items[0]


def _to_local_features(out, original, input_size, keep_global: bool) -> LocalFeatures:
    return LocalFeatures(
        descriptors=out.descriptors.float().cpu().numpy(),
        strengths=out.strengths.float().cpu().numpy(),
        locations=out.locations.cpu().numpy().astype(np.int16),
        scales=out.scales.float().cpu().numpy(),
        image_size=tuple(int(v) for v in original),
        input_size=input_size,
        global_descriptor=out.gem.float().cpu().numpy() if keep_global and out.gem is not None else None,
    )


def _extract_batches(model: HOWNet, image_root: Path, keys: Sequence[str], config: dict,
                     batch_size: int, workers: int, skip_bad: bool, reduce: bool,
                     features_num: Optional[int] = None, desc: str = "extract",
                     autocast: bool = False):
    """Yield (key, LocalFeatures) for every readable image; bad ones raise or are logged."""
    decoded = (item for item in _iter_decoded(image_root, keys, config["image_size"], workers)
               if _check_decoded(item, skip_bad))
    bar = progress(total=len(keys), desc=desc, unit="img")
    try:
        for batch in _batches(decoded, batch_size):
            images = torch.stack([item[1] for item in batch])
            ctx = (torch.autocast(model.device.type, dtype=torch.bfloat16) if autocast
                   else torch.autocast(model.device.type, enabled=False))
            with ctx:
                outs = model.extract(images, config["scales"], features_num or config["features_num"],
                                     gem=config.get("gem", True), reduce=reduce)
            for (key, tensor, original, _), out in zip(batch, outs):
                input_size = (int(tensor.shape[2]), int(tensor.shape[1]))
                yield key, _to_local_features(out, original, input_size, config.get("gem", True))
            bar.update(len(batch))
    finally:
        bar.close()


def _inference_copy(model: HOWNet) -> HOWNet:
    """BatchNorm folded (and channels_last for ResNets on CPU): same outputs, faster.

    Measured on 2 cores (eval/bench_extract.py setting): Lite0 4.91 -> 5.38 images/s from
    folding, and 5.09 with channels_last (depthwise convolutions prefer NCHW); ResNet18
    2.20 -> 2.64 with channels_last.
    """
    runner = model.fused()
    if runner.device.type == "cpu" and BACKBONES[runner.config.backbone][0] == "resnet":
        runner.to(memory_format=torch.channels_last)
    return runner


def default_workers() -> int:
    """Decoding processes: none when the network's threads already take every free core (a
    worker then only competes with them: Lite0 5.38 -> 4.69 images/s on 2 cores)."""
    cores = free_cores()
    return 0 if cores <= 2 else min(4, cores // 4 + 1)


def _check_decoded(item, skip_bad: bool) -> bool:
    key, tensor, _, error = item
    if error is None:
        return True
    if not skip_bad:
        raise ImageError(error + " (use --skip-bad to continue past bad images)")
    logger.warning("skipping %s", error)
    return False


# ---------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------


def _sample_keys(keys: Sequence[str], n: int, seed: int = 0) -> List[str]:
    keys = sorted(keys)
    if len(keys) <= n:
        return keys
    rng = np.random.default_rng(seed)
    return sorted(keys[i] for i in rng.choice(len(keys), n, replace=False))


def learn_whitening(model: HOWNet, image_root, keys: Sequence[str], config=None,
                    num_images: int = WHITEN_IMAGES, features_per_image: int = WHITEN_FEATURES,
                    batch_size: int = 1, workers: Optional[int] = None, skip_bad: bool = True,
                    keep_raw: bool = False, seed: int = 0):
    """Learn the reduction layer's PCA-whitening from the smoothed trunk features of up to
    ``num_images`` images (a seeded uniform sample of ``keys``) and set it on ``model``.

    With ``keep_raw`` also returns {key: LocalFeatures with un-reduced descriptors} so the
    caller can project them instead of running the network twice on those images.
    """
    config = _resolve_config(config)
    workers = default_workers() if workers is None else workers
    sample = _sample_keys(keys, num_images, seed)
    sums = None
    raw: Dict[str, LocalFeatures] = {}
    count = 0
    for key, feats in _extract_batches(_inference_copy(model), Path(image_root), sample, config, batch_size,
                                       workers, skip_bad, reduce=False, desc="whitening"):
        # Learn from at most features_per_image of the strongest features (already sorted).
        desc = feats.descriptors[:features_per_image].astype(np.float64)
        if sums is None:
            sums = [np.zeros(desc.shape[1]), np.zeros((desc.shape[1], desc.shape[1]))]
        sums[0] += desc.sum(axis=0)
        sums[1] += desc.T @ desc
        count += len(desc)
        if keep_raw:
            feats.descriptors = feats.descriptors.astype(np.float16)
            raw[key] = feats
    if count < model.config.dim + 1:
        raise RuntimeError(f"only {count} local features to learn a {model.config.dim}-D "
                           f"whitening from: give more images")
    mean = sums[0] / count
    cov = (sums[1] - count * np.outer(mean, mean)) / (count - 1)
    mean, projection = whitening_from_moments(mean, cov, model.config.dim)
    model.set_whitening(mean, projection)
    logger.info("learned PCA-whitening from %d features of %d images", count, len(sample))
    return raw if keep_raw else None


def _project(model: HOWNet, feats: LocalFeatures) -> LocalFeatures:
    weight = model.dim_reduction.weight.detach().cpu().numpy()[:, :, 0, 0]
    bias = model.dim_reduction.bias.detach().cpu().numpy()
    feats.descriptors = (feats.descriptors.astype(np.float32) @ weight.T + bias).astype(np.float32)
    return feats


# ---------------------------------------------------------------------------------------------
# Extraction into a store
# ---------------------------------------------------------------------------------------------


def parse_shard(shard: Optional[str]) -> Optional[Tuple[int, int]]:
    if not shard:
        return None
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {shard!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {shard}: need 0 <= i < n")
    return i, n


def extract_to_store(image_root, keys: Sequence[str], output, config=None,
                     model: Optional[HOWNet] = None, device: str = "cpu", batch_size: int = 1,
                     workers: Optional[int] = None, skip_bad: bool = False, float16: bool = False,
                     shard: Optional[Tuple[int, int]] = None, whiten_keys: Optional[Sequence[str]] = None,
                     model_out=None, autocast: bool = False, flush_every: int = 50) -> dict:
    """Extract features of ``keys`` (paths relative to ``image_root``) into ``output``.

    Images already in the store are skipped (resume). If the model has no PCA-whitening yet it
    is learned first from ``whiten_keys`` (default: ``keys``), saved to ``model_out`` if given,
    and the features computed for it are reused. Returns stats (counts, seconds, images/s).
    """
    config = _resolve_config(config)
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root}: image root is not a directory")
    configure_threads()
    if model is None:
        model = build_model(**config["model"], device=device)
    model.to(device).eval()
    if workers is None:
        workers = default_workers()
    keys = sorted(dict.fromkeys(keys))
    if shard is not None:
        keys = keys[shard[0]::shard[1]]
    started = time.perf_counter()
    done = 0
    with FeatureStore(output, "a") as store:
        todo = [k for k in keys if k not in store]
        skipped = len(keys) - len(todo)
        raw: Dict[str, LocalFeatures] = {}
        if todo and not model.has_whitening:
            sample_from = list(whiten_keys) if whiten_keys is not None else keys
            reuse = min(len(sample_from), WHITEN_IMAGES) <= REUSE_RAW_MAX_IMAGES
            raw = learn_whitening(model, image_root, sample_from, config, batch_size=batch_size,
                                  workers=workers, skip_bad=True, keep_raw=reuse) or {}
            if model_out:
                save_model(model, model_out)
        store.set_config(store_config(model, config))
        runner = _inference_copy(model) if todo else model
        features_num = config["features_num"]
        for key in todo:
            if key in raw:
                feats = raw.pop(key)
                n = features_num
                feats = LocalFeatures(feats.descriptors[:n], feats.strengths[:n], feats.locations[:n],
                                      feats.scales[:n], feats.image_size, feats.input_size,
                                      feats.global_descriptor)
                store.write(key, _project(model, feats), float16=float16)
                done += 1
        remaining = [k for k in todo if k not in store]
        for key, feats in _extract_batches(runner, image_root, remaining, config, batch_size,
                                           workers, skip_bad, reduce=True, autocast=autocast):
            store.write(key, feats, float16=float16)
            done += 1
            if done % flush_every == 0:
                store.flush()
    seconds = time.perf_counter() - started
    stats = {"extracted": done, "skipped_existing": skipped, "seconds": seconds,
             "images_per_s": done / seconds if done and seconds > 0 else None}
    logger.info("extracted %d images (%d already stored) in %.1fs", done, skipped, seconds)
    return stats


def main(config, image_root, keys, output, **kwargs) -> dict:
    """hloc-style entry point: ``main(config_name_or_dict, image_root, keys, output_h5)``."""
    return extract_to_store(image_root, keys, output, config=config, **kwargs)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _floats(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive, got {text!r}")
    return values


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images (recursive)")
    src.add_argument("--data", type=Path, help="Met-format directory (database.json, queries.json, images/)")
    src.add_argument("--met", type=Path, help="root of the official Met dataset")
    p.add_argument("--mini", action="store_true", help="with --met: the mini database")
    p.add_argument("--split", choices=["database", "queries", "all"], default="all",
                   help="with --data/--met: which images (default all)")


def resolve_inputs(args) -> Tuple[Path, List[str], List[str]]:
    """(image_root, keys to extract, database keys) from --images / --data / --met."""
    if args.images is not None:
        keys = list_images(args.images)
        return args.images, keys, keys
    from . import datasets
    ds = datasets.load_directory(args.data) if args.data is not None else \
        datasets.load_met(args.met, mini=args.mini)
    keys = {"database": ds.db_keys, "queries": ds.query_keys,
            "all": list(ds.db_keys) + list(ds.query_keys)}[args.split]
    return ds.image_root, keys, list(ds.db_keys)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, choices=sorted(CONFIGS),
                   help=f"named extraction config (default {DEFAULT_CONFIG})")
    p.add_argument("--checkpoint", help="HOW checkpoint or how-met model file (path or URL)")
    p.add_argument("--backbone", help="override the config's backbone")
    p.add_argument("--layer", help="trunk layer for local features (e.g. blocks.11.expand, head)")
    p.add_argument("--scales", type=_floats, help="comma-separated scales, e.g. 1,0.707,0.5")
    p.add_argument("--features-num", type=int, help="local features kept per image")
    p.add_argument("--image-size", type=int, help="shrink images so the longer side is <= this")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (same size only)")
    p.add_argument("--workers", type=int, help="image decoding processes (default: 0 on <= 2 free cores)")


def config_from_args(args, base: Optional[dict] = None) -> dict:
    """The extraction config: ``--config`` (else ``base``, else the default) with the
    command line's overrides applied."""
    config = _resolve_config(args.config) if args.config or base is None else copy.deepcopy(base)
    for name in ("scales", "features_num", "image_size"):
        if getattr(args, name, None) is not None:
            config[name] = getattr(args, name)
    if getattr(args, "backbone", None):
        config["model"]["backbone"] = args.backbone
    if getattr(args, "layer", None):
        config["model"]["layer"] = args.layer
    return config


def model_from_args(args, config: dict) -> HOWNet:
    if args.checkpoint:
        return load_model(args.checkpoint, args.device)
    return build_model(**config["model"], device=args.device)


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    p.add_argument("--output", "-o", type=Path, required=True, help="HDF5 feature store to write/extend")
    add_model_arguments(p)
    p.add_argument("--float16", action="store_true", help="store descriptors as float16")
    p.add_argument("--skip-bad", action="store_true", help="log unreadable images and go on")
    p.add_argument("--shard", help="i/n: extract only every n-th image starting at i")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--save-model", type=Path,
                   help="where to save the model once its whitening is learned (reuse with --checkpoint)")


def run_cli(args) -> int:
    config = config_from_args(args)
    image_root, keys, db_keys = resolve_inputs(args)
    model = model_from_args(args, config)
    stats = extract_to_store(image_root, keys, args.output, config=config, model=model,
                             device=args.device, batch_size=args.batch_size, workers=args.workers,
                             skip_bad=args.skip_bad, float16=args.float16,
                             shard=parse_shard(args.shard), whiten_keys=db_keys,
                             model_out=args.save_model, autocast=args.bf16)
    print(json.dumps(stats))
    return 0


def configure_merge_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", type=Path, help="merged store to write")
    p.add_argument("inputs", type=Path, nargs="+", help="shard stores")
    p.add_argument("--overwrite", action="store_true")


def run_merge_cli(args) -> int:
    n = merge_stores(args.inputs, args.output, overwrite=args.overwrite)
    print(f"merged {n} images into {args.output}")
    return 0


def configure_whiten_parser(p: argparse.ArgumentParser) -> None:
    add_input_arguments(p)
    add_model_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="model file to write (use with --checkpoint)")
    p.add_argument("--num-images", type=int, default=WHITEN_IMAGES)


def run_whiten_cli(args) -> int:
    configure_threads()
    config = config_from_args(args)
    image_root, keys, db_keys = resolve_inputs(args)
    model = model_from_args(args, config)
    learn_whitening(model, image_root, db_keys if args.split == "all" else keys, config,
                    num_images=args.num_images, batch_size=args.batch_size, workers=args.workers)
    save_model(model, args.out)
    print(f"saved model with learned whitening to {args.out}")
    return 0
