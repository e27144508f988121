"""``train_model``: HOW local descriptors trained on a collection's images, resumable by epoch.

One epoch (SPEC section 2, the ECCV'20 recipe): draw ``tuples_per_epoch`` positive pairs
(``TrainingImages.positive_pairs``) and a pool of ``pool_size`` images; describe the pool and the
queries with the current model and take each query's ``negatives`` hardest pool images of other
classes; then per tuple the contrastive loss on the attention-weighted global descriptor
(``objective``), its gradient summed over ``tuples_per_step`` tuples per Adam step. Only one
tuple's activations are alive at a time, so memory does not grow with the step size. The
reduction layer (the PCA-whitening, learned first) and every BatchNorm (kept in eval mode: no
statistics update) are frozen; the trunk trains at scale 1; the learning rate decays by
``lr_decay`` per epoch.

Files beside ``out`` (all written atomically; loaded with ``torch.load(weights_only=True)``):

- ``out``: the model of the best epoch by validation GAP (the epoch-0 model, before any
  training, counts too), a how-met model file that every ``--checkpoint`` takes;
- ``<out stem>.training.pt``: the state after the last finished epoch (weights, Adam's moments,
  history), which a rerun of the same command continues from (also with more epochs);
- ``<out stem>.training.json``: per epoch loss, validation GAP, learning rate and timings.

Every epoch draws its tuples, pool and augmentations from streams seeded by (seed, epoch), so a
resumed run trains on what an uninterrupted one would.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from ..features.checkpoints import (build_model, check_official_layout, load_model, model_from_payload,
                                    model_payload, save_model, save_official, write_checkpoint)
from ..features.extract import learn_whitening
from ..features.network import HOWNet, ModelConfig, model_fingerprint
from ..features.settings import resolve_config
from ..utils import configure_threads, progress, write_json
from .data import BadImages, TrainingImages
from .objective import contrastive_loss, describe, hard_negatives, pooled_descriptor
from .settings import TrainingSettings
from .validation import ValidationSet, synthetic_validation, validation_gap

logger = logging.getLogger(__name__)

STATE_FORMAT = "how-met-training/1"


def training_files(out: os.PathLike) -> Tuple[Path, Path]:
    """(training state, history) of the run that writes the model ``out``."""
    out = Path(out)
    return out.with_name(out.stem + ".training.pt"), out.with_name(out.stem + ".training.json")


def _prepare(model: HOWNet, settings: TrainingSettings) -> torch.optim.Adam:
    """Freeze the reduction layer; BatchNorm stays in eval mode (the model is never put in
    training mode); Adam over the trunk (parameters that get no gradient are left alone)."""
    model.eval()
    for parameter in model.dim_reduction.parameters():
        parameter.requires_grad_(False)
    return torch.optim.Adam(model.trunk.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def _epoch_draw(images: TrainingImages, pairs: np.ndarray, settings: TrainingSettings, epoch: int):
    """The epoch's (query, positive) pairs and negative pool, from the stream of (seed, epoch)."""
    rng = np.random.default_rng([settings.seed, epoch])
    chosen = pairs[rng.choice(len(pairs), min(settings.tuples_per_epoch, len(pairs)), replace=False)]
    pool = np.sort(rng.choice(len(images), min(settings.pool_size, len(images)), replace=False))
    return chosen, pool


