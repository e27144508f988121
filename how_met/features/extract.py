"""Stage 1: images -> HOW local features (+ GeM global descriptor) in an HDF5 feature store.

``extract_to_store`` skips images already in the store, so an interrupted run resumes where it
stopped -- also after a kill, since the store journals every finished image (see
``how_met.features.store``); ``shard=(i, n)`` splits the work between workers and
``merge_stores`` joins their files. Decoding runs in DataLoader worker processes while the
network runs in the main process.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .backbones import BACKBONES
from .checkpoints import build_model, load_model, save_model
from .settings import (DEFAULT_RESIZE_RULE, WHITEN_FEATURES, WHITEN_IMAGES, check_extraction_config, check_model,
                       resolve_config, store_config)
from .images import ImageError, image_array, image_file, load_image
from .network import HOWNet, model_fingerprint
from .store import FeatureStore, LocalFeatures, open_store
from .whitening import whitening_from_moments
from ..utils import configure_threads, configured_threads, free_cores, progress

logger = logging.getLogger(__name__)

REUSE_RAW_MAX_IMAGES = 1500  # keep un-reduced features of at most this many images in memory


# ---------------------------------------------------------------------------------------------
# Data loading
# ---------------------------------------------------------------------------------------------


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, image_root: Path, keys: Sequence[str], image_size: int, loading: str):
        self.image_root, self.keys, self.image_size, self.loading = image_root, list(keys), image_size, loading

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        key = self.keys[i]
        try:
            arr, original = load_image(image_file(self.image_root, key), self.image_size, self.loading)
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


def _iter_decoded(image_root: Path, keys: Sequence[str], config: dict, workers: int):
    dataset = _ImageDataset(image_root, keys, config["image_size"], config.get("image_loading", "how-met"))
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


@contextlib.contextmanager
def one_thread_per_image():
    """torch intra-op parallelism off: images run in parallel instead (``_ordered_map``).

    Multi-threaded kernels (oneDNN/MKL convolutions, reductions) split sums differently for
    other thread counts, so the trunk's output moved by ~1e-6 between 1 and 2 threads -- noise
    that whitening, top-k selection and k-means amplified into GAP swings of several points.
    One thread per image gives the same bytes on any thread count (and, on a loaded machine,
    avoids OpenMP threads waiting for each other).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _ordered_map(fn, items, threads: int):
    """``fn(item)`` for every item on ``threads`` worker threads, results in input order (a
    bounded number in flight)."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _extract_batches(model: HOWNet, image_root: Path, keys: Sequence[str], config: dict,
                     batch_size: int, workers: int, skip_bad: bool, reduce: bool,
                     features_num: Optional[int] = None, desc: str = "extract",
                     autocast: bool = False, skipped: Optional[List[str]] = None):
    """Yield (key, LocalFeatures) for every readable image in ``keys`` order; bad ones raise or
    are logged (and their messages appended to ``skipped``). Batches run on
    ``configured_threads()`` threads of one torch thread each."""
    decoded = (item for item in _iter_decoded(image_root, keys, config, workers)
               if _check_decoded(item, skip_bad, skipped))
    threads = (configured_threads() or 1) if model.device.type == "cpu" else 1

    def run(batch):
        images = torch.stack([item[1] for item in batch])
        ctx = (torch.autocast(model.device.type, dtype=torch.bfloat16) if autocast
               else torch.autocast(model.device.type, enabled=False))
        with ctx:  # autocast state is per thread: entered here, in the worker
            return batch, _extract_with_config(model, images, config, features_num, reduce)

    bar = progress(total=len(keys), desc=desc, unit="img")
    try:
        with one_thread_per_image():
            for batch, outs in _ordered_map(run, _batches(decoded, batch_size), threads):
                for (key, tensor, original, _), out in zip(batch, outs):
                    input_size = (int(tensor.shape[2]), int(tensor.shape[1]))
                    yield key, _to_local_features(out, original, input_size, config.get("gem", True))
                bar.update(len(batch))
    finally:
        bar.close()


def inference_copy(model: HOWNet) -> HOWNet:
    """BatchNorm folded (and channels_last for ResNets on CPU): same outputs, faster.

    Measured on 2 cores (eval/bench_extract.py setting): Lite0 4.91 -> 5.38 images/s from
    folding, and 5.09 with channels_last (depthwise convolutions prefer NCHW); ResNet18
    2.20 -> 2.64 with channels_last.
    """
    runner = model.fused()
    if runner.device.type == "cpu" and BACKBONES[runner.config.backbone][0] == "resnet":
        runner.to(memory_format=torch.channels_last)
    return runner


def _extract_with_config(model: HOWNet, images: torch.Tensor, config: dict,
                         features_num: Optional[int] = None, reduce: bool = True):
    """``model.extract`` with every setting of an extraction config: the one call of the store
    path and the one-photo path (identify, query --images), so that they cannot drift apart --
    the one-photo path once ignored the upscale limit and extracted other features than evaluate."""
    upscale_limit = (config["image_size"] or None) if config.get("upscale_to_image_size") else None
    return model.extract(images, config["scales"], features_num or config["features_num"],
                         gem=config.get("gem", True), reduce=reduce,
                         resize_rule=config.get("resize_rule", DEFAULT_RESIZE_RULE), upscale_limit=upscale_limit)


def extract_image(model: HOWNet, image, config=None) -> LocalFeatures:
    """The features of one image -- a path, a PIL image or an (H, W, 3) uint8 RGB array -- as
    ``extract_to_store`` computes them (pass ``inference_copy(model)`` for speed)."""
    config = resolve_config(config)
    if isinstance(image, (str, os.PathLike)):
        pixels, original = load_image(image, config["image_size"], config.get("image_loading", "how-met"))
    else:
        pixels, original = image_array(image, config["image_size"])
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    out = _extract_with_config(model, tensor[None], config)[0]
    return _to_local_features(out, original, (int(tensor.shape[2]), int(tensor.shape[1])), config.get("gem", True))


def default_workers() -> int:
    """Decoding processes: none when the network's threads already take every free core (a
    worker then only competes with them: Lite0 5.38 -> 4.69 images/s on 2 cores)."""
    cores = free_cores()
    return 0 if cores <= 2 else min(4, cores // 4 + 1)


def _check_decoded(item, skip_bad: bool, skipped: Optional[List[str]] = None) -> bool:
    key, tensor, _, error = item
    if error is None:
        return True
    if not skip_bad:
        raise ImageError(error + " (use --skip-bad to continue past bad images)")
    logger.warning("skipping %s", error)
    if skipped is not None:
        skipped.append(error)
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
    config = resolve_config(config)
    workers = default_workers() if workers is None else workers
    sample = _sample_keys(keys, num_images, seed)
    sums = None
    raw: Dict[str, LocalFeatures] = {}
    count = 0
    for key, feats in _extract_batches(inference_copy(model), Path(image_root), sample, config, batch_size,
                                       workers, skip_bad, reduce=False, desc="whitening"):
        # float16, as HOWNet.project rounds its input: learned from what it will be applied to
        feats.descriptors = feats.descriptors.astype(np.float16)
        # Learn from at most features_per_image of the strongest features (already sorted).
        desc = feats.descriptors[:features_per_image].astype(np.float64)
        if sums is None:
            sums = [np.zeros(desc.shape[1]), np.zeros((desc.shape[1], desc.shape[1]))]
        sums[0] += desc.sum(axis=0)
        sums[1] += desc.T @ desc
        count += len(desc)
        if keep_raw:
            raw[key] = feats
    if count < model.config.dim + 1:
        raise RuntimeError(f"only {count} local features to learn a {model.config.dim}-D "
                           f"whitening from: give more images")
    mean = sums[0] / count
    cov = (sums[1] - count * np.outer(mean, mean)) / (count - 1)
    mean, projection = whitening_from_moments(mean, cov, count, model.config.dim)
    with one_thread_per_image():  # the bias is a matrix product: the same bytes on any thread count
        model.set_whitening(mean, projection)
    logger.info("learned PCA-whitening from %d features of %d images", count, len(sample))
    return raw if keep_raw else None


def _project(model: HOWNet, feats: LocalFeatures) -> LocalFeatures:
    """Whitened descriptors of features kept un-reduced by ``learn_whitening`` (the same
    ``HOWNet.project`` as the network path, on one thread, so the bytes are the same)."""
    with one_thread_per_image(), torch.no_grad():
        raw = torch.from_numpy(np.ascontiguousarray(feats.descriptors)).to(model.device)
        feats.descriptors = model.project(raw).float().cpu().numpy()
    return feats


# ---------------------------------------------------------------------------------------------
# Extraction into a store
# ---------------------------------------------------------------------------------------------


def default_model_path(store_path) -> Path:
    """Where extraction saves the model of a store that names no model file: beside it."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.stem + ".model.pt")


