"""The ``how-met`` command: every option defined here, once; each command a thin call of a
library function.

Option defaults come from the light ``settings`` modules; a command's stage modules (torch,
faiss, numba) are imported only when that command runs, so ``how-met index`` and ``--help``
never load torch.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from .asmk import settings as asmk_settings
from .features import settings as feature_settings
from .pipeline import settings as pipeline_settings
from .utils import configure_threads, setup_logging


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows an option's default in ``--help`` when it has one worth saying (not for flags, not
    None), and the example of each command as written."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


# -- shared option groups ---------------------------------------------------------------------------

def _floats(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive finite numbers, got {text!r}")
    return values


def _shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def _add_input_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images (recursive)")
    src.add_argument("--data", type=Path, help="Met-format directory (database.json, queries.json, images/)")
    src.add_argument("--met", type=Path, help="root of the official Met dataset")
    p.add_argument("--mini", action="store_true", help="with --met: the mini database")
    p.add_argument("--split", choices=["database", "queries", "all"], default="all",
                   help="with --data/--met: which images")
    p.add_argument("--skip-missing", action="store_true",
                   help="with --data/--met: skip listed images that are not on disk")


def _add_extractor_options(p: argparse.ArgumentParser, config_default=feature_settings.DEFAULT_CONFIG) -> None:
    """How features are extracted (what ``_extraction_config`` reads)."""
    p.add_argument("--config", default=config_default, choices=sorted(feature_settings.CONFIGS),
                   help="named extraction config")
    p.add_argument("--checkpoint", help="HOW checkpoint, how-met model file (path or URL) or shipped model name "
                                        f"({', '.join(feature_settings.SHIPPED_MODELS)})")
    p.add_argument("--backbone", choices=sorted(feature_settings.BACKBONES), metavar="NAME",
                   help=f"override the config's backbone: {', '.join(feature_settings.BACKBONES)}")
    p.add_argument("--layer", help="trunk layer for local features (e.g. blocks.11.expand, head)")
    p.add_argument("--scales", type=_floats, help="comma-separated scales, e.g. 1,0.707,0.5")
    p.add_argument("--features-num", type=int, help="local features kept per image")
    p.add_argument("--image-size", type=int, help="shrink images so the longer side is <= this")
    p.add_argument("--resize-rule", choices=feature_settings.RESIZE_RULES,
                   help="per-scale input size: floor(side * scale) (official HOW) or round")
    p.add_argument("--image-loading", choices=feature_settings.IMAGE_LOADING,
                   help="how-met (EXIF, bilinear) or official (no EXIF, LANCZOS thumbnail)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    _add_extractor_options(p)
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (same size only)")
    p.add_argument("--workers", type=int, help="image decoding processes (default: 0 on <= 2 free cores)")


def _extraction_config(args, base: Optional[dict] = None) -> dict:
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


def _model(args, config: dict):
    from .features.checkpoints import build_model, load_model
    if args.checkpoint:
        return load_model(args.checkpoint, args.device)
    return build_model(**config["model"], device=args.device)


def _inputs(args) -> Tuple[Path, List[str], List[str]]:
    """(image_root, keys to extract, database keys) from --images / --data / --met."""
    if args.images is not None:
        from .features.images import list_images
        keys = list_images(args.images)
        return args.images, keys, keys
    from . import datasets
    ds = datasets.load_directory(args.data, skip_missing=args.skip_missing) if args.data is not None else \
        datasets.load_met(args.met, mini=args.mini, skip_missing=args.skip_missing)
    keys = {"database": ds.db_keys, "queries": ds.query_keys,
            "all": list(ds.db_keys) + list(ds.query_keys)}[args.split]
    return ds.image_root, keys, list(ds.db_keys)


# -- commands ---------------------------------------------------------------------------------------

def _configure_extract(p: argparse.ArgumentParser) -> None:
    _add_input_options(p)
    p.add_argument("--out", "--output", "-o", dest="out", type=Path, required=True,
                   help="HDF5 feature store to write/extend")
    _add_model_options(p)
    p.add_argument("--float16", action="store_true", help="store descriptors as float16")
    p.add_argument("--skip-bad", action="store_true", help="log unreadable images and go on")
    p.add_argument("--shard", help="i/n: extract only every n-th image starting at i")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--save-model", type=Path,
                   help="where to save the model (default: OUT's name with .model.pt, beside it)")
    p.add_argument("--like", type=Path, metavar="STORE",
                   help="extract with the model and settings of this feature store (e.g. queries "
                        "--like the database's store, so that they can be searched against it)")


def _run_extract(args) -> int:
    from .features.extract import extract_to_store
    image_root, keys, db_keys = _inputs(args)
    if args.like is not None:
        model, config = None, None
    else:
        config = _extraction_config(args)
        model = _model(args, config)
    stats = extract_to_store(image_root, keys, args.out, config=config, model=model, like=args.like,
                             device=args.device, batch_size=args.batch_size, workers=args.workers,
                             skip_bad=args.skip_bad, float16=args.float16, shard=_shard(args.shard),
                             whiten_keys=db_keys, model_out=args.save_model, autocast=args.bf16)
    print(json.dumps(stats))
    return 0


def _configure_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, metavar="OUT", help="merged store to write")
    p.add_argument("inputs", type=Path, nargs="+", help="shard stores")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _run_merge(args) -> int:
    from .features.store import merge_stores
    n = merge_stores(args.inputs, args.out, overwrite=args.overwrite)
    print(f"merged {n} images into {args.out}")
    return 0


def _configure_whiten(p: argparse.ArgumentParser) -> None:
    _add_input_options(p)
    _add_model_options(p)
    p.add_argument("--out", type=Path, required=True, help="model file to write (use with --checkpoint)")
    p.add_argument("--num-images", type=int, default=feature_settings.WHITEN_IMAGES,
                   help="database images to learn the whitening from")


def _run_whiten(args) -> int:
    from .features.checkpoints import save_model
    from .features.extract import learn_whitening
    configure_threads()
    config = _extraction_config(args)
    image_root, keys, db_keys = _inputs(args)
    model = _model(args, config)
    learn_whitening(model, image_root, db_keys if args.split == "all" else keys, config,
                    num_images=args.num_images, batch_size=args.batch_size, workers=args.workers)
    save_model(model, args.out)
    print(f"saved model with learned whitening to {args.out}")
    return 0


def _configure_codebook(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, required=True, help="HDF5 feature store to train on")
    p.add_argument("--size", type=int, help="number of visual words (default: the recipe's, else sized "
                                            "like evaluate does: ~200 descriptors per word, 1k to 64k)")
    p.add_argument("--recipe", choices=sorted(asmk_settings.CODEBOOK_RECIPES),
                   help="named recipe (sets size, iterations, seed, max descriptors and the file name)")
    p.add_argument("--out", type=Path, help="codebook file (.npz); default codebooks/<name>.npz")
    p.add_argument("--iterations", type=int, help="k-means iterations (default: the recipe's, else 10)")
    p.add_argument("--seed", type=int, help="random seed (default: the recipe's, else 0)")
    p.add_argument("--max-descriptors", type=int,
                   help=f"training descriptors, same quota per image (default: the recipe's, else "
                        f"{asmk_settings.DEFAULT_MAX_DESCRIPTORS:,})")
    p.add_argument("--max-images", type=int, help="train on at most this many images (random)")
    p.add_argument("--points-per-centroid", type=int,
                   help=f"faiss k-means' cap on training points per word (official HOW: "
                        f"{asmk_settings.OFFICIAL_POINTS_PER_CENTROID}; default: the recipe's, else none)")
    p.add_argument("--method", choices=asmk_settings.SEARCH_METHODS, default="auto",
                   help="assignment search: exact (auto), or approximate ivf/hnsw (README \"Fidelity\")")


def _run_codebook(args) -> int:
    from .asmk.codebook import train_codebook
    configure_threads()
    cb, out = train_codebook(args.features, size=args.size, recipe=args.recipe, iterations=args.iterations,
                             seed=args.seed, max_descriptors=args.max_descriptors,
                             max_images=args.max_images, method=args.method, out=args.out,
                             points_per_centroid=args.points_per_centroid)
    summary = {"codebook": str(out), "size": cb.meta["size"], "dim": cb.meta["dim"],
               "training_set": cb.meta["training_set"], "method": cb.method,
               "assignment_recall": cb.meta.get("assignment_recall")}
    print(json.dumps(summary))
    return 0


def _configure_index(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, required=True, help="feature store of the database images")
    p.add_argument("--codebook", type=Path, required=True, help="codebook (.npz)")
    p.add_argument("--out", type=Path, required=True,
                   help="index to write: a directory, or one HDF5 file if it ends in .h5")
    p.add_argument("--append", action="store_true",
                   help="add the store's images that the existing index does not hold yet")
    p.add_argument("--idf", action="store_true", help="idf-weighted scores (off by default, as in SPEC)")
    p.add_argument("--float", dest="binary", action="store_false",
                   help="non-binary ASMK: L2-normalised float residuals (128 x 4 bytes each)")
    p.add_argument("--batch-size", type=int, default=64, help="images quantised together")


def _run_index(args) -> int:
    from .asmk.indexing import build_index
    configure_threads()
    ivf = build_index(args.features, args.codebook, extend=args.out if args.append and args.out.exists() else None,
                      batch_size=args.batch_size, use_idf=args.idf, binary=args.binary)
    ivf.save(args.out)
    stats = ivf.stats()
    print(json.dumps({"index": str(args.out), "images": stats["images"], "postings": stats["postings"],
                      "bytes_per_vector": round(stats["bytes"]["per_vector"], 2),
                      "bytes_per_image": round(stats["bytes"]["per_image_total"], 1)}))
    return 0


def _configure_query(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, required=True, help="inverted file (directory or .h5)")
    p.add_argument("--codebook", type=Path, required=True, help="codebook the index was built with")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", type=Path, help="feature store of the query images")
    src.add_argument("--images", type=Path,
                     help="query images: a folder, or a list (.json Met-style or .txt, one path a line)")
    p.add_argument("--out", type=Path, required=True, help="results file (.h5 or .json)")
    p.add_argument("-k", type=int, default=asmk_settings.DEFAULT_K, help="neighbours per query")
    p.add_argument("--multiple-assignment", type=int, default=asmk_settings.DEFAULT_MULTIPLE_ASSIGNMENT,
                   help="visual words per query descriptor")
    p.add_argument("--alpha", type=float, help="selective-kernel exponent (default: the index's, 3)")
    p.add_argument("--tau", type=float, help="selective-kernel threshold (default: the index's, 0)")
    p.add_argument("--idf", dest="use_idf", action="store_true", default=None, help="idf-weighted scores")
    p.add_argument("--query-batch", type=int, default=32, help="query images searched together")
    p.add_argument("--image-root", type=Path, help="with --images LIST: folder the listed paths are relative to")
    p.add_argument("--save-features", type=Path, help="with --images: keep the extracted query features here")
    p.add_argument("--rerank", action="store_true",
                   help="rerank each query's top-k with spatial verification (needs --db-features)")
    p.add_argument("--db-features", type=Path, help="with --rerank: the database feature store")
    _add_model_options(p)


def _run_query(args) -> int:
    from .pipeline.query import run_query
    configure_threads()
    explicit = [name for name in feature_settings.OVERRIDABLE if getattr(args, name) is not None]
    config = _extraction_config(args) if args.images is not None else None
    result = run_query(args.index, args.codebook, args.out, features=args.features, images=args.images,
                       checkpoint=args.checkpoint, config=config, explicit=explicit,
                       image_root=args.image_root, save_features=args.save_features, device=args.device,
                       workers=args.workers, extract_batch_size=args.batch_size, rerank=args.rerank,
                       db_features=args.db_features, k=args.k, multiple_assignment=args.multiple_assignment,
                       alpha=args.alpha, tau=args.tau, use_idf=args.use_idf, batch_size=args.query_batch)
    answered = int((result.indices[:, 0] >= 0).sum()) if len(result) else 0
    print(json.dumps({"results": str(args.out), "queries": len(result), "with_neighbours": answered,
                      "k": args.k, "reranked": bool(args.rerank)}))
    return 0


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="Met-format directory (database.json + queries.json "
                                               "or val.json + test.json, images/)")
    src.add_argument("--met", type=Path, help="root of the official Met dataset")
    p.add_argument("--mini", action="store_true", help="with --met: the mini database")
    p.add_argument("--work", type=Path, required=True, help="work directory (created; resumed if it exists)")
    p.add_argument("--cv", type=int, help="k-fold cross-tuning (default 2 when there is no val/test split)")
    p.add_argument("--quick", action="store_true", help="small, fast settings (smoke tests)")
    _add_extractor_options(p, config_default=None)
    p.add_argument("--codebook",
                   help="codebook file trained separately (how-met codebook); default: train on the database")
    p.add_argument("--codebook-size", type=int,
                   help="visual words of a codebook trained on the database (default: ~200 descriptors per word)")
    p.add_argument("--unsupervised", default="auto",
                   choices=["auto", "database"] + sorted(feature_settings.SHIPPED_MODELS),
                   help="where the whitening and codebook come from: auto = the shipped ones for a "
                        "database smaller than their training corpus, else learned from the database")
    p.add_argument("--seed", type=int, help="codebook and fold-split seed (default: the config's, else 0)")
    p.add_argument("--global-dims", type=int, help="PCA-whitened global descriptor dims")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(pipeline_settings.METHODS)}")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (logged)")
    p.add_argument("--skip-missing", action="store_true", help="skip images listed but not on disk")
    p.add_argument("--report", action="store_true", help="also write the HTML report")
    p.add_argument("--repeats", type=int, default=1,
                   help="rerun the chance-dependent stages (codebook seed, fold split) this many times "
                        "on the same features and report mean +- std")
    p.add_argument("--target-precision", type=float,
                   default=pipeline_settings.DEFAULT_TARGET_PRECISION,
                   help="the recogniser (WORK/recogniser) accepts answers from the lowest confidence at "
                        "which validation precision reaches this")


def _evaluation_settings(args) -> dict:
    import copy
    settings = copy.deepcopy(pipeline_settings.QUICK_SETTINGS if args.quick else pipeline_settings.DEFAULT_SETTINGS)
    if args.config in pipeline_settings.PUBLISHED:  # the published pipeline, not only its extraction
        settings.update(copy.deepcopy(pipeline_settings.PUBLISHED[args.config]))
    settings["extract"] = _extraction_config(args, base=settings["extract"])
    for name in ("checkpoint", "codebook", "codebook_size", "global_dims", "target_precision", "unsupervised", "seed"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.methods:
        unknown = set(args.methods.split(",")) - set(pipeline_settings.METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {', '.join(pipeline_settings.METHODS)}")
        settings["methods"] = args.methods.split(",")
    settings["skip_bad"] = args.skip_bad
    return settings


def _run_evaluate(args) -> int:
    import time
    from .datasets import load_dataset, load_met
    from .pipeline.evaluate import format_table, run_evaluation
    settings = _evaluation_settings(args)
    if args.met is not None:
        ds = load_met(args.met, mini=args.mini, skip_missing=args.skip_missing)
    else:
        ds = load_dataset(args.data, skip_missing=args.skip_missing)
    started = time.perf_counter()
    results = run_evaluation(work_dir=args.work, settings=settings, cv=args.cv, dataset=ds,
                             device=args.device, repeats=args.repeats)
    print(format_table(results))
    print(f"\nresults: {args.work / 'results.json'} ({time.perf_counter() - started:.0f} s)")
    if args.report:
        from .pipeline.report import write_report
        print(f"report: {write_report(args.work)}")
    return 0


def _configure_demo(p: argparse.ArgumentParser) -> None:
    quick = pipeline_settings.QUICK_SIZE
    p.add_argument("--work", type=Path, default=Path("how-met-demo"),
                   help="work directory: museum, features, index, results, report")
    p.add_argument("--data", type=Path, default=None,
                   help="evaluate this Met-format directory (database.json, queries.json, "
                        "images/) instead of building the demo museum")
    p.add_argument("--quick", action="store_true",
                   help=f"a smaller museum ({quick['n_exhibits']} exhibits, "
                        f"{quick['n_queries'] + quick['n_distractors']} queries) and lighter settings, for tests")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo museum")


def _run_demo(args) -> int:
    from .pipeline.demo import run_demo
    run_demo(work=args.work, data=args.data, quick=args.quick, seed=args.seed)
    return 0


def _configure_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", type=Path, metavar="RESULTS_DIR",
                   help="an evaluation work directory (holds results.json, predictions/)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RESULTS_DIR/report)")
    p.add_argument("--queries", type=int, default=pipeline_settings.DEFAULT_QUERIES_SHOWN, metavar="N",
                   help="show at most N queries")


def _run_report(args) -> int:
    from .pipeline.report import write_report
    index = write_report(args.results_dir, out=args.out, n_queries_shown=args.queries)
    print(f"report: {index}")
    return 0


def _collection(args) -> Tuple[Path, List[str], list]:
    """(image root, image keys, exhibit ids) from --images FOLDER or --data (Met database)."""
    if args.images is not None:
        from .recognition.recogniser import exhibits_in_folder
        keys, ids = exhibits_in_folder(args.images)
        return args.images, keys, ids
    from .datasets import find_image_root, read_database
    keys, labels = read_database(args.data / "database.json")
    return find_image_root(args.data, keys), list(keys), [int(v) for v in labels]


def _add_collection_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, metavar="FOLDER",
                     help="the collection: one subfolder per exhibit (its name is the exhibit id), or "
                          "images at the top level, each an exhibit named by its file name")
    src.add_argument("--data", type=Path, help="Met-format directory: its database.json gives the exhibits")


def _configure_recogniser(p: argparse.ArgumentParser) -> None:
    _add_collection_options(p)
    p.add_argument("--out", type=Path, required=True, help="recogniser directory to write")
    _add_extractor_options(p)
    p.add_argument("--codebook-size", type=int, help="visual words (default: ~200 descriptors per word)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (logged)")


def _run_recogniser(args) -> int:
    from .recognition.recogniser import build_recogniser
    configure_threads()
    image_root, keys, ids = _collection(args)
    out = build_recogniser(image_root, keys, ids, args.out, config=_extraction_config(args),
                           checkpoint=args.checkpoint, device=args.device, codebook_size=args.codebook_size,
                           skip_bad=args.skip_bad)
    print(json.dumps({"recogniser": str(out), "images": len(keys), "exhibits": len(set(map(str, ids)))}))
    return 0


def _configure_identify(p: argparse.ArgumentParser) -> None:
    p.add_argument("photos", type=Path, nargs="+", metavar="PHOTO", help="photos to recognise")
    p.add_argument("--recogniser", type=Path, required=True,
                   help="recogniser directory (how-met evaluate writes WORK/recogniser; how-met recogniser builds one)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _run_identify(args) -> int:
    from .recognition.recogniser import Recogniser
    configure_threads()
    from .features.images import ImageError
    failed = 0
    with Recogniser(args.recogniser, device=args.device) as recogniser:
        for photo in args.photos:
            try:
                answer = recogniser.recognise(photo).as_dict()
            except ImageError as exc:  # one unreadable photo does not stop the others
                answer, failed = {"image": str(photo), "error": str(exc)}, failed + 1
            print(json.dumps(answer), flush=True)
    return 1 if failed else 0


def _configure_add_exhibits(p: argparse.ArgumentParser) -> None:
    _add_collection_options(p)
    p.add_argument("--recogniser", type=Path, required=True, help="recogniser directory to extend")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (logged)")


def _run_add_exhibits(args) -> int:
    from .recognition.recogniser import Recogniser
    configure_threads()
    image_root, keys, ids = _collection(args)
    with Recogniser(args.recogniser) as recogniser:
        added = recogniser.add_exhibits(image_root, keys, ids, skip_bad=args.skip_bad)
        print(json.dumps({"recogniser": str(args.recogniser), "added": added, "images": len(recogniser),
                          "exhibits": recogniser.n_exhibits}))
    return 0


# An example per command, shown under its --help (the README walks through them in order).
EXAMPLES = {
    "extract": "how-met extract --data met --split database --out met/db.h5\n"
               "how-met extract --data met --split queries --out met/queries.h5 --like met/db.h5",
    "merge": "how-met merge met/db.h5 met/db-0.h5 met/db-1.h5 --overwrite",
    "whiten": "how-met whiten --data met --out met/model.pt",
    "codebook": "how-met codebook --features met/db.h5 --out met/codebook.npz",
    "index": "how-met index --features met/db.h5 --codebook met/codebook.npz --out met/index",
    "query": "how-met query --index met/index --codebook met/codebook.npz --features met/queries.h5 "
             "--out met/ranks.h5",
    "evaluate": "how-met evaluate --data ../shared/data/museum --work museum-eval --report",
    "demo": "how-met demo --work how-met-demo",
    "report": "how-met report museum-eval --queries 500",
    "recogniser": "how-met recogniser --images my-collection/ --out my-recogniser",
    "identify": "how-met identify --recogniser museum-eval/recogniser visitor1.jpg visitor2.jpg",
    "add-exhibits": "how-met add-exhibits --recogniser my-recogniser --images new-acquisitions/",
}

# command -> (one-line help, configure, run). Order is the order of the pipeline.
COMMANDS = {
    "extract": ("extract HOW local (and global) features into an HDF5 store", _configure_extract, _run_extract),
    "merge": ("merge shard feature stores into one", _configure_merge, _run_merge),
    "whiten": ("learn the PCA-whitening of the HOW reduction layer from images", _configure_whiten, _run_whiten),
    "codebook": ("train a k-means codebook of visual words from a feature store", _configure_codebook,
                 _run_codebook),
    "index": ("build or extend a binary ASMK inverted file", _configure_index, _run_index),
    "query": ("rank database images for query features or images", _configure_query, _run_query),
    "evaluate": ("run the whole Met protocol (all stages, resumable) and report", _configure_evaluate,
                 _run_evaluate),
    "demo": ("build a small museum from bundled photos and evaluate it", _configure_demo, _run_demo),
    "report": ("write a static HTML report of an evaluation", _configure_report, _run_report),
    "recogniser": ("build a recogniser for a collection, without queries to tune on (default settings)",
                   _configure_recogniser, _run_recogniser),
    "identify": ("which exhibit each photo shows: one JSON object per photo", _configure_identify, _run_identify),
    "add-exhibits": ("add images of new or known exhibits to a recogniser (no rebuild)", _configure_add_exhibits,
                     _run_add_exhibits),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="how-met", description="Instance-level recognition with HOW local "
                                     "descriptors, ASMK and kNN classification (Met protocol).")
    from . import __version__
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"how-met {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, configure, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter,
                           epilog="example:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name].split("\n")))
        configure(p)
        p.set_defaults(run=run)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    # SIGTERM (a scheduler's or `kill`'s stop) ends the job like Ctrl-C: the stores keep every
    # finished image and the next run continues from there.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = args.run(args)
    except KeyboardInterrupt as exc:
        name = exc.args[0] if exc.args else "SIGINT"
        print(f"how-met {args.command}: interrupted ({name}); rerun the same command to continue",
              file=sys.stderr)
        return 128 + getattr(signal, str(name), signal.SIGINT)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        if args.verbose:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"how-met {args.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
