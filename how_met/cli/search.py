"""Commands of the ASMK stage: codebook, index, query."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..asmk import settings as asmk_settings
from ..features import settings as feature_settings
from ..utils import configure_threads
from .options import (NON_NEGATIVE, POSITIVE, Command, add_input_options, add_model_options, add_ray_option,
                      extraction_config, inputs)


def _configure_codebook(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, required=True, help="HDF5 feature store to train on")
    p.add_argument("--size", type=POSITIVE, help="number of visual words (default: the recipe's, else sized "
                                            "like evaluate does: ~200 descriptors per word, 1k to 64k)")
    p.add_argument("--recipe", choices=sorted(asmk_settings.CODEBOOK_RECIPES),
                   help="named recipe (sets size, iterations, seed, max descriptors and the file name)")
    p.add_argument("--out", type=Path, help="codebook file (.npz); default codebooks/<name>.npz")
    p.add_argument("--iterations", type=POSITIVE, help="k-means iterations (default: the recipe's, else 10)")
    p.add_argument("--seed", type=NON_NEGATIVE, help="random seed (default: the recipe's, else 0)")
    p.add_argument("--max-descriptors", type=POSITIVE,
                   help=f"training descriptors, same quota per image (default: the recipe's, else "
                        f"{asmk_settings.DEFAULT_MAX_DESCRIPTORS:,})")
    p.add_argument("--max-images", type=POSITIVE, help="train on at most this many images (random)")
    p.add_argument("--points-per-centroid", type=POSITIVE,
                   help=f"faiss k-means' cap on training points per word (official HOW: "
                        f"{asmk_settings.OFFICIAL_POINTS_PER_CENTROID}; default: the recipe's, else none)")
    p.add_argument("--method", choices=asmk_settings.SEARCH_METHODS, default="auto",
                   help="assignment search: exact (auto), or approximate ivf/hnsw (README \"Fidelity\")")


def _run_codebook(args) -> int:
    from ..asmk.codebook import train_codebook
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
    src = add_input_options(p, split_default="database")
    src.add_argument("--features", type=Path, nargs="+",
                     help="feature store of the database images (several: shards, with --records)")
    p.add_argument("--codebook", type=Path, required=True, help="codebook (.npz)")
    p.add_argument("--out", type=Path, required=True,
                   help="index to write: a directory, or one HDF5 file if it ends in .h5")
    p.add_argument("--append", action="store_true",
                   help="add the store's images that the existing index does not hold yet")
    p.add_argument("--idf", action="store_true", help="idf-weighted scores (off by default, as in SPEC)")
    p.add_argument("--float", dest="binary", action="store_false",
                   help="non-binary ASMK: L2-normalised float residuals (128 x 4 bytes each)")
    p.add_argument("--batch-size", type=POSITIVE, default=64, help="images quantised together")
    streaming = p.add_argument_group("streaming a large database (README \"Met at full scale\")")
    streaming.add_argument("--records", type=Path,
                           help="compact per-image records file to stream the images (or stores) into, "
                                "resumed if it exists; the index is then assembled from it on disk")
    streaming.add_argument("--record-descriptors", choices=("int8", "pq", "full", "none"), default="int8",
                           help="descriptors kept for spatial verification: int8 unit vectors, pq "
                                "(product-quantised unit vectors, --pq-code), full (the "
                                "store's exact values), none (ASMK rerank only)")
    streaming.add_argument("--pq-code", metavar="MxB",
                           help="with --record-descriptors pq: M sub-quantisers (dividing the descriptor "
                                "dimension) of B bits each, M x B / 8 bytes per feature (default 8x8: 8 bytes)")
    streaming.add_argument("--like", type=Path, metavar="STORE",
                           help="with --images/--data/--met: extract with the model and settings of "
                                "this store (the sample the codebook was trained on)")
    streaming.add_argument("--skip-bad", action="store_true", help="log unreadable images and go on")
    streaming.add_argument("--device", default="cpu", help="cpu or cuda")
    streaming.add_argument("--workers", type=NON_NEGATIVE, help="image decoding processes (default: 0 on <= 2 free cores)")
    add_ray_option(streaming)


def _run_index(args) -> int:
    configure_threads()
    if args.ray is not None and (args.records is None or args.features is not None):
        raise ValueError("--ray runs the network: give --images/--data/--met streamed into --records")
    if args.records is not None:
        return _run_streaming_index(args)
    from ..asmk.indexing import build_index
    if args.features is None or len(args.features) != 1:
        raise ValueError("--images/--data/--met or several --features stores stream into --records; "
                         "without it give one --features store")
    ivf = build_index(args.features[0], args.codebook,
                      extend=args.out if args.append and args.out.exists() else None,
                      batch_size=args.batch_size, use_idf=args.idf, binary=args.binary)
    ivf.save(args.out)
    print(json.dumps(_index_summary(args.out, ivf)))
    return 0


def _index_summary(out: Path, ivf) -> dict:
    stats = ivf.stats()
    return {"index": str(out), "images": stats["images"], "postings": stats["postings"],
            "bytes_per_vector": round(stats["bytes"]["per_vector"], 2),
            "bytes_per_image": round(stats["bytes"]["per_image_total"], 1)}


def _run_streaming_index(args) -> int:
    from ..asmk.indexing import index_from_records, records_from_images, records_from_stores
    if args.append or not args.binary:
        raise ValueError("--records: the binary index is assembled from every record (no --append, no --float)")
    if args.pq_code is not None and args.record_descriptors != "pq":
        raise ValueError("--pq-code is for --record-descriptors pq")
    if args.features is not None:
        stats = records_from_stores(args.features, args.codebook, args.records,
                                    descriptors=args.record_descriptors, batch_size=args.batch_size,
                                    pq_code=args.pq_code)
    else:
        if args.like is None:
            raise ValueError("--images/--data/--met: give --like STORE, the features the codebook was "
                             "trained on (their model extracts the images)")
        image_root, keys, _ = inputs(args)
        stats = records_from_images(image_root, keys, args.like, args.codebook, args.records,
                                    descriptors=args.record_descriptors, batch_size=args.batch_size,
                                    device=args.device, workers=args.workers, skip_bad=args.skip_bad,
                                    ray=args.ray, pq_code=args.pq_code)
    ivf = index_from_records(args.records, args.out, use_idf=args.idf)
    summary = _index_summary(args.out, ivf)
    from ..asmk.records import vectors_path
    sidecar = vectors_path(args.records)
    summary.update(records=str(args.records), records_written=stats["written"],
                   record_bytes_per_image=round(args.records.stat().st_size / max(len(ivf), 1), 1),
                   vectors=str(sidecar),  # consumed by the assembly: may be deleted now
                   vectors_bytes_per_image=round(sidecar.stat().st_size / max(len(ivf), 1), 1)
                   if sidecar.exists() else None)
    print(json.dumps(summary))
    return 0


def _configure_query(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, required=True, help="inverted file (directory or .h5)")
    p.add_argument("--codebook", type=Path, required=True, help="codebook the index was built with")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", type=Path, help="feature store of the query images")
    src.add_argument("--images", type=Path,
                     help="query images: a folder, or a list (.json Met-style or .txt, one path a line)")
    p.add_argument("--out", type=Path, required=True, help="results file (.h5 or .json)")
    p.add_argument("-k", type=POSITIVE, default=asmk_settings.DEFAULT_K, help="neighbours per query")
    p.add_argument("--multiple-assignment", type=POSITIVE, default=asmk_settings.DEFAULT_MULTIPLE_ASSIGNMENT,
                   help="visual words per query descriptor")
    p.add_argument("--alpha", type=float, help="selective-kernel exponent (default: the index's, 3)")
    p.add_argument("--tau", type=float, help="selective-kernel threshold (default: the index's, 0)")
    p.add_argument("--idf", dest="use_idf", action="store_true", default=None, help="idf-weighted scores")
    p.add_argument("--query-batch", type=POSITIVE,
                   help="at most this many query images searched together (default: as many as --query-memory holds)")
    p.add_argument("--query-memory", type=float, default=256, metavar="MB",
                   help="working memory of one batch of query images (default 256 MB: ~80 images of 1000 features)")
    p.add_argument("--image-root", type=Path, help="with --images LIST: folder the listed paths are relative to")
    p.add_argument("--save-features", type=Path, help="with --images: keep the extracted query features here")
    p.add_argument("--rerank", action="store_true",
                   help="rerank each query's top-k with spatial verification (needs --db-features)")
    p.add_argument("--db-features", type=Path,
                   help="with --rerank: the database feature store, or its records (how-met index --records)")
    add_model_options(p)


def _run_query(args) -> int:
    from ..pipeline.query import run_query
    configure_threads()
    explicit = [name for name in feature_settings.OVERRIDABLE if getattr(args, name) is not None]
    config = extraction_config(args) if args.images is not None else None
    result = run_query(args.index, args.codebook, args.out, features=args.features, images=args.images,
                       checkpoint=args.checkpoint, config=config, explicit=explicit,
                       image_root=args.image_root, save_features=args.save_features, device=args.device,
                       workers=args.workers, extract_batch_size=args.batch_size, rerank=args.rerank,
                       db_features=args.db_features, k=args.k, multiple_assignment=args.multiple_assignment,
                       alpha=args.alpha, tau=args.tau, use_idf=args.use_idf, batch_size=args.query_batch,
                       batch_mb=args.query_memory)
    answered = int((result.indices[:, 0] >= 0).sum()) if len(result) else 0
    print(json.dumps({"results": str(args.out), "queries": len(result), "with_neighbours": answered,
                      "k": args.k, "reranked": bool(args.rerank)}))
    return 0


COMMANDS = {
    "codebook": Command(
        "train a k-means codebook of visual words from a feature store",
        "how-met codebook --features met/db.h5 --out met/codebook.npz",
        _configure_codebook, _run_codebook),
    "index": Command(
        "build or extend a binary ASMK inverted file",
        "how-met index --features met/db.h5 --codebook met/codebook.npz --out met/index\n"
        "how-met index --met ~/met --like met/sample.h5 --codebook met/codebook.npz "
        "--records met/db.records --out met/index",
        _configure_index, _run_index),
    "query": Command(
        "rank database images for query features or images",
        "how-met query --index met/index --codebook met/codebook.npz --features met/queries.h5 "
        "--out met/ranks.h5",
        _configure_query, _run_query),
}
