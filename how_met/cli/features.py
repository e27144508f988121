"""Commands of the features stage: extract, merge, whiten."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..features import settings as feature_settings
from ..utils import configure_threads
from .options import (POSITIVE, Command, add_input_options, add_model_options, add_ray_option,
                      extraction_config, inputs, model_from_args, shard)


def _configure_extract(p: argparse.ArgumentParser) -> None:
    add_input_options(p)
    p.add_argument("--out", "--output", "-o", dest="out", type=Path, required=True,
                   help="HDF5 feature store to write/extend")
    add_model_options(p)
    p.add_argument("--float16", action="store_true", help="store descriptors as float16")
    p.add_argument("--skip-bad", action="store_true", help="log unreadable images and go on")
    p.add_argument("--shard", help="i/n: extract only every n-th image starting at i")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--save-model", type=Path,
                   help="where to save the model (default: OUT's name with .model.pt, beside it)")
    p.add_argument("--like", type=Path, metavar="STORE",
                   help="extract with the model and settings of this feature store (e.g. queries "
                        "--like the database's store, so that they can be searched against it)")
    add_ray_option(p)


def _run_extract(args) -> int:
    from ..features.extract import extract_to_store
    image_root, keys, db_keys = inputs(args)
    if args.like is not None:
        model, config = None, None
    else:
        config = extraction_config(args)
        model = model_from_args(args, config)
    stats = extract_to_store(image_root, keys, args.out, config=config, model=model, like=args.like,
                             device=args.device, batch_size=args.batch_size, workers=args.workers,
                             skip_bad=args.skip_bad, float16=args.float16, shard=shard(args.shard),
                             whiten_keys=db_keys, model_out=args.save_model, autocast=args.bf16,
                             ray=args.ray)
    print(json.dumps(stats))
    return 0


def _configure_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, metavar="OUT", help="merged store to write")
    p.add_argument("inputs", type=Path, nargs="+", help="shard stores")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _run_merge(args) -> int:
    from ..features.store import merge_stores
    n = merge_stores(args.inputs, args.out, overwrite=args.overwrite)
    print(f"merged {n} images into {args.out}")
    return 0


def _configure_whiten(p: argparse.ArgumentParser) -> None:
    add_input_options(p)
    add_model_options(p)
    p.add_argument("--out", type=Path, required=True, help="model file to write (use with --checkpoint)")
    p.add_argument("--num-images", type=POSITIVE, default=feature_settings.WHITEN_IMAGES,
                   help="database images to learn the whitening from")


def _run_whiten(args) -> int:
    from ..features.checkpoints import save_model
    from ..features.extract import learn_whitening
    configure_threads()
    config = extraction_config(args)
    image_root, keys, db_keys = inputs(args)
    model = model_from_args(args, config)
    learn_whitening(model, image_root, db_keys if args.split == "all" else keys, config,
                    num_images=args.num_images, batch_size=args.batch_size, workers=args.workers)
    save_model(model, args.out)
    print(f"saved model with learned whitening to {args.out}")
    return 0


COMMANDS = {
    "extract": Command(
        "extract HOW local (and global) features into an HDF5 store",
        "how-met extract --data met --split database --out met/db.h5\n"
        "how-met extract --data met --split queries --out met/queries.h5 --like met/db.h5",
        _configure_extract, _run_extract),
    "merge": Command(
        "merge shard feature stores into one",
        "how-met merge met/db.h5 met/db-0.h5 met/db-1.h5 --overwrite",
        _configure_merge, _run_merge),
    "whiten": Command(
        "learn the PCA-whitening of the HOW reduction layer from images",
        "how-met whiten --data met --out met/model.pt",
        _configure_whiten, _run_whiten),
}
