"""End-to-end commands: evaluate, demo, report."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..features import settings as feature_settings
from ..pipeline import settings as pipeline_settings
from .options import (NON_NEGATIVE, POSITIVE, Command, add_extractor_options, add_ray_option, at_least,
                      extraction_config)


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="Met-format directory (database.json + queries.json "
                                               "or val.json + test.json, images/)")
    src.add_argument("--met", type=Path, help="root of the official Met dataset")
    p.add_argument("--mini", action="store_true", help="with --met: the mini database")
    p.add_argument("--work", type=Path, required=True, help="work directory (created; resumed if it exists)")
    p.add_argument("--cv", type=at_least(2), help="k-fold cross-tuning (default 2 when there is no val/test split)")
    p.add_argument("--quick", action="store_true", help="small, fast settings (smoke tests)")
    add_extractor_options(p, config_default=None)
    p.add_argument("--codebook",
                   help="codebook file trained separately (how-met codebook); default: train on the database")
    p.add_argument("--features", help="a feature store you already have, holding the database and query "
                                      "images (how-met extract): nothing is extracted")
    p.add_argument("--index", help="with --codebook: an inverted file of the database you already have "
                                   "(how-met index)")
    p.add_argument("--codebook-size", type=POSITIVE,
                   help="visual words of a codebook trained on the database (default: ~200 descriptors per word)")
    p.add_argument("--unsupervised", default="auto",
                   choices=["auto", "database"] + sorted(feature_settings.SHIPPED_MODELS),
                   help="where the whitening and codebook come from: auto = the shipped ones for a "
                        "database smaller than their training corpus, else learned from the database")
    p.add_argument("--seed", type=NON_NEGATIVE, help="codebook and fold-split seed (default: the config's, else 0)")
    p.add_argument("--global-dims", type=POSITIVE, help="PCA-whitened global descriptor dims")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(pipeline_settings.METHODS)}")
    p.add_argument("--rerank-weights", choices=["default", "tuned"],
                   help="global+rerank fusion weights: the documented default (K and t still tuned) or "
                        "tuned over a grid on the tuning queries (for large validation sets)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (logged)")
    p.add_argument("--skip-missing", action="store_true", help="skip images listed but not on disk")
    p.add_argument("--report", action="store_true", help="also write the HTML report")
    p.add_argument("--repeats", type=POSITIVE, default=1,
                   help="rerun the chance-dependent stages (codebook seed, fold split) this many times "
                        "on the same features and report mean +- std")
    p.add_argument("--target-precision", type=float,
                   default=pipeline_settings.DEFAULT_TARGET_PRECISION,
                   help="the recogniser (WORK/recogniser) accepts answers from the lowest confidence at "
                        "which validation precision reaches this")
    add_ray_option(p)


def evaluation_settings(args) -> dict:
    import copy
    settings = copy.deepcopy(pipeline_settings.QUICK_SETTINGS if args.quick else pipeline_settings.DEFAULT_SETTINGS)
    if args.config in pipeline_settings.PUBLISHED:  # the published pipeline, not only its extraction
        settings.update(copy.deepcopy(pipeline_settings.PUBLISHED[args.config]))
    settings["extract"] = extraction_config(args, base=settings["extract"])
    if args.index and not args.codebook:
        raise ValueError("--index needs --codebook: the codebook it was built with")
    for name in ("checkpoint", "codebook", "codebook_size", "global_dims", "target_precision", "unsupervised", "seed",
                 "features", "index", "rerank_weights"):
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
    from ..datasets import load_dataset, load_met
    from ..pipeline.evaluate import format_table, run_evaluation
    settings = evaluation_settings(args)
    if args.met is not None:
        ds = load_met(args.met, mini=args.mini, skip_missing=args.skip_missing)
    else:
        ds = load_dataset(args.data, skip_missing=args.skip_missing)
    started = time.perf_counter()
    results = run_evaluation(work_dir=args.work, settings=settings, cv=args.cv, dataset=ds,
                             device=args.device, repeats=args.repeats, ray=args.ray)
    print(format_table(results))
    print(f"\nresults: {args.work / 'results.json'} ({time.perf_counter() - started:.0f} s)")
    if args.report:
        from ..pipeline.report import write_report
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
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the demo museum")


def _run_demo(args) -> int:
    from ..pipeline.demo import run_demo
    run_demo(work=args.work, data=args.data, quick=args.quick, seed=args.seed)
    return 0


def _configure_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("results_dir", type=Path, metavar="RESULTS_DIR",
                   help="an evaluation work directory (holds results.json, predictions/)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RESULTS_DIR/report)")
    p.add_argument("--queries", type=NON_NEGATIVE, default=pipeline_settings.DEFAULT_QUERIES_SHOWN, metavar="N",
                   help="show at most N queries")


def _run_report(args) -> int:
    from ..pipeline.report import write_report
    index = write_report(args.results_dir, out=args.out, n_queries_shown=args.queries)
    print(f"report: {index}")
    return 0


COMMANDS = {
    "evaluate": Command(
        "run the whole Met protocol (all stages, resumable) and report",
        "how-met evaluate --data ../shared/data/museum --work museum-eval --report",
        _configure_evaluate, _run_evaluate),
    "demo": Command(
        "build a small museum from bundled photos and evaluate it",
        "how-met demo --work how-met-demo",
        _configure_demo, _run_demo),
    "report": Command(
        "write a static HTML report of an evaluation",
        "how-met report museum-eval --queries 500",
        _configure_report, _run_report),
}
