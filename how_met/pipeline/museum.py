"""The demo museum: a small Met-format museum built from photographs the installed packages ship.

The museum is a Met-format directory (``database.json``, ``queries.json``, ``images/``):

* **exhibits** are real photographs bundled with scikit-image and matplotlib; larger ones are cut
  into non-overlapping crops, each crop its own exhibit (its own class). Database images are at
  most 500 px on the longer side, like the Met's; about a third of the exhibits get a second
  database image (a tighter, differently exposed view), as Met classes have 1 to 10 images.
* **queries** imitate a visitor's phone photo of an exhibit: the artwork in a frame (sometimes
  with a mat), hung on a textured wall with a drop shadow, seen in perspective, under uneven
  light with a glare spot and a colour cast, then blur, sensor noise and JPEG compression.
* **distractor queries** are photographed the same way from images (and crops) that are not in
  the database; they carry no ``MET_id``.

Everything is drawn from ``numpy.random.default_rng`` streams derived from the seed and the
item's index, so the same seed gives the same bytes. Nothing is downloaded.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..utils import atomic_path, progress, write_json
from .settings import DEMO_SIZE
from .photos import as_rgb_uint8, photograph, rng_stream, save_jpeg, second_view, shrink_to, skimage_photo

logger = logging.getLogger("how_met.demo")

# Bump when the generator changes what it draws, so an old museum is rebuilt.
GENERATOR_VERSION = 1
MANIFEST_NAME = "demo_museum.json"
DB_MAX_SIDE = 500          # Met database images are at most 500x500
DB_JPEG_QUALITY = 90



# --------------------------------------------------------------------------------------------
# Source photographs
# --------------------------------------------------------------------------------------------

def _skimage_loader(name: str) -> Callable[[], np.ndarray]:
    return functools.partial(skimage_photo, name)


def _matplotlib_loader(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib
        path = Path(matplotlib.get_data_path()) / "sample_data" / filename
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return np.asarray(img.convert("RGB"))
    return load


def _binary_blobs() -> np.ndarray:
    import skimage.data
    return skimage.data.binary_blobs(length=384, blob_size_fraction=0.08, volume_fraction=0.4,
                                     rng=7)


@dataclass(frozen=True)
class Source:
    """A bundled photograph and how it is cut: a grid of ``rows`` x ``cols`` crops.

    ``exhibit_cells`` are the cells that become exhibits; the others (if any) are distractors.
    ``region`` (top, left, bottom, right as fractions) is the part of the image that is cut.
    """

    name: str
    load: Callable[[], np.ndarray]
    rows: int = 1
    cols: int = 1
    exhibit_cells: Optional[Tuple[int, ...]] = None  # None: every cell is an exhibit
    distractor_only: bool = False
    region: Tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # part of the image used


# Exhibits: photographs of real things, cut into non-overlapping crops where they are large.
SOURCES: Tuple[Source, ...] = (
    Source("astronaut", _skimage_loader("astronaut"), 1, 2),
    Source("coffee", _skimage_loader("coffee"), 1, 2),
    Source("chelsea", _skimage_loader("chelsea")),
    Source("rocket", _skimage_loader("rocket"), 1, 2),
    Source("hubble_deep_field", _skimage_loader("hubble_deep_field"), 2, 3),
    Source("retina", _skimage_loader("retina"), 3, 3, exhibit_cells=(0, 1, 3, 4, 5, 7, 8),
           region=(0.16, 0.16, 0.84, 0.84)),  # inside the fundus disc: vessels everywhere
    Source("motorcycle", _skimage_loader("stereo_motorcycle"), 2, 2),
    Source("coins", _skimage_loader("coins")),
    Source("camera", _skimage_loader("camera")),
    Source("page", _skimage_loader("page")),
    Source("text", _skimage_loader("text")),
    Source("immunohistochemistry", _skimage_loader("immunohistochemistry"), 2, 2),
    Source("grace_hopper", _matplotlib_loader("grace_hopper.jpg")),
    Source("clock", _skimage_loader("clock")),
    Source("moon", _skimage_loader("moon")),
    # Distractors only: textures, synthetic pictures, logos -- nothing in the database.
    Source("brick", _skimage_loader("brick"), distractor_only=True),
    Source("grass", _skimage_loader("grass"), distractor_only=True),
    Source("gravel", _skimage_loader("gravel"), distractor_only=True),
    Source("colorwheel", _skimage_loader("colorwheel"), distractor_only=True),
    Source("skimage_logo", _skimage_loader("logo"), distractor_only=True),
    Source("matplotlib_logo", _matplotlib_loader("logo2.png"), distractor_only=True),
    Source("present", _matplotlib_loader("Minduka_Present_Blue_Pack.png"), distractor_only=True),
    Source("phantom", _skimage_loader("shepp_logan_phantom"), distractor_only=True),
    Source("horse", _skimage_loader("horse"), distractor_only=True),
    Source("chessboard", _skimage_loader("checkerboard"), distractor_only=True),
    Source("blobs", _binary_blobs, distractor_only=True),
    Source("microaneurysms", _skimage_loader("microaneurysms"), distractor_only=True),
    Source("cell", _skimage_loader("cell"), distractor_only=True),
)


@dataclass(frozen=True)
class Picture:
    """One crop of a source photograph: an exhibit or a distractor."""

    source: str
    cell: int
    box: Tuple[int, int, int, int]  # top, left, bottom, right in the source image
    pixels: np.ndarray              # (H, W, 3) uint8, native resolution


def _cut(source: Source) -> Tuple[List[Picture], List[Picture]]:
    """The source's crops as (exhibits, distractors)."""
    image = as_rgb_uint8(source.load())
    height, width = image.shape[:2]
    region_top, region_left = int(source.region[0] * height), int(source.region[1] * width)
    image = image[region_top:int(source.region[2] * height),
                  region_left:int(source.region[3] * width)]
    height, width = image.shape[:2]
    exhibits, distractors = [], []
    for cell in range(source.rows * source.cols):
        r, c = divmod(cell, source.cols)
        top, bottom = r * height // source.rows, (r + 1) * height // source.rows
        left, right = c * width // source.cols, (c + 1) * width // source.cols
        box = (region_top + top, region_left + left, region_top + bottom, region_left + right)
        picture = Picture(source.name, cell, box,
                          np.ascontiguousarray(image[top:bottom, left:right]))
        is_exhibit = not source.distractor_only and (
            source.exhibit_cells is None or cell in source.exhibit_cells)
        (exhibits if is_exhibit else distractors).append(picture)
    return exhibits, distractors


