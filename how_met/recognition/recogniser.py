"""Photo in, exhibit out: a self-contained recogniser directory and the class that answers with it.

A recogniser directory -- ``how-met evaluate`` writes one tuned on validation queries,
``how-met recogniser`` builds one with documented defaults -- holds plain files only::

    recogniser.json       method, (K, t), fusion/rerank settings, extraction settings, the
                          accept threshold and the validation figures it was chosen on
    exhibits.json         [{"path": database image key, "id": exhibit id}] (Met database format)
    model.pt              the HOW model, its PCA-whitening included (torch weights only)
    database.h5           local + global features of the database images
    codebook.npz          visual words;   index/   the binary ASMK inverted file
    global_whitening.npz  PCA-whitening of the global descriptors

Every file records the fingerprint of the model that made its descriptors; loading refuses a
directory whose files disagree. :class:`Recogniser` loads once and answers many photos;
``add_exhibits`` extends the database without rebuilding (the model, codebook and both
whitenings stay; new images are extracted and appended to the index).

An answer ranks the database with the recogniser's method exactly as ``how-met evaluate``
ranked it for that method, classifies with the kNN rule at (K, t), and accepts the predicted
exhibit when its log-odds reach the threshold (see ``acceptance``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..datasets import DISTRACTOR
from ..utils import write_json
from . import knn
from .fusion import fuse_neighbours

logger = logging.getLogger(__name__)

FORMAT = "how-met-recogniser"
FORMAT_VERSION = 1
METHODS = ("global", "how-asmk", "fusion", "global+rerank")
TOP = 5  # candidates listed per answer

SETTINGS_FILE, EXHIBITS_FILE, MODEL_FILE = "recogniser.json", "exhibits.json", "model.pt"
DATABASE_FILE, CODEBOOK_FILE = "database.h5", "codebook.npz"
INDEX_DIR, GLOBAL_WHITENING_FILE = "index", "global_whitening.npz"

# What ``how-met recogniser`` uses without validation queries to tune on. Measured with the
# default extractor, parts and fusion weights on all queries of each shared set (global+rerank,
# README "Recognise photos of your collection"): K = 3, t = 20 is within 2 GAP of each set's
# best (museum 99.3, grocery 84.7, landmarks 91.5), and accepting from log-odds 2.0 gave
# precision 1.0 on all three, answering 94% / 27% / 67% of the positives. K = 2, t = 10 has the
# best mean GAP but compresses the log-odds: from 2.0 it accepts nothing on grocery.
UNTUNED = {"method": "global+rerank", "K": 3, "t": 20.0, "fusion": None, "accept_log_odds": 2.0}


class RecogniserError(ValueError):
    """A recogniser directory that cannot be used as asked (the message names the file)."""


@dataclass
class Answer:
    """One photo's answer; ``as_dict`` is the JSON object ``how-met identify`` prints."""

    image: str
    exhibit: Optional[Union[int, str]]      # the accepted exhibit; None when rejected
    confidence: float                       # of the predicted exhibit, sigmoid(log_odds)
    log_odds: float                         # what the threshold applies to (never saturates)
    accepted: bool
    top: List[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"image": self.image, "exhibit": self.exhibit, "confidence": self.confidence,
                "log_odds": self.log_odds if np.isfinite(self.log_odds) else None,
                "accepted": self.accepted, "top": self.top}


def _plain(value):
    """A JSON-native exhibit id (numpy integers from label arrays become int)."""
    return int(value) if isinstance(value, (int, np.integer)) else str(value)


