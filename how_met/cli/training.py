"""The training command: train (HOW local descriptors for a collection)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..features import settings as feature_settings
from ..training.settings import TrainingSettings
from .options import NON_NEGATIVE, POSITIVE, Command

_DEFAULTS = TrainingSettings()
# option -> (TrainingSettings field, type, help)
_SETTINGS_OPTIONS = {
    "--epochs": ("epochs", POSITIVE, "epochs (a rerun with more continues the saved run)"),
    "--tuples": ("tuples_per_epoch", POSITIVE, "tuples (query, positive, negatives) per epoch"),
    "--pool": ("pool_size", POSITIVE, "images hard negatives are mined from, redrawn every epoch"),
    "--negatives": ("negatives", POSITIVE, "hard negatives per tuple"),
    "--tuples-per-step": ("tuples_per_step", POSITIVE, "tuples whose gradients make one Adam step (memory holds one tuple)"),
    "--lr": ("lr", float, "Adam learning rate"),
    "--weight-decay": ("weight_decay", float, "Adam weight decay"),
    "--lr-decay": ("lr_decay", float, "learning-rate factor per epoch"),
    "--margin": ("margin", float, "contrastive loss margin"),
    "--image-size": ("image_size", POSITIVE, "longer side of training images (default: the config's image size)"),
    "--val-images": ("val_images", NON_NEGATIVE, "training images held out as synthetic validation queries when the "
                                        "data has no validation split and no --val-data is given (0: none)"),
    "--seed": ("seed", NON_NEGATIVE, "seed of tuples, pools, augmentations and the validation hold-out"),
}


def _configure_train(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("training images (any combination, at least one)")
    src.add_argument("--data", type=Path, action="append",
                     help="Met-format directory: its database images train (classes with several images "
                          "give real pairs, every image a synthetic pair); repeatable")
    src.add_argument("--met", type=Path, help="root of the official Met dataset (its database trains, its val "
                                               "queries validate)")
    src.add_argument("--mini", action="store_true", help="with --met: the mini database")
    src.add_argument("--images", type=Path, action="append",
                     help="folder of unlabelled images (synthetic pairs only, e.g. ../shared/data/corpus); repeatable")
    src.add_argument("--skip-missing", action="store_true", help="skip listed images that are not on disk")
    src.add_argument("--skip-bad", action="store_true",
                     help="skip unreadable images (logged by name) instead of stopping")
    p.add_argument("--out", "-o", type=Path, required=True,
                   help="model file to write (the best epoch; state and history beside it)")
    p.add_argument("--val-data", type=Path, help="Met-format directory whose val (else all) queries choose the "
                                                 "best epoch; never one whose numbers you report")
    p.add_argument("--checkpoint", help="model to start from: how-met model file, HOW checkpoint or shipped model "
                                        f"name ({', '.join(feature_settings.SHIPPED_MODELS)}); default: the "
                                        "config's ImageNet backbone, whitening learned from the training images")
    p.add_argument("--config", default=feature_settings.DEFAULT_CONFIG, choices=sorted(feature_settings.CONFIGS),
                   help="extraction config (backbone, layer, image size, whitening)")
    p.add_argument("--backbone", choices=sorted(feature_settings.BACKBONES), metavar="NAME",
                   help=f"override the config's backbone: {', '.join(feature_settings.BACKBONES)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast of the trunk (default: on with CUDA)")
    p.add_argument("--official", type=Path, metavar="PATH",
                   help="also write the best model in the official HOW checkpoint layout (ResNet backbones)")
    recipe = p.add_argument_group("recipe (defaults: HOW ECCV'20)")
    for option, (field, kind, text) in _SETTINGS_OPTIONS.items():
        recipe.add_argument(option, dest=field, type=kind, default=getattr(_DEFAULTS, field), help=text)


def _run_train(args) -> int:
    from .. import datasets
    from ..features.checkpoints import build_model, load_model
    from ..training.data import training_images
    from ..training.trainer import train_model
    from ..training.validation import dataset_validation
    from ..utils import configure_threads
    configure_threads()
    if not (args.data or args.met or args.images):
        raise ValueError("give training images: --data DIR, --met ROOT and/or --images DIR")
    labelled = [datasets.load_directory(d, skip_missing=args.skip_missing) for d in args.data or ()]
    if args.met is not None:
        labelled.append(datasets.load_met(args.met, mini=args.mini, skip_missing=args.skip_missing))
    images = training_images(labelled, args.images or ())
    validation = None
    if args.val_data is not None:
        validation = dataset_validation(datasets.load_dataset(args.val_data, skip_missing=args.skip_missing))
    else:
        with_split = [ds for ds in labelled if "val" in ds.query_splits]
        validation = dataset_validation(with_split[0]) if with_split else None
    config = feature_settings.resolve_config(args.config)
    if args.backbone:
        config["model"] = {**config["model"], "backbone": args.backbone, "layer": None}
    model = load_model(args.checkpoint, args.device) if args.checkpoint else \
        build_model(**config["model"], device=args.device)
    settings = TrainingSettings(**{field: getattr(args, field) for field, _, _ in _SETTINGS_OPTIONS.values()})
    result = train_model(images, args.out, settings, model=model, config=config, validation=validation,
                         device=args.device, autocast=args.bf16, official_out=args.official,
                         skip_bad=args.skip_bad)
    printed = {k: result[k] for k in ("out", "best_epoch", "best_val_GAP")}
    print(json.dumps({**printed, "skipped_images": len(result["skipped_images"])}))
    return 0


COMMANDS = {
    "train": Command(
        "train HOW local descriptors on a collection (contrastive tuples, hard negatives, resumable)",
        "how-met train --data my-museum --images ../shared/data/corpus --out my-model.pt --epochs 5\n"
        "how-met evaluate --data my-museum --work eval --checkpoint my-model.pt",
        _configure_train, _run_train),
}
