"""Building an inverted file from a feature store (streamed in batches)."""
from __future__ import annotations

from typing import Optional, Sequence

from ..features.settings import check_extractor, check_model
from ..features.store import FeatureStore
from .aggregation import quantise_and_aggregate
from .codebook import load_codebook
from .inverted_file import InvertedFile, load_index
from ..utils import progress


def iter_batches(items: Sequence, size: int):
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build_index(features_path, codebook, extend=None, batch_size: int = 64, use_idf: bool = False,
                binary: bool = True, keys: Optional[Sequence[str]] = None,
                show_progress: bool = True) -> InvertedFile:
    """Index the images of a feature store (streamed in batches); the caller saves the result.

    extend: an InvertedFile (or the path of a saved one) to add the store's images it does not
    hold yet; default a new index (binary, use_idf). Memory: one batch of descriptors plus the
    index itself.
    """
    codebook = load_codebook(codebook)
    with FeatureStore(features_path, "r") as store:
        if not len(store):
            raise ValueError(f"{features_path}: holds no image features (nothing to index)")
        extractor = store.config
        codebook_name = codebook.path or "the codebook"
        check_extractor(extractor, codebook.meta.get("extractor") or {}, features_path, codebook_name)
        check_model(store.model_fingerprint, codebook.model_fingerprint, features_path, codebook_name)
        if extend is not None:
            ivf = load_index(extend, codebook)
            index_name = ivf.path or "the index"
            check_extractor(extractor, ivf.extractor, features_path, index_name)
            check_model(store.model_fingerprint, ivf.model_fingerprint, features_path, index_name)
        else:
            ivf = InvertedFile(len(codebook.centroids), codebook.dim, binary=binary, use_idf=use_idf,
                               codebook_fingerprint=codebook.fingerprint, extractor=extractor,
                               model_fingerprint=store.model_fingerprint or codebook.model_fingerprint)
        todo = [k for k in (store.keys() if keys is None else keys) if k not in ivf]
        bar = progress(total=len(todo), desc="index", unit="img", disable=None if show_progress else True)
        for batch in iter_batches(todo, batch_size):
            descs = []
            for key in batch:
                d = store.descriptors(key)
                if d.ndim != 2 or (len(d) and d.shape[1] != codebook.dim):
                    raise ValueError(f"{features_path}: descriptors of {key!r} are {d.shape}, the "
                                     f"codebook's dimension is {codebook.dim}")
                descs.append(d)
            ivf.add(batch, quantise_and_aggregate(codebook, descs, 1, ivf.binary)[1])
            bar.update(len(batch))
        bar.close()
    return ivf