def read_exhibits(path: Path) -> Tuple[List[str], list]:
    """(database image keys, exhibit ids) of an exhibits.json."""
    try:
        entries = json.loads(Path(path).read_text())
        return [str(e["path"]) for e in entries], [_plain(e["id"]) for e in entries]
    except FileNotFoundError:
        raise RecogniserError(f"{path}: missing (not a recogniser directory?)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise RecogniserError(f"{path}: not a list of {{'path', 'id'}} entries ({exc})") from None


def read_settings(directory: Path) -> dict:
    path = Path(directory) / SETTINGS_FILE
    try:
        settings = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecogniserError(f"{path}: missing (not a recogniser directory; how-met evaluate or how-met "
                              f"recogniser writes one)") from None
    except ValueError as exc:
        raise RecogniserError(f"{path}: not valid JSON ({exc})") from None
    if settings.get("format") != FORMAT:
        raise RecogniserError(f"{path}: not a how-met recogniser (format {settings.get('format')!r})")
    if int(settings.get("format_version", 0)) > FORMAT_VERSION:
        raise RecogniserError(f"{path}: format version {settings['format_version']} is newer than this how-met")
    if settings.get("method") not in METHODS:
        raise RecogniserError(f"{path}: unknown method {settings.get('method')!r}")
    return settings


class Recogniser:
    """A recogniser directory, loaded once, answering many photos::

        recogniser = Recogniser("museum-recogniser")
        answer = recogniser.recognise("visitor.jpg")
        answer.exhibit, answer.confidence, answer.accepted, answer.top[0]["inliers"]
    """

    def __init__(self, directory, device: str = "cpu"):
        from ..asmk.codebook import Codebook
        from ..features.checkpoints import load_model
        from ..features.extract import inference_copy
        from ..features.network import model_fingerprint
        from ..features.whitening import PCAWhitening
        self.directory = Path(directory)
        self.settings = read_settings(self.directory)
        self.model = load_model(str(self.directory / MODEL_FILE), device)
        self._runner = inference_copy(self.model)
        self.fingerprint = model_fingerprint(self.model)
        self.codebook = Codebook.load(self.directory / CODEBOOK_FILE)
        self.whitening = PCAWhitening.load(self.directory / GLOBAL_WHITENING_FILE)
        self._open_database()

    def _open_database(self) -> None:
        """(Re)open the database files and the exhibit list, checked to belong together."""
        from ..asmk.inverted_file import InvertedFile
        from ..features.settings import check_model
        from ..features.store import FeatureStore
        from ..verify.reranker import Reranker
        model_file = self.directory / MODEL_FILE
        self.index = InvertedFile.load(self.directory / INDEX_DIR, mmap=True)
        self.index.check_codebook(self.codebook)
        self.store = FeatureStore(self.directory / DATABASE_FILE, "r")
        for name, recorded in ((self.store.path, self.store.model_fingerprint),
                               (self.codebook.path, self.codebook.model_fingerprint),
                               (self.index.path, self.index.model_fingerprint)):
            check_model(recorded, self.fingerprint, name, model_file)
        self.reranker = Reranker(self.store, self.codebook,
                                 multiple_assignment=self.settings["multiple_assignment"])
        self.keys, self.exhibit_ids = read_exhibits(self.directory / EXHIBITS_FILE)
        missing = [k for k in self.keys if k not in self.index]
        if missing:
            raise RecogniserError(f"{self.index.path}: lacks {len(missing)} images of {EXHIBITS_FILE} (e.g. "
                                  f"{missing[0]!r}): an interrupted add-exhibits; run it again")
        names = list(dict.fromkeys(map(str, self.exhibit_ids)))
        label_of = {name: i for i, name in enumerate(names)}
        self.labels = np.array([label_of[str(e)] for e in self.exhibit_ids], np.int64)
        self.n_exhibits = len(names)
        self._exhibit_of_label = {label_of[str(e)]: e for e in self.exhibit_ids}
        self.db_global = self.whitening.apply(self.store.global_descriptors(self.keys))
        position = {k: i for i, k in enumerate(self.keys)}
        # index positions -> exhibit-list positions (-1: not listed, or padding)
        self._from_index = np.array([position.get(k, -1) for k in self.index._keys] + [-1], np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def close(self) -> None:
        self.reranker.close()
        self.store.close()

    def __enter__(self) -> "Recogniser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- answering ---------------------------------------------------------------------------------
    def features(self, image):
        """Local + global features of one photo (a path, a PIL image or an (H, W, 3) uint8 RGB
        array), extracted as the database was."""
        from ..features.extract import extract_image
        return extract_image(self._runner, image, self.settings["extract"])

    def recognise(self, image, name: Optional[str] = None) -> Answer:
        """Which exhibit ``image`` shows, how sure, and the best candidates with their evidence."""
        if name is None:
            name = str(image) if isinstance(image, (str, os.PathLike)) else "image"
        return self.answer(self.features(image), name)

    def rank(self, feats, prepared) -> Tuple[np.ndarray, np.ndarray]:
        """(exhibit-list positions, scores) of the database ranked by the recogniser's method."""
        from ..asmk.query import query_descriptors
        from ..verify.scores import FusionWeights, fuse_scores
        from .global_search import global_search
        s = self.settings
        k = int(s["shortlist"])
        g_idx, g_scores = global_search(self.db_global, self.whitening.apply(feats.global_descriptor[None]), k)
        if s["method"] == "global":
            return g_idx[0], g_scores[0]
        if s["method"] == "global+rerank":
            valid = g_idx[0] >= 0
            candidates = g_idx[0][valid]
            asmk, inliers, _ = self.reranker.score_candidates(prepared, [self.keys[i] for i in candidates])
            fused = fuse_scores(g_scores[0][valid], asmk, inliers, FusionWeights(**s["fusion"]))
            order = np.argsort(-fused, kind="stable")
            return candidates[order], fused[order].astype(np.float32)
        found = query_descriptors(self.index, self.codebook, [feats.descriptors], k=k,
                                  multiple_assignment=s["multiple_assignment"])
        a_idx, a_scores = self._from_index[found.indices], found.scores
        if s["method"] == "how-asmk":
            return a_idx[0], a_scores[0]
        indices, scores = fuse_neighbours(g_idx, g_scores, a_idx, a_scores, s["fusion"]["weight"])
        return indices[0], scores[0]

    def answer(self, feats, name: str = "image") -> Answer:
        """The answer for features already extracted (see ``features``)."""
        s = self.settings
        prepared = self.reranker.prepare_query(feats, name)
        indices, scores = self.rank(feats, prepared)
        prediction = knn.knn_predict(indices[None], scores[None], self.labels, s["K"], s["t"], self.n_exhibits)
        label, log_odds = int(prediction.labels[0]), float(prediction.log_odds[0])
        threshold = s["accept"]["log_odds"]
        accepted = label != DISTRACTOR and threshold is not None and log_odds >= threshold
        global_of = self.db_global @ self.whitening.apply(feats.global_descriptor[None])[0]
        return Answer(image=name, exhibit=self._exhibit_of_label[label] if accepted else None,
                      confidence=float(prediction.confidence[0]), log_odds=log_odds, accepted=bool(accepted),
                      top=self._evidence(prepared, indices[:TOP], scores[:TOP], global_of))

    def _evidence(self, prepared, indices, scores, global_of) -> List[dict]:
        """Score components of the listed candidates: global cosine, ASMK score, inliers."""
        keep = indices >= 0
        indices, scores = indices[keep], scores[keep]
        keys = [self.keys[i] for i in indices]
        asmk, inliers, details = self.reranker.score_candidates(prepared, keys)
        return [{"exhibit": self.exhibit_ids[i], "image": key, "score": float(score),
                 "global": float(global_of[i]), "asmk": float(a), "inliers": int(n),
                 "tentative": int(d["tentative"])}
                for i, key, score, a, n, d in zip(indices, keys, scores, asmk, inliers, details)]

    # -- growing ---------------------------------------------------------------------------------
    def add_exhibits(self, image_root, keys: Sequence[str], exhibit_ids: Sequence, skip_bad: bool = False) -> int:
        """Add database images (paths relative to ``image_root``) of the given exhibits, new or
        known, without rebuilding: their features are extracted with the recogniser's model and
        appended to the database and the index. Returns the number of images added; an
        interrupted call resumes where it stopped when run again."""
        from ..asmk.indexing import build_index
        from ..features.extract import extract_to_store
        from ..features.store import FeatureStore
        if len(keys) != len(exhibit_ids):
            raise ValueError(f"{len(keys)} images for {len(exhibit_ids)} exhibit ids")
        known = dict(zip(self.keys, map(str, self.exhibit_ids)))
        for key, exhibit in zip(keys, exhibit_ids):
            if key in known and known[key] != str(exhibit):
                raise RecogniserError(f"{key}: already in {self.directory} as an image of exhibit {known[key]}")
        new = {k: _plain(e) for k, e in zip(keys, exhibit_ids) if k not in known}
        if not new:
            return 0
        self.close()
        database = self.directory / DATABASE_FILE
        extract_to_store(image_root, list(new), database, config=self.settings["extract"], model=self.model,
                         skip_bad=skip_bad, workers=0)
        with FeatureStore(database) as store:
            stored = [k for k in new if k in store]
        build_index(database, self.codebook, extend=self.directory / INDEX_DIR, keys=stored,
                    show_progress=False).save(self.directory / INDEX_DIR)
        entries = [{"path": k, "id": e} for k, e in zip(self.keys, self.exhibit_ids)]
        write_json(self.directory / EXHIBITS_FILE, entries + [{"path": k, "id": new[k]} for k in stored])
        self._open_database()
        return len(stored)


# ---------------------------------------------------------------------------------------------
# Writing a recogniser directory
# ---------------------------------------------------------------------------------------------

def write_recogniser(out, *, model_file, features, keys: Sequence[str], exhibit_ids: Sequence,
                     codebook_file, index_dir, global_whitening_file, settings: dict) -> Path:
    """Assemble a recogniser directory from the files of a finished run (copied, never moved):
    the database images ``keys`` of ``features`` with their exhibits, and ``settings`` (method,
    K, t, fusion, multiple_assignment, shortlist, extract, accept, ...). Written under a
    temporary name and renamed into place, so a recogniser at ``out`` is replaced whole or not
    at all."""
    from ..features.store import FeatureStore
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copyfile(model_file, tmp / MODEL_FILE)
    shutil.copyfile(codebook_file, tmp / CODEBOOK_FILE)
    shutil.copyfile(global_whitening_file, tmp / GLOBAL_WHITENING_FILE)
    shutil.copytree(index_dir, tmp / INDEX_DIR)
    with FeatureStore(features, "r") as source, FeatureStore(tmp / DATABASE_FILE, "a") as database:
        database.set_config(source.config)
        if source.model_fingerprint:
            database.set_model_fingerprint(source.model_fingerprint)
        database.set_model_file(tmp / MODEL_FILE)
        for key in keys:
            database.copy_from(source, key)
    write_json(tmp / EXHIBITS_FILE, [{"path": k, "id": _plain(e)} for k, e in zip(keys, exhibit_ids)])
    write_json(tmp / SETTINGS_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION, **settings})
    if out.exists():
        if not (out / SETTINGS_FILE).exists():
            shutil.rmtree(tmp)
            raise RecogniserError(f"{out}: exists and is not a recogniser; not replacing it")
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def exhibits_in_folder(folder) -> Tuple[List[str], List[str]]:
    """(image keys, exhibit ids) of a collection folder: an image in a subfolder belongs to the
    exhibit named by its first folder (``starry-night/front.jpg`` -> ``starry-night``), an image
    at the top level is an exhibit of its own, named by its file name without suffix."""
    from ..features.images import list_images
    keys = list_images(folder)
    if not keys:
        raise FileNotFoundError(f"{folder}: no images")
    return keys, [k.split("/", 1)[0] if "/" in k else Path(k).stem for k in keys]


def build_recogniser(image_root, keys: Sequence[str], exhibit_ids: Sequence, out, config=None,
                     checkpoint: Optional[str] = None, device: str = "cpu", codebook_size: Optional[int] = None,
                     global_dims: int = 128, skip_bad: bool = False, settings: Optional[dict] = None) -> Path:
    """A recogniser for a collection without queries to tune on: features of every image, the
    local PCA-whitening and the codebook chosen as ``evaluate`` chooses them (the shipped,
    corpus-learned ones for a collection smaller than their corpus, ``shipped_parts_for``;
    else learned on the collection, the codebook sized like ``evaluate`` sizes it), the inverted
    file, the global whitening, and the ``UNTUNED`` settings (``settings`` overrides them).
    Intermediate files live in ``<out>.work`` (kept, so an interrupted build resumes)."""
    from ..asmk.codebook import Codebook, codebook_size_for
    from ..asmk.indexing import build_index
    from ..asmk.settings import DEFAULT_K, DEFAULT_MULTIPLE_ASSIGNMENT
    from ..features.checkpoints import build_model
    from ..features.extract import extract_to_store
    from ..features.settings import resolve_config, shipped_parts_for, shipped_path
    from ..features.shipped import apply_whitening
    from ..features.store import FeatureStore
    from ..features.whitening import PCAWhitening
    from ..verify.scores import FusionWeights
    out = Path(out)
    work = out.with_name(out.name + ".work")
    config = resolve_config(config)
    features = work / "features.h5"
    model_file = work / "model.pt"
    shipped = None if checkpoint else shipped_parts_for(config["model"], len(keys))
    model = None
    if not features.exists():  # else the store's own model file continues the extraction
        model = build_model(**config["model"], checkpoint=checkpoint, device=device)
        if shipped:
            apply_whitening(model, shipped)
    extract_to_store(image_root, keys, features, config=config, model=model, device=device, skip_bad=skip_bad,
                     model_out=None if features.exists() else model_file)
    with FeatureStore(features) as store:
        present = [(k, e) for k, e in zip(keys, exhibit_ids) if k in store]
        db_global = store.global_descriptors([k for k, _ in present])
    keys, exhibit_ids = [k for k, _ in present], [e for _, e in present]
    if shipped and not codebook_size:  # the one learned with the shipped whitening
        codebook = Codebook.load(shipped_path(shipped, "codebook"))
    else:
        codebook = Codebook(size=codebook_size or codebook_size_for(features, keys))
        codebook.train(features, keys=keys)
    codebook.save(work / CODEBOOK_FILE)
    build_index(features, codebook, keys=keys).save(work / INDEX_DIR)
    PCAWhitening.learn(db_global, dims=global_dims).save(work / GLOBAL_WHITENING_FILE)
    chosen = {"method": UNTUNED["method"], "K": UNTUNED["K"], "t": UNTUNED["t"],
              "fusion": FusionWeights().as_dict(), "multiple_assignment": DEFAULT_MULTIPLE_ASSIGNMENT,
              "shortlist": DEFAULT_K, "extract": config, "tuned": False, "unsupervised": shipped or "collection",
              "accept": {"log_odds": UNTUNED["accept_log_odds"], "target_precision": None,
                         "chosen_on": "the documented default (no validation queries)"}}
    chosen.update(settings or {})
    return write_recogniser(out, model_file=model_file, features=features, keys=keys, exhibit_ids=exhibit_ids,
                            codebook_file=work / CODEBOOK_FILE, index_dir=work / INDEX_DIR,
                            global_whitening_file=work / GLOBAL_WHITENING_FILE, settings=chosen)