def extraction_config_of(recorded: dict) -> dict:
    """The extraction config (as ``extract_to_store`` takes it) a store's record describes."""
    model = recorded.get("model") or {}
    return resolve_config({"model": {k: model.get(k) for k in ("backbone", "layer", "dim")},
                           **{k: recorded[k] for k in ("scales", "features_num", "image_size", "gem")
                              if k in recorded}})


def model_of_store(store_path, device: str = "cpu") -> Tuple[HOWNet, dict, Path]:
    """(model, extraction config, model file) that made the descriptors of a feature store:
    what to extract queries with so that they can be compared with that store."""
    store, owned = open_store(store_path)
    try:
        model_file, fingerprint, recorded = store.model_file, store.model_fingerprint, store.config
        store_path = store.path
    finally:
        if owned:
            store.close()
    if model_file is None:
        raise FileNotFoundError(f"{store_path}: records no model file (written by an older how-met); "
                                f"pass the model it was extracted with as the checkpoint instead")
    if not model_file.is_file():
        raise FileNotFoundError(f"{store_path}: its model file {model_file} is missing")
    model = load_model(str(model_file), device)
    check_model(model_fingerprint(model), fingerprint, model_file, store_path)
    return model, extraction_config_of(recorded), model_file


def _ray_cluster(ray):
    """The ``ray=`` argument as a ``RayExtraction``, or None to run in this process."""
    if ray is None or ray is False:
        return None
    from .distributed import ray_extraction
    return ray_extraction(ray)


