"""Building an inverted file: from a feature store (``build_index``, streamed in batches), or
for a large database from compact per-image records (``how_met.asmk.records``) streamed from
stores or straight from the images (``records_from_stores``, ``records_from_images``), then
assembled on disk (``index_from_records``)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..features.settings import check_extractor, check_model
from ..features.store import FeatureStore
from .aggregation import quantise_and_aggregate
from .codes import code_words
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


# ---------------------------------------------------------------------------------------------
# Streaming: features -> compact records -> inverted file assembled on disk
# ---------------------------------------------------------------------------------------------


def _append_records(records, codebook, items, batch_size: int, bar) -> int:
    """Quantise (1 assignment) and aggregate (key, LocalFeatures) items a batch at a time, as
    ``build_index`` does, and append each image's record. Returns the number written."""
    written = 0
    batch: list = []

    def flush_batch():
        descs = [np.asarray(feats.descriptors, np.float32) for _, feats in batch]
        for (key, _), d in zip(batch, descs):
            if d.ndim != 2 or (len(d) and d.shape[1] != codebook.dim):
                raise ValueError(f"descriptors of {key!r} are {d.shape}, the codebook's dimension is "
                                 f"{codebook.dim}")
        words, aggregated = quantise_and_aggregate(codebook, descs, 1, True)
        firsts = np.cumsum([0] + [len(d) for d in descs])
        bounds = np.searchsorted(aggregated.images, np.arange(len(batch) + 1))
        for i, (key, feats) in enumerate(batch):
            a, b = bounds[i], bounds[i + 1]
            records.write(key, feats, words[firsts[i]:firsts[i + 1], 0], aggregated.words[a:b],
                          aggregated.vectors[a:b])
        bar.update(len(batch))
        batch.clear()

    for key, feats in items:
        batch.append((key, feats))
        if len(batch) >= batch_size:
            written += len(batch)
            flush_batch()
            records.flush()
    if batch:
        written += len(batch)
        flush_batch()
    return written


