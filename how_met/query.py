"""Query stage: local features of query images -> quantised (multiple assignment), aggregated,
searched in the ASMK inverted file -> ranked ``Neighbours``.

Queries are processed in batches: one assignment call for the whole batch (faiss spreads it
over the cores), one vectorised aggregation, one search call (numba, queries over threads).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .neighbours import Neighbours
from .utils import configure_threads, progress

logger = logging.getLogger(__name__)

DEFAULT_K = 100
DEFAULT_MULTIPLE_ASSIGNMENT = 5


def _load(index, codebook):
    from .codebook import Codebook
    from .ivf import InvertedFile
    if not isinstance(codebook, Codebook):
        codebook = Codebook.load(codebook)
    if not isinstance(index, InvertedFile):
        index = InvertedFile.load(index, mmap=True)
    index.check_codebook(codebook)
    return index, codebook


def _add_time(timings: Optional[dict], name: str, seconds: float) -> None:
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + seconds


def query_descriptors(index, codebook, descriptors: Sequence[np.ndarray],
                      query_keys: Optional[Sequence[str]] = None, k: int = DEFAULT_K,
                      multiple_assignment: int = DEFAULT_MULTIPLE_ASSIGNMENT,
                      alpha: Optional[float] = None, tau: Optional[float] = None,
                      use_idf: Optional[bool] = None, timings: Optional[dict] = None) -> Neighbours:
    """Search a batch of query images given as a list of (n_i, d) descriptor arrays.

    timings: if a dict, seconds spent in "quantise", "aggregate" and "search" are added to it.
    """
    from . import asmk
    index, codebook = _load(index, codebook)
    query_keys = [str(i) for i in range(len(descriptors))] if query_keys is None else list(query_keys)
    if len(query_keys) != len(descriptors):
        raise ValueError(f"{len(query_keys)} query keys for {len(descriptors)} descriptor sets")
    counts = np.array([len(d) for d in descriptors], np.int64)
    parts = [np.asarray(d, np.float32) for d in descriptors if len(d)]
    desc = np.concatenate(parts) if parts else np.zeros((0, codebook.dim), np.float32)
    if desc.ndim != 2 or desc.shape[1] != codebook.dim:
        raise ValueError(f"query descriptors of dimension {desc.shape[1:]} do not match the codebook's {codebook.dim}")
    t0 = time.perf_counter()
    ma = min(int(multiple_assignment), len(codebook.centroids))
    words = codebook.assign(desc, ma)
    t1 = time.perf_counter()
    agg = asmk.aggregate(desc, words, codebook.centroids, np.repeat(np.arange(len(descriptors)), counts),
                         binary=index.binary)
    t2 = time.perf_counter()
    result = index.search_aggregated(agg, k=k, query_keys=query_keys, alpha=alpha, tau=tau, use_idf=use_idf)
    t3 = time.perf_counter()
    _add_time(timings, "quantise", t1 - t0)
    _add_time(timings, "aggregate", t2 - t1)
    _add_time(timings, "search", t3 - t2)
    return result


def query_store(index, codebook, features_path, k: int = DEFAULT_K,
                multiple_assignment: int = DEFAULT_MULTIPLE_ASSIGNMENT, keys: Optional[Sequence[str]] = None,
                batch_size: int = 32, alpha: Optional[float] = None, tau: Optional[float] = None,
                use_idf: Optional[bool] = None, show_progress: bool = True,
                timings: Optional[dict] = None) -> Neighbours:
    """Rank the database for every image of a query feature store (or ``keys`` of it)."""
    from .features import FeatureStore
    from .ivf import check_extractor
    index, codebook = _load(index, codebook)
    with FeatureStore(features_path, "r") as store:
        check_extractor(store.config, index.extractor, features_path, index.path or "the index")
        keys = store.keys() if keys is None else list(keys)
        indices, scores = [np.zeros((0, k), np.int64)], [np.zeros((0, k), np.float32)]
        db_keys = None
        bar = progress(total=len(keys), desc="query", unit="img", disable=None if show_progress else True)
        for start in range(0, len(keys), batch_size):
            batch = keys[start:start + batch_size]
            descs = [store.descriptors(key) for key in batch]
            part = query_descriptors(index, codebook, descs, batch, k=k,
                                     multiple_assignment=multiple_assignment, alpha=alpha, tau=tau,
                                     use_idf=use_idf, timings=timings)
            indices.append(part.indices)
            scores.append(part.scores)
            db_keys = part.db_keys  # the same index answers every batch
            bar.update(len(batch))
        bar.close()
    return Neighbours(keys, index._keys if db_keys is None else db_keys,
                      np.concatenate(indices), np.concatenate(scores))


def read_image_list(images) -> Tuple[Path, List[str]]:
    """(image root, keys) from a folder of images, a JSON list (Met format: [{"path": ...}] or
    plain strings) or a text file with one path per line (paths relative to the list's folder,
    or to its ``images/`` subfolder when that exists, like the Met loader)."""
    from .images import list_images
    images = Path(images)
    if images.is_dir():
        return images, list_images(images)
    if not images.exists():
        raise FileNotFoundError(f"{images}: no such image folder or list")
    text = images.read_text()
    if images.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{images}: not valid JSON ({exc})") from None
        keys = [e["path"] if isinstance(e, dict) else str(e) for e in entries]
    else:
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    root = images.parent / "images" if (images.parent / "images").is_dir() else images.parent
    return root, keys


def query_images(index, codebook, images, image_root=None, k: int = DEFAULT_K,
                 multiple_assignment: int = DEFAULT_MULTIPLE_ASSIGNMENT, model=None, config=None,
                 device: str = "cpu", features_out=None, workers: Optional[int] = None,
                 extract_batch_size: int = 1, **kwargs) -> Neighbours:
    """Extract the features of query images (a folder or a list, see read_image_list) with
    ``model`` -- which must carry the PCA-whitening the database was extracted with -- into a
    temporary store (or ``features_out``), then query."""
    from .extract import extract_to_store
    root, keys = read_image_list(images)
    if image_root is not None:
        root = Path(image_root)
    if model is not None and not model.has_whitening:
        raise ValueError("query images need the model the database was extracted with, including its "
                         "learned whitening (how-met extract --save-model, then --checkpoint)")
    with tempfile.TemporaryDirectory(prefix="how-met-query-") as tmp:
        store_path = Path(features_out) if features_out else Path(tmp) / "queries.h5"
        extract_to_store(root, keys, store_path, config=config, model=model, device=device,
                         workers=workers, batch_size=extract_batch_size)
        return query_store(index, codebook, store_path, k=k, multiple_assignment=multiple_assignment,
                           keys=keys, **kwargs)


# -- CLI ----------------------------------------------------------------------------------------

def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, required=True, help="inverted file (directory or .h5)")
    p.add_argument("--codebook", type=Path, required=True, help="codebook the index was built with")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", type=Path, help="feature store of the query images")
    src.add_argument("--images", type=Path,
                     help="query images: a folder, or a list (.json Met-style or .txt, one path a line)")
    p.add_argument("--out", type=Path, required=True, help="results file (.h5 or .json)")
    p.add_argument("-k", type=int, default=DEFAULT_K, help=f"neighbours per query (default {DEFAULT_K})")
    p.add_argument("--multiple-assignment", type=int, default=DEFAULT_MULTIPLE_ASSIGNMENT,
                   help=f"visual words per query descriptor (default {DEFAULT_MULTIPLE_ASSIGNMENT})")
    p.add_argument("--alpha", type=float, help="selective-kernel exponent (default: the index's, 3)")
    p.add_argument("--tau", type=float, help="selective-kernel threshold (default: the index's, 0)")
    p.add_argument("--idf", dest="use_idf", action="store_true", default=None, help="idf-weighted scores")
    p.add_argument("--query-batch", type=int, default=32, help="query images searched together")
    p.add_argument("--image-root", type=Path, help="with --images LIST: folder the listed paths are relative to")
    p.add_argument("--save-features", type=Path, help="with --images: keep the extracted query features here")
    p.add_argument("--rerank", action="store_true",
                   help="rerank each query's top-k with spatial verification (needs --db-features)")
    p.add_argument("--db-features", type=Path, help="with --rerank: the database feature store")
    try:  # the extractor's model options (--checkpoint, --config, --device, ...)
        from .extract import add_model_arguments
        add_model_arguments(p)
    except ImportError:  # extractor unavailable: only --features works
        pass


def run_cli(args) -> int:
    configure_threads()
    options = dict(k=args.k, multiple_assignment=args.multiple_assignment, alpha=args.alpha, tau=args.tau,
                   use_idf=args.use_idf, batch_size=args.query_batch)
    if args.rerank and args.db_features is None:
        raise ValueError("--rerank needs --db-features: the database feature store the index was built from")
    index, codebook = _load(args.index, args.codebook)
    with tempfile.TemporaryDirectory(prefix="how-met-query-") as tmp:
        query_features = args.features
        if args.features is not None:
            result = query_store(index, codebook, args.features, **options)
        else:
            from .extract import config_from_args, model_from_args
            if not getattr(args, "checkpoint", None):
                raise ValueError("--images needs --checkpoint: the model (with its learned whitening) the "
                                 "database features were extracted with")
            config = config_from_args(args)
            # extract queries as the database was, unless an option says otherwise
            recorded = index.extractor or {}
            for name in ("scales", "features_num", "image_size", "gem"):
                if name in recorded and getattr(args, name, None) is None:
                    config[name] = recorded[name]
            model = model_from_args(args, config)
            query_features = args.save_features or Path(tmp) / "queries.h5"
            result = query_images(index, codebook, args.images, image_root=args.image_root, model=model,
                                  config=config, device=args.device, features_out=query_features,
                                  workers=args.workers, extract_batch_size=args.batch_size, **options)
        if args.rerank:
            # Spatial verification of each query's ASMK top-k, fused with its ASMK score.
            from .rerank import Reranker, rerank_neighbours
            with Reranker(args.db_features, codebook, index=index,
                          multiple_assignment=args.multiple_assignment) as reranker:
                result = rerank_neighbours(reranker, query_features, result)
    result.save(args.out)
    answered = int((result.indices[:, 0] >= 0).sum()) if len(result) else 0
    print(json.dumps({"results": str(args.out), "queries": len(result), "with_neighbours": answered,
                      "k": args.k, "reranked": bool(args.rerank)}))
    return 0
