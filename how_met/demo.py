"""``how-met demo``: a small museum built from photographs the installed packages ship, evaluated.

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

import argparse
import functools
import io
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
from PIL import Image

from .utils import atomic_path, progress, write_json

logger = logging.getLogger("how_met.demo")

# Bump when the generator changes what it draws, so an old museum is rebuilt.
GENERATOR_VERSION = 1
MANIFEST_NAME = "demo_museum.json"
DB_MAX_SIDE = 500          # Met database images are at most 500x500
QUERY_LONG_SIDE = 512      # visitor photos, kept small so extraction stays fast on 2 cores
DB_JPEG_QUALITY = 90

DEMO_SIZE = {"n_exhibits": 35, "n_queries": 45, "n_distractors": 15}
QUICK_SIZE = {"n_exhibits": 12, "n_queries": 18, "n_distractors": 6}


# --------------------------------------------------------------------------------------------
# Source photographs
# --------------------------------------------------------------------------------------------

def _skimage_loader(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data
        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
            image = image[0]
        return image
    return load


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


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        image = image.astype(np.float64)
        lo, hi = float(image.min()), float(image.max())
        image = ((image - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[2] == 4:  # RGBA over white
        alpha = image[:, :, 3:4].astype(np.float64) / 255.0
        image = (image[:, :, :3] * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, :3])


@dataclass(frozen=True)
class Picture:
    """One crop of a source photograph: an exhibit or a distractor."""

    source: str
    cell: int
    box: Tuple[int, int, int, int]  # top, left, bottom, right in the source image
    pixels: np.ndarray              # (H, W, 3) uint8, native resolution


def _cut(source: Source) -> Tuple[List[Picture], List[Picture]]:
    """The source's crops as (exhibits, distractors)."""
    image = _as_rgb_uint8(source.load())
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
# Image helpers (float images in [0, 1], shape (H, W, 3))
# --------------------------------------------------------------------------------------------

def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, stream)]))


def _resize(pixels: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize a uint8 (H, W, 3) array to (width, height) with PIL's Lanczos filter."""
    return np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS))