def _train_epoch(model: HOWNet, optimizer, images: TrainingImages, pairs: np.ndarray,
                 settings: TrainingSettings, epoch: int, image_size: int, autocast: bool, epochs: int,
                 bad: BadImages) -> dict:
    chosen, pool = _epoch_draw(images, pairs, settings, epoch)
    started = time.perf_counter()
    pool_keys = [images.keys[i] for i in pool]
    pool_desc = describe(model, images.root, pool_keys, image_size, autocast,
                         desc=f"epoch {epoch}: negative pool", bad=bad)
    readable = bad.kept(pool_keys)  # an unreadable image is no negative
    pool, pool_desc = pool[readable], pool_desc[readable]
    query_desc = describe(model, images.root, [images.keys[i] for i in chosen[:, 0]], image_size, autocast,
                          desc=f"epoch {epoch}: queries", bad=bad)
    negatives = hard_negatives(query_desc, images.labels[chosen[:, 0]], pool_desc, images.labels[pool],
                               settings.negatives)
    mining_s = time.perf_counter() - started
    for group in optimizer.param_groups:
        group["lr"] = settings.lr * settings.lr_decay ** (epoch - 1)
    started, cpu_started = time.perf_counter(), time.process_time()
    losses, pending, skipped = [], 0, 0
    bar = progress(total=len(chosen), desc=f"epoch {epoch}/{epochs}", unit="tuple")
    optimizer.zero_grad(set_to_none=True)
    for t, ((query, positive), negative_rows) in enumerate(zip(chosen, negatives)):
        synthetic = query == positive  # two augmentations of one image
        seeds = ((settings.seed, epoch, t, 0), (settings.seed, epoch, t, 1)) if synthetic else (None, None)
        pair = [bad.load(images.root, images.keys[query], image_size, seeds[0]),
                bad.load(images.root, images.keys[positive], image_size, seeds[1])]
        if pair[0] is None or pair[1] is None:  # only when skipping unreadable images
            skipped += 1
            bar.update(1)
            continue
        tuple_images = pair + [bad.load(images.root, images.keys[pool[j]], image_size) for j in negative_rows if j >= 0]
        descriptors = torch.stack([pooled_descriptor(model, pixels, autocast)
                                   for pixels in tuple_images if pixels is not None])
        loss = contrastive_loss(descriptors[0], descriptors[1], descriptors[2:], settings.margin)
        loss.backward()
        losses.append(float(loss.detach()))
        pending += 1
        if pending == settings.tuples_per_step or t + 1 == len(chosen):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pending = 0
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}")
    bar.close()
    if pending:  # the epoch's last tuples were skipped: their step still counts
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not losses:
        raise ValueError(f"epoch {epoch}: none of its {len(chosen)} tuples has a readable query and positive")
    training_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    # CPU seconds besides wall seconds: on a shared machine the wall time says more about the load
    return {"loss": float(np.mean(losses)), "tuples": len(losses), "skipped_tuples": skipped,
            "lr": optimizer.param_groups[0]["lr"],
            "real_pairs": int(np.count_nonzero(chosen[:, 0] != chosen[:, 1])), "mining_s": mining_s,
            "training_s": training_s, "s_per_tuple": training_s / len(losses),
            "cpu_s_per_tuple": cpu_s / len(losses)}


def _identity(settings: TrainingSettings, images: TrainingImages, validation: Optional[ValidationSet],
              model_config: ModelConfig, image_size: int) -> str:
    return json.dumps({"settings": settings.run_identity(), "images": images.digest(),
                       "validation": None if validation is None else validation.digest(),
                       "model": {k: v for k, v in asdict(model_config).items() if k != "checkpoint"},
                       "image_size": image_size}, sort_keys=True)


def _save_state(path: Path, model: HOWNet, optimizer, epoch: int, identity: str, start_fingerprint: str,
                history: list, best: dict) -> None:
    write_checkpoint({"format": STATE_FORMAT, "identity": identity, "start_fingerprint": start_fingerprint,
                      "epoch": epoch, "model": model_payload(model), "optimizer": optimizer.state_dict(),
                      "history": json.dumps(history), "best": json.dumps(best)}, path)