def extract_to_store(image_root, keys: Sequence[str], out, config=None,
                     model: Optional[HOWNet] = None, device: str = "cpu", batch_size: int = 1,
                     workers: Optional[int] = None, skip_bad: bool = False, float16: bool = False,
                     shard: Optional[Tuple[int, int]] = None, whiten_keys: Optional[Sequence[str]] = None,
                     model_out=None, autocast: bool = False, flush_every: int = 50, like=None,
                     ray=None) -> dict:
    """Extract features of ``keys`` (paths relative to ``image_root``) into ``out``.

    ``like``: a feature store (path) whose model and extraction settings to use -- how query
    images are extracted so that they can be searched against that database. Otherwise
    ``model`` (default: built from ``config``); when it has no PCA-whitening yet, the whitening
    is learned first from ``whiten_keys`` (default: ``keys``) and the features computed for it
    are reused. Images already in the store (or in the journal of an interrupted run) are skipped
    (resume; a store that records its model resumes with it). The store records the model's
    fingerprint and its file: ``model_out``, else the model ``like`` names, else ``<out
    stem>.model.pt`` beside the store. ``flush_every``: images between syncs of the journal to
    disk (a killed process loses nothing either way; this bounds what a power cut loses).
    ``ray``: run the network on a Ray cluster instead (``how_met.features.distributed``): True
    for a local Ray instance sized to the free cores, a cluster address ("auto",
    "ray://head:10001"), or a ``RayExtraction``; the same features, written by this process.
    Returns stats (counts, seconds, images/s).
    """
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root}: image root is not a directory")
    if workers is None:
        workers = default_workers()
    keys = sorted(dict.fromkeys(keys))
    if shard is not None:
        keys = keys[shard[0]::shard[1]]
    cluster = _ray_cluster(ray)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if cluster is not None:
            stack.enter_context(cluster.session())
        store = stack.enter_context(FeatureStore(out, "a"))
        # on a cluster the model stays on this machine's CPU; the workers move it to ``device``
        model, config, model_file = _extraction_model(store, config, model, like,
                                                      device if cluster is None else "cpu")
        todo = [k for k in keys if k not in store]
        raw: Dict[str, LocalFeatures] = {}
        learned = bool(todo) and not model.has_whitening
        if learned:
            sample_from = list(whiten_keys) if whiten_keys is not None else keys
            if cluster is not None:
                cluster.learn_whitening(model, image_root, sample_from, config, batch_size, device)
            else:
                reuse = min(len(sample_from), WHITEN_IMAGES) <= REUSE_RAW_MAX_IMAGES
                raw = learn_whitening(model, image_root, sample_from, config, batch_size=batch_size,
                                      workers=workers, skip_bad=True, keep_raw=reuse) or {}
        if model.has_whitening:
            _record_model(store, model, config, out, model_out, model_file, learned)
        if cluster is not None:
            done = cluster.write_features(store, model, image_root, todo, config, batch_size, skip_bad,
                                          float16, autocast, flush_every, device)
        else:
            done = _write_features(store, model, image_root, todo, raw, config, batch_size, workers,
                                   skip_bad, float16, autocast, flush_every)
    seconds = time.perf_counter() - started
    skipped = len(keys) - len(todo)
    stats = {"extracted": done, "skipped_existing": skipped, "seconds": seconds,
             "images_per_s": done / seconds if done and seconds > 0 else None}
    logger.info("extracted %d images (%d already stored) in %.1fs", done, skipped, seconds)
    return stats