def _shrink_to(pixels: np.ndarray, max_side: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1.0:
        return pixels
    return _resize(pixels, (max(1, round(width * scale)), max(1, round(height * scale))))


def _scale_to(pixels: np.ndarray, long_side: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    scale = long_side / max(height, width)
    return _resize(pixels, (max(1, round(width * scale)), max(1, round(height * scale))))


def _to_float(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 255.0


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a small random grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((shape[1], shape[0]), Image.BICUBIC)
    return np.asarray(img)


def _save_jpeg(pixels: np.ndarray, path: Path, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality), optimize=False)
    path.write_bytes(buffer.getvalue())


# --------------------------------------------------------------------------------------------
# The visitor's photograph
# --------------------------------------------------------------------------------------------

FRAME_COLOURS = {  # RGB in [0, 1]
    "gilt": (0.74, 0.58, 0.27), "walnut": (0.36, 0.22, 0.12), "black": (0.07, 0.07, 0.07),
    "white": (0.90, 0.89, 0.86), "silver": (0.66, 0.67, 0.69), "oak": (0.62, 0.45, 0.27),
}
WALL_COLOURS = {
    "cream": (0.88, 0.85, 0.76), "grey": (0.62, 0.63, 0.63), "oxblood": (0.45, 0.14, 0.13),
    "teal": (0.16, 0.36, 0.38), "white": (0.93, 0.93, 0.91), "navy": (0.13, 0.17, 0.30),
}


def _frame(art: np.ndarray, rng: np.random.Generator, framed: bool) -> np.ndarray:
    """The artwork inside an optional mat and a bevelled frame."""
    height, width = art.shape[:2]
    side = max(height, width)
    if not framed:  # an unframed print: a thin white border only
        border = max(2, int(0.012 * side))
        out = np.full((height + 2 * border, width + 2 * border, 3), 0.95, np.float32)
        out[border:border + height, border:border + width] = art
        return out
    mat = int(rng.uniform(0.04, 0.10) * side) if rng.random() < 0.35 else 0
    frame_width = max(4, int(rng.uniform(0.035, 0.09) * side))
    colour = np.array(list(FRAME_COLOURS.values())[rng.integers(len(FRAME_COLOURS))], np.float32)
    inner_h, inner_w = height + 2 * mat, width + 2 * mat
    out_h, out_w = inner_h + 2 * frame_width, inner_w + 2 * frame_width
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    # Distance into the frame from its outer edge; the bevel is lit from the top left.
    depth = np.minimum.reduce([ys, xs, out_h - 1 - ys, out_w - 1 - xs]) / frame_width
    lit = np.where(np.minimum(ys, xs) < np.minimum(out_h - 1 - ys, out_w - 1 - xs), 1.15, 0.8)
    bevel = 1.0 + 0.25 * np.cos(np.clip(depth, 0, 1) * np.pi * 2.0)
    grain = 1.0 + 0.06 * _smooth_noise(rng, (out_h, out_w), 24)
    out = colour[None, None, :] * (lit * bevel * grain)[:, :, None]
    out = out.astype(np.float32)
    out[frame_width:frame_width + inner_h, frame_width:frame_width + inner_w] = 0.93  # mat
    top, left = frame_width + mat, frame_width + mat
    out[top:top + height, left:left + width] = art
    # The frame's lip casts a soft shadow onto the artwork's top and left edges.
    shadow = max(2, frame_width // 3)
    ramp = np.linspace(0.65, 1.0, shadow, dtype=np.float32)
    out[frame_width:frame_width + shadow, frame_width:frame_width + inner_w] *= ramp[:, None, None]
    out[frame_width:frame_width + inner_h, frame_width:frame_width + shadow] *= ramp[None, :, None]
    return np.clip(out, 0.0, 1.0)


def photograph(picture: np.ndarray, rng: np.random.Generator, framed: bool = True,
               long_side: int = QUERY_LONG_SIDE) -> np.ndarray:
    """A visitor's photo of ``picture`` (uint8 RGB) as uint8 RGB, ``long_side`` px on the long side.

    Frame and wall, perspective, uneven light, glare, colour cast, blur, sensor noise. JPEG is
    applied when the photo is saved.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.transform import ProjectiveTransform, warp

    # The artwork fills 55-85% of the photo's long side.
    fill = rng.uniform(0.55, 0.85)
    art = _to_float(_scale_to(picture, max(48, int(long_side * fill))))
    framed_art = _frame(art, rng, framed)
    fh, fw = framed_art.shape[:2]
    portrait = fh > fw * 1.05
    out_h, out_w = (long_side, int(long_side * 0.75)) if portrait else (int(long_side * 0.75),
                                                                         long_side)
    scale = min(out_w * rng.uniform(0.8, 0.95) / fw, out_h * rng.uniform(0.8, 0.95) / fh)
    half_w, half_h = fw * scale / 2, fh * scale / 2
    cx = out_w / 2 + rng.uniform(-0.06, 0.06) * out_w
    cy = out_h / 2 + rng.uniform(-0.06, 0.06) * out_h
    corners = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    # Viewing angle: one side nearer the camera (bigger), the other further (smaller).
    yaw, pitch = rng.uniform(-0.16, 0.16), rng.uniform(-0.10, 0.10)
    corners[:, 1] *= 1.0 + yaw * np.sign(corners[:, 0])
    corners[:, 0] *= 1.0 + pitch * np.sign(corners[:, 1])
    angle = np.deg2rad(rng.uniform(-5.0, 5.0))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    corners = corners @ rotation.T
    corners += rng.uniform(-0.025, 0.025, size=corners.shape) * np.array([out_w, out_h])
    corners += np.array([cx, cy])
    source_corners = np.array([[0, 0], [fw - 1, 0], [fw - 1, fh - 1], [0, fh - 1]], np.float64)
    transform = ProjectiveTransform(matrix=_homography(source_corners, corners))

    warped = warp(framed_art, transform.inverse, output_shape=(out_h, out_w), order=1,
                  mode="constant", cval=0.0, preserve_range=True).astype(np.float32)
    mask = warp(np.ones((fh, fw), np.float32), transform.inverse, output_shape=(out_h, out_w),
                order=1, mode="constant", cval=0.0, preserve_range=True).astype(np.float32)

    wall_colour = np.array(list(WALL_COLOURS.values())[rng.integers(len(WALL_COLOURS))],
                           np.float32)
    wall = wall_colour[None, None, :] * (
        1.0 + 0.05 * _smooth_noise(rng, (out_h, out_w), 6)
        + 0.02 * rng.standard_normal((out_h, out_w)).astype(np.float32))[:, :, None]
    # Drop shadow of the frame on the wall, offset down and to the right.
    shadow = gaussian_filter(mask, sigma=0.015 * long_side)
    shift = max(2, int(0.012 * long_side))
    shadow = np.pad(shadow, ((shift, 0), (shift, 0)))[:out_h, :out_w]
    wall = wall * (1.0 - 0.45 * shadow)[:, :, None]
    scene = warped * mask[:, :, None] + wall * (1.0 - mask[:, :, None])

    # Uneven lighting: a linear gradient in a random direction plus a vignette.
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    ys, xs = ys / out_h - 0.5, xs / out_w - 0.5
    direction = rng.uniform(0, 2 * np.pi)
    gradient = np.cos(direction) * xs + np.sin(direction) * ys
    light = (rng.uniform(0.85, 1.1) + rng.uniform(0.2, 0.5) * gradient
             - rng.uniform(0.1, 0.35) * (xs ** 2 + ys ** 2) * 2)
    scene = scene * light[:, :, None]
    # Glare: a bright soft spot on the artwork (screen blend).
    gx, gy = corners[:, 0].mean() / out_w - 0.5, corners[:, 1].mean() / out_h - 0.5
    gx += rng.uniform(-0.25, 0.25)
    gy += rng.uniform(-0.25, 0.25)
    radius = rng.uniform(0.04, 0.12)
    glare = rng.uniform(0.25, 0.65) * np.exp(-((xs - gx) ** 2 + (ys - gy) ** 2) / (2 * radius ** 2))
    scene = 1.0 - (1.0 - np.clip(scene, 0, 1)) * (1.0 - glare[:, :, None])
    # Colour cast of the gallery lights / white balance.
    scene = scene * rng.uniform(0.9, 1.1, size=3).astype(np.float32)[None, None, :]
    # Camera: defocus or shake blur, then shot and read noise.
    sigma = rng.uniform(0.4, 1.4)
    scene = gaussian_filter(scene, sigma=(sigma, sigma * rng.uniform(0.7, 1.4), 0))
    noise_level = rng.uniform(0.008, 0.03)
    scene = scene + (noise_level * np.sqrt(np.clip(scene, 0, 1) + 0.05)
                     * rng.standard_normal(scene.shape).astype(np.float32))
    return _to_uint8(scene)


def _homography(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 3x3 projective matrix taking 4 source points (x, y) onto 4 target points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(source, target):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    h = np.linalg.solve(np.array(rows, np.float64), np.array(rhs, np.float64))
    return np.append(h, 1.0).reshape(3, 3)


def _second_view(picture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another database image of the same exhibit: a tighter crop, differently exposed."""
    height, width = picture.shape[:2]
    keep = rng.uniform(0.75, 0.9)
    crop_h, crop_w = int(height * keep), int(width * keep)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    view = _to_float(picture[top:top + crop_h, left:left + crop_w])
    view = view * rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, size=3).astype(np.float32)
    view = np.clip(view, 0, 1) ** rng.uniform(0.85, 1.15)
    return _to_uint8(view)


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

    choice_rng = _rng(seed, 0)
    exhibit_order = choice_rng.permutation(len(all_exhibits))[:n_exhibits]
    exhibits = [all_exhibits[i] for i in sorted(exhibit_order)]  # class ids follow SOURCES order
    distractor_order = choice_rng.permutation(len(all_distractors))[:n_distractors]
    distractors = [all_distractors[i] for i in sorted(distractor_order)]
    second_view = choice_rng.random(n_exhibits) < 0.35
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
        if tmp.exists():
            shutil.rmtree(tmp)
        images = tmp / "images"
        database, exhibit_records = [], []
        for label, picture in enumerate(progress(exhibits, desc="demo: exhibits", unit="img")):
            paths = [f"db/{label:03d}/0.jpg"]
            _save_jpeg(_shrink_to(picture.pixels, DB_MAX_SIDE), images / paths[0],
                       DB_JPEG_QUALITY)
            if second_view[label]:
                paths.append(f"db/{label:03d}/1.jpg")
                view = _second_view(picture.pixels, _rng(seed, 1, label))
                _save_jpeg(_shrink_to(view, DB_MAX_SIDE), images / paths[1], DB_JPEG_QUALITY)
            database += [{"id": label, "path": path} for path in paths]
            exhibit_records.append({"id": label, "source": picture.source, "cell": picture.cell,
                                    "box": list(picture.box), "paths": paths})

        queries, query_records = [], []
        for position, item_index in enumerate(progress(shuffled, desc="demo: visitor photos",
                                                       unit="img")):
            label, picture = items[int(item_index)]
            rng = _rng(seed, 2, int(item_index))
            framed = label is not None or rng.random() < 0.5
            photo = photograph(picture.pixels, rng, framed=framed)
            path = f"queries/{position:03d}.jpg"
            _save_jpeg(photo, images / path, int(rng.integers(60, 88)))
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
        if out_dir.exists():
            shutil.rmtree(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, default=Path("how-met-demo"),
                        help="work directory: museum, features, index, results, report "
                             "(default: ./how-met-demo)")
    parser.add_argument("--data", type=Path, default=None,
                        help="evaluate this Met-format directory (database.json, queries.json, "
                             "images/) instead of building the demo museum")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smaller museum ({QUICK_SIZE['n_exhibits']} exhibits, "
                             f"{QUICK_SIZE['n_queries'] + QUICK_SIZE['n_distractors']} queries) "
                             "and lighter settings, for tests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo museum (default 0)")


def _check_work_dir(work: Path, stamp: dict) -> None:
    """Refuse to mix a new museum into a work directory holding results of another one."""
    stamp_path = work / "demo.json"
    if stamp_path.is_file():
        try:
            previous = json.loads(stamp_path.read_text())
        except ValueError:
            previous = None
        if previous == stamp:
            return
        raise ValueError(
            f"{work}: holds a demo run on another museum ({_describe(previous)}); "
            f"pass --work with a new directory or delete {work}")
    if work.is_dir() and any(p.name not in ("museum", "demo.json") for p in work.iterdir()):
        raise ValueError(f"{work}: exists and is not a how-met demo work directory; "
                         "pass --work with a new directory")


def _describe(stamp: Optional[dict]) -> str:
    if not isinstance(stamp, dict):
        return "unreadable demo.json"
    if stamp.get("data"):
        return f"data {stamp['data']}"
    return f"seed {stamp.get('seed')}, {'quick' if stamp.get('quick') else 'full'} size"


def run_demo(work: "str | Path" = "how-met-demo", data: "str | Path | None" = None,
             quick: bool = False, seed: int = 0, out=None) -> dict:
    """Build (or reuse) the museum, run the evaluation, print the table, write the report."""
    out = out or sys.stdout
    started = time.monotonic()
    work = Path(work)
    size = QUICK_SIZE if quick else DEMO_SIZE
    if data is not None:
        museum = Path(data).resolve()
        if not (museum / "database.json").is_file() or not (museum / "queries.json").is_file():
            raise FileNotFoundError(f"{museum}: not a Met-format directory (needs "
                                    "database.json and queries.json)")
        stamp = {"data": str(museum), "quick": bool(quick)}
    else:
        museum = work / "museum"
        stamp = {"data": None, "seed": int(seed), "quick": bool(quick), **size,
                 "version": GENERATOR_VERSION}
    _check_work_dir(work, stamp)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "demo.json", stamp)
    if data is None:
        if museum_is_built(museum, seed, **size):
            print(f"demo: reusing the museum in {museum}", file=out)
        else:
            print(f"demo: building a museum of {size['n_exhibits']} exhibits, "
                  f"{size['n_queries']} visitor photos and {size['n_distractors']} distractors "
                  f"in {museum}", file=out)
            build_demo_museum(museum, seed=seed, **size)
    out.flush()

    from . import evaluate  # imported here: the heavy stack loads only when the demo runs
    from .report import write_report

    settings = getattr(evaluate, "QUICK_SETTINGS" if quick else "DEMO_SETTINGS")
    results = evaluate.run_evaluation(museum, work, settings=settings, cv=2)
    print(evaluate.format_table(results), file=out)
    report = write_report(work)
    elapsed = time.monotonic() - started
    print(f"demo: report written to {report}", file=out)
    print(f"demo: done in {elapsed:.0f} s", file=out)
    out.flush()
    return results


def run_cli(args: argparse.Namespace) -> int:
    run_demo(work=args.work, data=args.data, quick=args.quick, seed=args.seed)
    return 0
