"""Option groups several commands share, and the parsing of their values."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Tuple

from ..features import settings as feature_settings


class Command(NamedTuple):
    """One ``how-met`` subcommand: its help line, an example for ``--help``, and its two halves."""
    help: str
    example: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def floats(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive finite numbers, got {text!r}")
    return values


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (counts, sizes; 0 or -1 used to slip through
    to a traceback deep inside numpy or to mean "the default" silently)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


POSITIVE, NON_NEGATIVE = at_least(1), at_least(0)


def shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def add_input_options(p: argparse.ArgumentParser, split_default: str = "all"):
    """--images / --data / --met (+ --mini, --split, --skip-missing); returns the group of the
    three sources, to which a command may add one of its own."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images (recursive)")
    src.add_argument("--data", type=Path, help="Met-format directory (database.json, queries.json, images/)")
    src.add_argument("--met", type=Path, help="root of the official Met dataset")
    p.add_argument("--mini", action="store_true", help="with --met: the mini database")
    p.add_argument("--split", choices=["database", "queries", "all"], default=split_default,
                   help="with --data/--met: which images")
    p.add_argument("--skip-missing", action="store_true",
                   help="with --data/--met: skip listed images that are not on disk")
    return src


def add_extractor_options(p: argparse.ArgumentParser, config_default=feature_settings.DEFAULT_CONFIG) -> None:
    """How features are extracted (what ``extraction_config`` reads)."""
    p.add_argument("--config", default=config_default, choices=sorted(feature_settings.CONFIGS),
                   help="named extraction config")
    p.add_argument("--checkpoint", help="HOW checkpoint, how-met model file (path or URL) or shipped model name "
                                        f"({', '.join(feature_settings.SHIPPED_MODELS)})")
    p.add_argument("--backbone", choices=sorted(feature_settings.BACKBONES), metavar="NAME",
                   help=f"override the config's backbone: {', '.join(feature_settings.BACKBONES)}")
    p.add_argument("--layer", help="trunk layer for local features (e.g. blocks.11.expand, head)")
    p.add_argument("--scales", type=floats, help="comma-separated scales, e.g. 1,0.707,0.5")
    p.add_argument("--features-num", type=POSITIVE, help="local features kept per image")
    p.add_argument("--image-size", type=POSITIVE, help="shrink images so the longer side is <= this")
    p.add_argument("--resize-rule", choices=feature_settings.RESIZE_RULES,
                   help="per-scale input size: floor(side * scale) (official HOW) or round")
    p.add_argument("--image-loading", choices=feature_settings.IMAGE_LOADING,
                   help="how-met (EXIF, bilinear) or official (no EXIF, LANCZOS thumbnail)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def add_model_options(p: argparse.ArgumentParser) -> None:
    add_extractor_options(p)
    p.add_argument("--batch-size", type=POSITIVE, default=1, help="images per forward pass (same size only)")
    p.add_argument("--workers", type=NON_NEGATIVE, help="image decoding processes (default: 0 on <= 2 free cores)")


def add_ray_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run the network on a Ray cluster: ADDRESS of its head (auto, "
                        "ray://host:10001), or none for a local Ray sized to the free cores "
                        "(pip install 'how-met[ray]')")


def extraction_config(args, base: Optional[dict] = None) -> dict:
    """``--config`` (else ``base``, else the default) with the command line's overrides applied."""
    import copy
    config = feature_settings.resolve_config(args.config) if args.config or base is None else copy.deepcopy(base)
    for name in feature_settings.OVERRIDABLE:
        if getattr(args, name, None) is not None:
            config[name] = getattr(args, name)
    if getattr(args, "backbone", None):
        config["model"]["backbone"] = args.backbone
    if getattr(args, "layer", None):
        config["model"]["layer"] = args.layer
    return config


def model_from_args(args, config: dict):
    from ..features.checkpoints import build_model, load_model
    if args.checkpoint:
        return load_model(args.checkpoint, args.device)
    return build_model(**config["model"], device=args.device)


def inputs(args) -> Tuple[Path, List[str], List[str]]:
    """(image_root, keys to extract, database keys) from --images / --data / --met."""
    if args.images is not None:
        from ..features.images import list_images
        keys = list_images(args.images)
        return args.images, keys, keys
    from .. import datasets
    ds = datasets.load_directory(args.data, skip_missing=args.skip_missing) if args.data is not None else \
        datasets.load_met(args.met, mini=args.mini, skip_missing=args.skip_missing)
    keys = {"database": ds.db_keys, "queries": ds.query_keys,
            "all": list(ds.db_keys) + list(ds.query_keys)}[args.split]
    return ds.image_root, keys, list(ds.db_keys)