def iter_features(image_root, keys: Sequence[str], like, device: str = "cpu", batch_size: int = 1,
                  workers: Optional[int] = None, skip_bad: bool = False, autocast: bool = False,
                  ray=None):
    """Yield (key, LocalFeatures) for ``keys`` (paths relative to ``image_root``), extracted with
    the model and settings of the feature store ``like`` exactly as ``extract_to_store(...,
    like=like)`` computes them, without writing a store: what streams a large database
    straight into its index (``how_met.asmk.indexing.records_from_images``). In ``keys`` order;
    with ``ray`` (as ``extract_to_store`` takes it) the network runs on a Ray cluster and the
    images come unit by unit as the workers finish them."""
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise FileNotFoundError(f"{image_root}: image root is not a directory")
    cluster = _ray_cluster(ray)
    # on a cluster the model stays on this machine's CPU; the workers move it to ``device``
    model, config, _ = model_of_store(like, device if cluster is None else "cpu")
    config = check_extraction_config(resolve_config(config))
    configure_threads()
    keys = list(keys)
    if cluster is not None:
        with cluster.session(), contextlib.closing(cluster.iter_features(
                model, image_root, keys, config, batch_size, skip_bad, autocast, device)) as features:
            yield from features
        return
    workers = default_workers() if workers is None else workers
    runner = inference_copy(model.to(device).eval())
    yield from _extract_batches(runner, image_root, keys, config, batch_size, workers, skip_bad,
                                reduce=True, autocast=autocast)


def _extraction_model(store: FeatureStore, config, model: Optional[HOWNet], like, device: str
                      ) -> Tuple[HOWNet, dict, Optional[Path]]:
    """(model, config, its file or None) an extraction into ``store`` (open for writing) runs
    with: the model of the store ``like``; else, resuming a store (or its journal) that records
    its model, that model; else ``model`` (default: built from ``config``)."""
    model_file = None
    if like is not None:
        if model is not None or config is not None:
            raise ValueError("extract_to_store: give like= or model/config, not both")
        model, config, model_file = model_of_store(like, device)
    config = check_extraction_config(resolve_config(config))
    configure_threads()
    if (model is None or not model.has_whitening) and like is None and len(store) and \
            store.model_file is not None and store.model_file.is_file():
        model, _, model_file = model_of_store(store, device)  # resume with the stored model
    if model is None:
        model = build_model(**config["model"], device=device)
    return model.to(device).eval(), config, model_file


def _record_model(store: FeatureStore, model: HOWNet, config: dict, out, model_out, model_file,
                  learned: bool) -> None:
    """Record in the store the extractor config, the model's fingerprint and its file:
    ``model_out``, else the file the model came from, else the store's or ``default_model_path``
    (saved there when the whitening was just learned or the file does not exist yet)."""
    store.set_config(store_config(model, config))
    store.set_model_fingerprint(model_fingerprint(model))
    if model_out is not None or model_file is None:
        model_file = Path(model_out) if model_out is not None else (store.model_file or default_model_path(out))
        if learned or not model_file.exists():
            save_model(model, model_file)
    store.set_model_file(model_file)


def _write_features(store: FeatureStore, model: HOWNet, image_root: Path, todo: Sequence[str],
                    raw: Dict[str, LocalFeatures], config: dict, batch_size: int, workers: int,
                    skip_bad: bool, float16: bool, autocast: bool, flush_every: int) -> int:
    """Write the features of ``todo`` into the store: those in ``raw`` (un-reduced, computed
    while learning the whitening) projected, the others run through the network. Returns the
    number of images written."""
    done = 0
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
    runner = inference_copy(model) if todo else model
    for key, feats in _extract_batches(runner, image_root, remaining, config, batch_size,
                                       workers, skip_bad, reduce=True, autocast=autocast):
        store.write(key, feats, float16=float16)
        done += 1
        if done % flush_every == 0:
            store.flush()
    return done
