"""Querying with photos: query images (a folder or a list) -> features extracted with the
database's model -> ASMK search -> optionally reranked by spatial verification."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from ..asmk.codebook import load_codebook
from ..asmk.inverted_file import load_index
from ..asmk.query import query_store
from ..asmk.settings import DEFAULT_K, DEFAULT_MULTIPLE_ASSIGNMENT
from ..features.settings import OVERRIDABLE, with_legacy_defaults
from ..neighbours import Neighbours


def read_image_list(images) -> Tuple[Path, List[str]]:
    """(image root, keys) from a folder of images, a JSON list (Met format: [{"path": ...}] or
    plain strings) or a text file with one path per line (paths relative to the list's folder,
    or to its ``images/`` subfolder when that exists, like the Met loader). Listed paths follow
    the ground truth's rule (relative, no '..')."""
    from ..datasets import entry_path, read_entries, relative_key
    from ..features.images import list_images
    images = Path(images)
    if images.is_dir():
        return images, list_images(images)
    if not images.exists():
        raise FileNotFoundError(f"{images}: no such image folder or list")
    if images.suffix.lower() == ".json":
        keys = [entry_path(images, i, e, plain_strings=True) for i, e in enumerate(read_entries(images))]
    else:
        try:
            lines = images.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{images}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        keys = [relative_key(f"{images}: line {n}", line) for n, line in enumerate(lines, 1)
                if line.strip() and not line.startswith("#")]
    root = images.parent / "images" if (images.parent / "images").is_dir() else images.parent
    return root, keys


def query_images(index, codebook, images, image_root=None, k: int = DEFAULT_K,
                 multiple_assignment: int = DEFAULT_MULTIPLE_ASSIGNMENT, model=None, config=None,
                 device: str = "cpu", features_out=None, workers: Optional[int] = None,
                 extract_batch_size: int = 1, **kwargs) -> Neighbours:
    """Extract the features of query images (a folder or a list, see read_image_list) with
    ``model`` -- which must carry the PCA-whitening the database was extracted with -- into a
    temporary store (or ``features_out``), then query."""
    from ..features.extract import extract_to_store
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



def query_config(index_extractor: dict, config: dict, explicit=()) -> dict:
    """Extraction settings for query images: those the database was extracted with (recorded
    in the index), except the ones in ``explicit`` (given on purpose)."""
    config = dict(config)
    recorded = with_legacy_defaults(index_extractor or {})
    for name in OVERRIDABLE + ("gem",):
        if name in recorded and name not in explicit:
            config[name] = recorded[name]
    return config


def run_query(index, codebook, out, features=None, images=None, checkpoint=None, config=None,
              explicit=(), image_root=None, save_features=None, device: str = "cpu",
              workers: Optional[int] = None, extract_batch_size: int = 1, rerank: bool = False,
              db_features=None, **options) -> Neighbours:
    """What ``how-met query`` does: rank the database for a query feature store
    (``features``) or for photos (``images``, extracted with ``checkpoint`` -- the model the
    database was extracted with -- and ``config``, see ``query_config``), optionally rerank
    each top-k by spatial verification against ``db_features``, and save the result to ``out``.
    ``options``: k, multiple_assignment, alpha, tau, use_idf, batch_size, batch_mb (see query_store)."""
    if rerank and db_features is None:
        raise ValueError("--rerank needs --db-features: the database feature store the index was built from")
    codebook = load_codebook(codebook)
    index = load_index(index, codebook)
    with tempfile.TemporaryDirectory(prefix="how-met-query-") as tmp:
        query_features = features
        if features is not None:
            result = query_store(index, codebook, features, **options)
        else:
            if not checkpoint:
                raise ValueError("--images needs --checkpoint: the model (with its learned whitening) the "
                                 "database features were extracted with")
            from ..features.checkpoints import load_model
            from ..features.settings import check_extraction_config, default_config
            config = check_extraction_config(query_config(index.extractor, config or default_config(), explicit),
                                             f"{index.path}: extraction settings")
            model = load_model(checkpoint, device)
            query_features = save_features or Path(tmp) / "queries.h5"
            result = query_images(index, codebook, images, image_root=image_root, model=model,
                                  config=config, device=device, features_out=query_features,
                                  workers=workers, extract_batch_size=extract_batch_size, **options)
        if rerank:
            # Spatial verification of each query's ASMK top-k, fused with its ASMK score.
            from ..verify.reranker import Reranker
            from ..verify.scores import rerank_neighbours
            with Reranker(db_features, codebook, index=index,
                          multiple_assignment=options.get("multiple_assignment",
                                                          DEFAULT_MULTIPLE_ASSIGNMENT)) as reranker:
                result = rerank_neighbours(reranker, query_features, result)
    result.save(out)
    return result