@functools.lru_cache(maxsize=1)
def _all_pictures() -> Tuple[Tuple[Picture, ...], Tuple[Picture, ...]]:
    exhibits, distractors = [], []
    for source in SOURCES:
        try:
            source_exhibits, source_distractors = _cut(source)
        except Exception as exc:  # a sample image missing from this scikit-image build
            logger.warning("demo: sample image %s unavailable (%s); skipped", source.name,
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        exhibits += source_exhibits
        distractors += source_distractors
    for picture in exhibits + distractors:
        picture.pixels.flags.writeable = False  # cached: shared by every build in this process
    return tuple(exhibits), tuple(distractors)


def available_pictures() -> Tuple[List[Picture], List[Picture]]:
    """All exhibit and distractor pictures the installed packages provide, in a fixed order."""
    exhibits, distractors = _all_pictures()
    return list(exhibits), list(distractors)


# --------------------------------------------------------------------------------------------
# The museum
# --------------------------------------------------------------------------------------------

def _manifest_header(seed: int, n_exhibits: int, n_queries: int, n_distractors: int) -> dict:
    return {"generator": "how-met demo", "version": GENERATOR_VERSION, "seed": int(seed),
            "n_exhibits": int(n_exhibits), "n_queries": int(n_queries),
            "n_distractors": int(n_distractors)}


def museum_is_built(museum_dir: Path, seed: int, n_exhibits: int, n_queries: int,
                    n_distractors: int) -> bool:
    """Whether ``museum_dir`` holds a complete demo museum built with exactly these settings."""
    manifest_path = Path(museum_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return False
    header = _manifest_header(seed, n_exhibits, n_queries, n_distractors)
    if any(manifest.get(k) != v for k, v in header.items()):
        return False
    root = Path(museum_dir)
    return (root / "database.json").is_file() and (root / "queries.json").is_file()


def build_demo_museum(out_dir: "str | Path", seed: int = 0,
                      n_exhibits: int = DEMO_SIZE["n_exhibits"],
                      n_queries: int = DEMO_SIZE["n_queries"],
                      n_distractors: int = DEMO_SIZE["n_distractors"]) -> Path:
    """Write a Met-format museum into ``out_dir`` and return its path.

    ``n_exhibits`` classes (database images: 1 or 2 each), ``n_queries`` visitor photos of
    exhibits (spread over the exhibits round-robin in a seeded order, so each exhibit gets
    n_queries // n_exhibits or one more) and ``n_distractors`` photos of pictures that are not
    in the database. The directory is built beside ``out_dir`` and renamed onto it, so an
    interrupted build leaves nothing half-written; an existing ``out_dir`` is replaced.
    """
    out_dir = Path(out_dir)
    all_exhibits, all_distractors = available_pictures()
    if not 1 <= n_exhibits <= len(all_exhibits):
        raise ValueError(f"demo: n_exhibits={n_exhibits} must be between 1 and "
                         f"{len(all_exhibits)} (the bundled pictures available)")
    if not 0 <= n_distractors <= len(all_distractors):
        raise ValueError(f"demo: n_distractors={n_distractors} must be between 0 and "
                         f"{len(all_distractors)} (the bundled pictures available)")
    if n_queries < 1:
        raise ValueError(f"demo: n_queries={n_queries} must be at least 1")

    choice_rng = rng_stream(seed, 0)
    exhibit_order = choice_rng.permutation(len(all_exhibits))[:n_exhibits]
    exhibits = [all_exhibits[i] for i in sorted(exhibit_order)]  # class ids follow SOURCES order
    distractor_order = choice_rng.permutation(len(all_distractors))[:n_distractors]
    distractors = [all_distractors[i] for i in sorted(distractor_order)]
    has_second_view = choice_rng.random(n_exhibits) < 0.35
    query_exhibits = choice_rng.permutation(n_exhibits)
    query_targets = [int(query_exhibits[i % n_exhibits]) for i in range(n_queries)]
    # Photo items: (class id or None, picture); listed in a shuffled order so file names say
    # nothing about the answer.
    items = [(label, exhibits[label]) for label in query_targets]
    items += [(None, picture) for picture in distractors]
    shuffled = choice_rng.permutation(len(items))

    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir, suffix=".building") as tmp:
        images = tmp / "images"
        database, exhibit_records = [], []
        for label, picture in enumerate(progress(exhibits, desc="demo: exhibits", unit="img")):
            paths = [f"db/{label:03d}/0.jpg"]
            save_jpeg(shrink_to(picture.pixels, DB_MAX_SIDE), images / paths[0],
                       DB_JPEG_QUALITY)
            if has_second_view[label]:
                paths.append(f"db/{label:03d}/1.jpg")
                view = second_view(picture.pixels, rng_stream(seed, 1, label))
                save_jpeg(shrink_to(view, DB_MAX_SIDE), images / paths[1], DB_JPEG_QUALITY)
            database += [{"id": label, "path": path} for path in paths]
            exhibit_records.append({"id": label, "source": picture.source, "cell": picture.cell,
                                    "box": list(picture.box), "paths": paths})

        queries, query_records = [], []
        for position, item_index in enumerate(progress(shuffled, desc="demo: visitor photos",
                                                       unit="img")):
            label, picture = items[int(item_index)]
            rng = rng_stream(seed, 2, int(item_index))
            framed = label is not None or rng.random() < 0.5
            photo = photograph(picture.pixels, rng, framed=framed)
            path = f"queries/{position:03d}.jpg"
            save_jpeg(photo, images / path, int(rng.integers(60, 88)))
            queries.append({"path": path} if label is None else {"path": path, "MET_id": label})
            query_records.append({"path": path, "MET_id": label, "source": picture.source,
                                  "cell": picture.cell, "box": list(picture.box)})

        write_json(tmp / "database.json", database)
        write_json(tmp / "queries.json", queries)
        manifest = _manifest_header(seed, n_exhibits, n_queries, n_distractors)
        manifest.update({
            "description": "Demo museum built by how-met from photographs bundled with "
                           "scikit-image and matplotlib; queries are simulated visitor photos.",
            "n_db_images": len(database), "exhibits": exhibit_records,
            "queries": query_records})
        write_json(tmp / MANIFEST_NAME, manifest)
    return out_dir