def _load_state(path: Path, identity: Optional[str], model: Optional[HOWNet], device: str) -> dict:
    """The saved state of this run (refusing one of another run; ``identity`` None: of any run)
    with its model rebuilt."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise RuntimeError(f"{path}: not a loadable training state ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise RuntimeError(f"{path}: not a how-met training state")
    if identity is not None and state["identity"] != identity:
        raise ValueError(f"{path}: a training state of another run (other settings, images, validation or "
                         f"model); remove it or write the model elsewhere (--out)")
    if model is not None and model.has_whitening and model_fingerprint(model) != state["start_fingerprint"]:
        raise ValueError(f"{path}: that run started from another model than the one given")
    state["model"] = model_from_payload(state["model"], path, device)
    return state


def last_epoch_model(out: os.PathLike, device: str = "cpu") -> Tuple[HOWNet, int]:
    """(model, epoch) of the last finished epoch of the run that writes ``out``, from its training
    state -- what to evaluate when the validation kept an earlier epoch in ``out``."""
    state_path = training_files(out)[0]
    if not state_path.exists():
        raise FileNotFoundError(f"{state_path}: no training state beside {out}")
    state = _load_state(state_path, None, None, device)
    return state["model"], int(state["epoch"])


def train_model(images: TrainingImages, out: os.PathLike, settings: Optional[TrainingSettings] = None,
                model: Optional[HOWNet] = None, config=None, validation: Optional[ValidationSet] = None,
                device: str = "cpu", autocast: Optional[bool] = None, official_out: Optional[os.PathLike] = None,
                skip_bad: bool = False) -> dict:
    """Train HOW local descriptors on ``images`` and write the best model to ``out``.

    ``model``: where to start (default: built from the extraction ``config``, ImageNet weights);
    a model without PCA-whitening learns it first from the training images, and it stays frozen.
    ``validation``: the queries that choose the best epoch; default: ``settings.val_images``
    images held out as a synthetic validation set (``validation.synthetic_validation``), none
    when that is 0 (then ``out`` is the last epoch's model). ``autocast``: bfloat16 trunk on
    CUDA (default: on for CUDA). ``official_out``: also write the best model in the official
    HOW layout (ResNet backbones). ``skip_bad``: an unreadable image is logged and left out
    (``BadImages``) instead of stopping the run. A rerun with the same arguments continues after
    the last finished epoch. Returns {"history", "best_epoch", "best_val_GAP", "out",
    "skipped_images"} (the keys found unreadable).
    """
    settings = (settings or TrainingSettings()).check()
    config = resolve_config(config)
    out = Path(out)
    state_path, history_path = training_files(out)
    autocast = (torch.device(device).type == "cuda") if autocast is None else autocast
    image_size = settings.image_size or int(config["image_size"])
    bad = BadImages(skip_bad)
    configure_threads()
    if validation is None and settings.val_images:
        validation, images = synthetic_validation(images, settings.val_images, settings.seed)
    pairs = images.positive_pairs()
    if len(np.unique(images.labels)) <= settings.negatives:
        raise ValueError(f"{len(np.unique(images.labels))} training classes cannot give {settings.negatives} "
                         f"negatives of other classes than the query's: give more images or fewer negatives")
    model_config = model.config if model is not None else ModelConfig(**config["model"]).resolved()
    if official_out is not None:
        check_official_layout(model_config.backbone)
    identity = _identity(settings, images, validation, model_config, image_size)

    if state_path.exists():
        state = _load_state(state_path, identity, model, device)
        model, epoch_done, start_fingerprint = state["model"], int(state["epoch"]), state["start_fingerprint"]
        optimizer = _prepare(model, settings)
        optimizer.load_state_dict(state["optimizer"])
        history, best = json.loads(state["history"]), json.loads(state["best"])
        logger.info("%s: resuming after epoch %d of %d", state_path, epoch_done, settings.epochs)
    else:
        model = (model or build_model(**config["model"])).to(device)
        if not model.has_whitening:
            learn_whitening(model, images.root, images.keys, config, skip_bad=skip_bad)
        start_fingerprint = model_fingerprint(model)
        optimizer = _prepare(model, settings)
        epoch_done, history = 0, [{"epoch": 0}]
        if validation is not None:
            history[0]["val_GAP"] = validation_gap(model, validation, image_size, autocast, bad)
        best = {"epoch": 0, "val_GAP": history[0].get("val_GAP")}
        save_model(model, out)
        _save_state(state_path, model, optimizer, 0, identity, start_fingerprint, history, best)
        write_json(history_path, {"validation": validation and validation.description, "epochs": history})

    for epoch in range(epoch_done + 1, settings.epochs + 1):
        record = {"epoch": epoch, **_train_epoch(model, optimizer, images, pairs, settings, epoch, image_size,
                                                  autocast, settings.epochs, bad)}
        if validation is not None:
            started = time.perf_counter()
            record["val_GAP"] = validation_gap(model, validation, image_size, autocast, bad)
            record["validation_s"] = time.perf_counter() - started
        history.append(record)
        if validation is None or record["val_GAP"] > best["val_GAP"]:
            best = {"epoch": epoch, "val_GAP": record.get("val_GAP")}
            save_model(model, out)
        validated = f", validation GAP {record['val_GAP']:.1f} (best: epoch {best['epoch']})" if validation else ""
        logger.info("epoch %d: loss %.4f, %.2f s/tuple (%.2f CPU s)%s", epoch, record["loss"],
                    record["s_per_tuple"], record["cpu_s_per_tuple"], validated)
        _save_state(state_path, model, optimizer, epoch, identity, start_fingerprint, history, best)
        write_json(history_path, {"validation": validation and validation.description, "epochs": history})
    if official_out is not None:
        save_official(load_model(str(out)), official_out)
    return {"history": history, "best_epoch": best["epoch"], "best_val_GAP": best["val_GAP"], "out": str(out),
            "skipped_images": sorted(bad.keys)}
