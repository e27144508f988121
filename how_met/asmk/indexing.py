"""Building an inverted file from a feature store (streamed in batches)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .aggregation import aggregate_batch
from .inverted_file import InvertedFile
from ..features.settings import check_extractor, check_model
from ..utils import progress


def _load_codebook(codebook):
    from .codebook import Codebook
    return codebook if isinstance(codebook, Codebook) else Codebook.load(codebook)


def iter_batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build_index(features_path, codebook, out, append: bool = False, batch_size: int = 64,
                use_idf: bool = False, binary: bool = True, keys: Optional[Sequence[str]] = None,
                show_progress: bool = True) -> InvertedFile:
    """Index the images of a feature store (streamed in batches) and save the index to ``out``.

    append: extend an existing index at ``out`` with the store's images it does not hold yet
    (created if missing). Memory: one batch of descriptors plus the index itself.
    """
    from ..features.store import FeatureStore
    codebook = _load_codebook(codebook)
    out = Path(out)
    with FeatureStore(features_path, "r") as store:
        extractor = store.config
        codebook_name = codebook.path or "the codebook"
        check_extractor(extractor, codebook.meta.get("extractor") or {}, features_path, codebook_name)
        check_model(store.model_fingerprint, codebook.model_fingerprint, features_path, codebook_name)
        if append and out.exists():
            ivf = InvertedFile.load(out, mmap=True)
            ivf.check_codebook(codebook)
            check_extractor(extractor, ivf.extractor, features_path, out)
            check_model(store.model_fingerprint, ivf.model_fingerprint, features_path, out)
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
            ivf.add_aggregated(batch, aggregate_batch(codebook, descs, 1, ivf.binary))
            bar.update(len(batch))
        bar.close()
    ivf.save(out)
    return ivf

