"""The local-feature evidence behind each answer, for the report: for every query and the top
candidate of every method, the inlier correspondences of spatial verification (in original-image
pixels), the tentative count and the score components (global cosine, ASMK score); and the
hloc-style drawing of those correspondences between the two images.

``evidence.h5`` in an evaluation work directory: one group per (query, candidate) pair, named by
a hash of the two keys, with datasets ``query_xy`` and ``db_xy`` (n, 2) and attributes
``query``, ``candidate``, ``inliers``, ``tentative``, ``global``, ``asmk``. Written whole to a
temporary file and renamed, so a crash leaves the previous file.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import h5py
import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ..utils import atomic_path, progress

EVIDENCE_FILE = "evidence.h5"
MATCH_HEIGHT = 240      # pixels of each image in a drawing
GAP = 6                 # pixels between the two images
MAX_LINES = 120         # lines drawn at most (RANSAC order), so dense matches stay legible


def pair_name(query: str, candidate: str) -> str:
    return hashlib.sha1(f"{query}\0{candidate}".encode("utf-8")).hexdigest()[:20]


def stage_evidence(work: Path, features: Path, codebook, pairs: Iterable[Tuple[str, str]],
                   multiple_assignment: int) -> Path:
    """Verify every (query, candidate) pair not in ``work/evidence.h5`` yet and rewrite the file."""
    from ..features.store import FeatureStore
    from ..features.whitening import PCAWhitening
    from ..verify.reranker import Reranker
    path = Path(work) / EVIDENCE_FILE
    pairs = sorted(set(pairs))
    existing = read_evidence(path)
    todo = [p for p in pairs if p not in existing]
    if not todo:
        return path
    whitening = PCAWhitening.load(Path(work) / "global_whitening.npz")
    found: Dict[Tuple[str, str], dict] = dict(existing)
    with FeatureStore(features) as store, Reranker(store, codebook, multiple_assignment=multiple_assignment) as reranker:
        prepared_for, prepared, query_global = None, None, None
        for query, candidate in progress(todo, desc="evidence", unit="pair"):
            if query != prepared_for:  # pairs are sorted: each query is prepared once
                feats = store.read(query)
                prepared, prepared_for = reranker.prepare_query(feats, query), query
                query_global = whitening.apply(feats.global_descriptor[None])[0]
            cand = reranker.candidate(candidate)
            query_xy, db_xy, result, tentative = reranker.inlier_matches(prepared, cand)
            found[(query, candidate)] = {
                "query_xy": query_xy.astype(np.float32), "db_xy": db_xy.astype(np.float32),
                "inliers": int(result.inliers), "tentative": int(tentative),
                "asmk": float(reranker.asmk_scores(prepared, [cand])[0]),
                "global": float(whitening.apply(store.global_descriptors([candidate]))[0] @ query_global)}
    write_evidence(path, found)
    return path


def write_evidence(path: Path, found: Dict[Tuple[str, str], dict]) -> None:
    """Write {(query, candidate): {query_xy, db_xy, inliers, tentative, global, asmk}} atomically."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for (query, candidate), item in found.items():
                group = f.create_group(pair_name(query, candidate))
                group.create_dataset("query_xy", data=np.asarray(item["query_xy"], np.float32).reshape(-1, 2))
                group.create_dataset("db_xy", data=np.asarray(item["db_xy"], np.float32).reshape(-1, 2))
                group.attrs.update(query=query, candidate=candidate, inliers=int(item["inliers"]),
                                   tentative=int(item["tentative"]), asmk=float(item["asmk"]),
                                   **{"global": float(item["global"])})


def read_evidence(path: Path) -> Dict[Tuple[str, str], dict]:
    """{(query, candidate): {query_xy, db_xy, inliers, tentative, global, asmk}} ({} if no file)."""
    path = Path(path)
    if not path.is_file():
        return {}
    out = {}
    try:
        with h5py.File(path, "r") as f:
            for group in f.values():
                a = group.attrs
                out[(str(a["query"]), str(a["candidate"]))] = {
                    "query_xy": group["query_xy"][()], "db_xy": group["db_xy"][()],
                    "inliers": int(a["inliers"]), "tentative": int(a["tentative"]),
                    "global": float(a["global"]), "asmk": float(a["asmk"])}
    except (OSError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable evidence file ({exc})") from None
    return out


def _fit_height(path: Path, height: int) -> Tuple[Image.Image, float]:
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        zoom = height / img.height
        return img.resize((max(1, round(img.width * zoom)), height), Image.BILINEAR), zoom


def draw_matches(query_image: Path, db_image: Path, query_xy: np.ndarray, db_xy: np.ndarray, out: Path,
                 height: int = MATCH_HEIGHT) -> Optional[Tuple[int, int]]:
    """Query and database image side by side, a line per inlier correspondence (points in
    original-image pixels); returns the JPEG's (width, height), or None if an image is missing."""
    try:
        left, zoom_left = _fit_height(Path(query_image), height)
        right, zoom_right = _fit_height(Path(db_image), height)
    except OSError:
        return None
    canvas = Image.new("RGB", (left.width + GAP + right.width, height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + GAP, 0))
    draw = ImageDraw.Draw(canvas)
    starts = np.asarray(query_xy, np.float64)[:MAX_LINES] * zoom_left
    ends = np.asarray(db_xy, np.float64)[:MAX_LINES] * zoom_right + [left.width + GAP, 0]
    for i, ((x0, y0), (x1, y1)) in enumerate(zip(starts, ends)):
        # greens to yellows: neighbouring lines stay distinguishable, none in the report's error red
        colour = (int(60 + 180 * (i % 7) / 6), 220, 60)
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=1)
        for x, y in ((x0, y0), (x1, y1)):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)
    with atomic_path(out) as tmp:
        canvas.save(tmp, format="JPEG", quality=85)
    return canvas.size