def _pq_training(sources: Sequence, images: int = 256):
    """A function drawing the unit descriptors a pq records file's quantiser is trained on:
    about TRAIN_POINTS of them from up to ``images`` images spread evenly over ``sources``
    ((FeatureStore, key) pairs), a seeded random subset of each image's. Called only when a new
    pq file is created."""
    def draw() -> np.ndarray:
        from ..utils import l2_normalise
        from .pq import TRAIN_POINTS
        chosen = [sources[i] for i in np.unique(np.linspace(0, len(sources) - 1, min(images, len(sources)))
                                                .astype(int))] if len(sources) else []
        per_image = -(-TRAIN_POINTS // max(len(chosen), 1))
        rng = np.random.default_rng(0)
        parts = []
        for store, key in chosen:
            d = np.asarray(store.descriptors(key), np.float32)
            if len(d) > per_image:
                d = d[np.sort(rng.choice(len(d), per_image, replace=False))]
            parts.append(l2_normalise(d))
        if not parts or not sum(len(p) for p in parts):
            raise ValueError("no descriptors to train the records' product quantiser on")
        return np.concatenate(parts)
    return draw


def _open_records(records_path, codebook, descriptors: str, extractor: dict, model_fingerprint, source,
                  pq_code: Optional[str] = None, pq_training=None):
    from .records import RecordStore, records_settings
    codebook_name = codebook.path or "the codebook"
    check_extractor(extractor, codebook.meta.get("extractor") or {}, source, codebook_name)
    check_model(model_fingerprint, codebook.model_fingerprint, source, codebook_name)
    settings = records_settings(codebook, descriptors, extractor, model_fingerprint or codebook.model_fingerprint,
                                pq_code)
    return RecordStore(records_path, "a", settings, pq_training=pq_training)


def records_from_stores(stores: Sequence, codebook, records_path, descriptors: str = "int8",
                        batch_size: int = 64, show_progress: bool = True, pq_code: Optional[str] = None,
                        keys: Optional[Sequence[str]] = None) -> dict:
    """Append the compact record (``how_met.asmk.records``) of every image of one or several
    feature stores (e.g. the shards of an extraction, as they are finished) that the records
    file does not hold yet, and its aggregated vectors to the records' sidecar. Memory: one
    batch. A new "pq" file trains its quantiser on a sample of the stores' descriptors. ``keys``:
    only these images of the stores (default all). Returns {"written", "skipped"}."""
    codebook = load_codebook(codebook)
    opened = [FeatureStore(path, "r") for path in stores]
    try:
        first = opened[0]
        for store in opened[1:]:
            if store.config != first.config or store.model_fingerprint != first.model_fingerprint:
                raise ValueError(f"{store.path}: extractor or model differs from {first.path}'s")
        wanted = None if keys is None else set(keys)
        listed = {id(store): [k for k in store.keys() if wanted is None or k in wanted] for store in opened}
        every = [(store, key) for store in opened for key in listed[id(store)]]
        with _open_records(records_path, codebook, descriptors, first.config, first.model_fingerprint,
                           first.path, pq_code, _pq_training(every)) as records:
            todo, seen = [], set(records.keys())  # a key of several shards is taken once
            for store in opened:
                todo.extend((store, key) for key in listed[id(store)] if key not in seen)
                seen.update(listed[id(store)])
            skipped = sum(len(listed[id(store)]) for store in opened) - len(todo)
            bar = progress(total=len(todo), desc="records", unit="img", disable=None if show_progress else True)
            items = ((key, store.read(key, with_global=False)) for store, key in todo)
            written = _append_records(records, codebook, items, batch_size, bar)
            bar.close()
    finally:
        for store in opened:
            store.close()
    return {"written": written, "skipped": skipped}


def records_from_images(image_root, keys: Sequence[str], like, codebook, records_path,
                        descriptors: str = "int8", batch_size: int = 64, device: str = "cpu",
                        workers: Optional[int] = None, skip_bad: bool = False, ray=None,
                        pq_code: Optional[str] = None) -> dict:
    """Extract the images ``keys`` with the model and settings of the feature store ``like``
    (the sample the codebook was trained on) and stream them straight into the records file:
    no raw descriptors are written. Images the records file holds are skipped (resume after a
    crash). ``ray``: extract on a Ray cluster, as ``extract_to_store(..., ray=...)`` does (True,
    an address or a ``RayExtraction``); this process still writes every record. A new "pq" file
    trains its quantiser on descriptors of ``like``. Returns {"written", "skipped"}."""
    from ..features.extract import iter_features
    codebook = load_codebook(codebook)
    with FeatureStore(like, "r") as sample:
        extractor, fingerprint = sample.config, sample.model_fingerprint
        records = _open_records(records_path, codebook, descriptors, extractor, fingerprint, like, pq_code,
                                _pq_training([(sample, key) for key in sample.keys()]))
    with records:
        keys = sorted(dict.fromkeys(keys))
        todo = [k for k in keys if k not in records]
        bar = progress(total=len(todo), desc="records", unit="img", disable=True)  # extraction shows one
        with contextlib.closing(iter_features(image_root, todo, like, device=device, workers=workers,
                                              skip_bad=skip_bad, ray=ray)) as items:
            written = _append_records(records, codebook, items, batch_size, bar)
    return {"written": written, "skipped": len(keys) - len(todo)}


def index_from_records(records_path, out, use_idf: bool = False, keys: Optional[Sequence[str]] = None,
                       show_progress: bool = True) -> InvertedFile:
    """Assemble the binary inverted file of the images in a records file (default all, in key
    order: the same arrays as ``build_index`` over a store of those images) and save it to the
    directory ``out``. The aggregated vectors come from the records' sidecar
    (``<records>.vectors``), which may be deleted afterwards. Two passes over the vectors (count the postings of every word, then
    copy each image's codes to its words' places in memory-mapped arrays on disk): memory is
    the per-word offsets and a few bytes per image, whatever the size of the postings. Returns
    the saved index (memory-mapped)."""
    import shutil
    import tempfile

    from numpy.lib.format import open_memmap

    from .records import RecordStore
    out = Path(out)
    if out.suffix.lower() in (".h5", ".hdf5"):
        raise ValueError(f"{out}: an index assembled from records is a directory (give a path without .h5)")
    with RecordStore(records_path, "r") as records:
        settings = records.settings
        keys = records.keys() if keys is None else sorted(dict.fromkeys(keys))
        missing = [k for k in keys if k not in records]
        if missing:
            raise KeyError(f"{records_path}: no record of {missing[0]!r} ({len(missing)} missing)")
        n_words, hide = int(settings["n_words"]), None if show_progress else True
        counts = np.zeros(n_words, np.int64)
        n_vectors = np.zeros(len(keys), np.uint32)
        for i, key in enumerate(progress(keys, desc="index: count", unit="img", disable=hide)):
            words, _ = records.read_words(key)
            counts[words] += 1  # an image's words are unique
            n_vectors[i] = len(words)
        offsets = np.zeros(n_words + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".postings", dir=out.parent))
        try:
            width = code_words(int(settings["dim"]))
            vectors = open_memmap(scratch / "vectors.npy", "w+", np.uint64, (int(offsets[-1]), width))
            image_ids = open_memmap(scratch / "image_ids.npy", "w+", np.uint32, (int(offsets[-1]),))
            cursor = offsets[:-1].copy()
            for i, key in enumerate(progress(keys, desc="index: fill", unit="img", disable=hide)):
                words, codes = records.read_words(key)
                places = cursor[words]
                vectors[places] = codes
                image_ids[places] = i
                cursor[words] += 1
            ivf = InvertedFile.from_postings(keys, offsets, vectors, image_ids, n_vectors,
                                             dim=int(settings["dim"]), binary=True, use_idf=use_idf,
                                             codebook_fingerprint=settings["codebook_fingerprint"],
                                             extractor=settings["extractor"],
                                             model_fingerprint=settings["model_fingerprint"])
            ivf.save(out)
            del vectors, image_ids, ivf
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return InvertedFile.load(out)
