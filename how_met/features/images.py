"""Image input: decode any file PIL reads into RGB, honour EXIF orientation, shrink only.

Every failure raises :class:`ImageError` with a one-line message naming the file.

Paths: an image key is relative to its image root without '..' (``datasets.relative_key``) and
the file it names, after following symlinks, must lie inside the (resolved) root; a symlink
inside the root that points elsewhere is refused (``image_file``). Link whole folders by making
the root itself a symlink.

Size: images up to ``MAX_PIXELS`` are used. JPEGs larger than needed are decoded at a reduced
resolution by the JPEG decoder itself (draft mode, 1/2 to 1/8), which keeps a 108 Mpx camera
photo in tens of MB; other formats are decoded at full size, at most MAX_PIXELS x 4 bytes.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageOps

from .settings import IMAGE_LOADING
from ..datasets import relative_key

# Refuse images above this many pixels (a decompression bomb guard). PIL warns above its own
# MAX_IMAGE_PIXELS (89.5 Mpx by default) and refuses twice that while opening: it is raised to
# our limit, so genuine photos up to it open, and our check below gives size and limit.
MAX_PIXELS = 150_000_000
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_PIXELS)
# JPEGs with more pixels than this are decoded at reduced resolution when the target allows.
DRAFT_PIXELS = 24_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


class ImageError(ValueError):
    """An image that cannot be used (unreadable, truncated, too large)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparent pixels are composited over white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        scale = 65535.0 if hi > 255 else 255.0
        arr = np.clip(arr / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode == "CMYK":
        # PIL's CMYK->RGB is the naive formula; good enough for descriptors.
        return img.convert("RGB")
    return img.convert("RGB")


def image_file(image_root: os.PathLike, key: str) -> Path:
    """The file of image ``key`` under ``image_root``; refuses keys with '..' or absolute paths
    and files that symlinks lead outside the root (see the module docstring)."""
    try:
        key = relative_key(f"image {key!r}:", key)
    except ValueError as exc:
        raise ImageError(str(exc)) from None
    path = Path(image_root) / key
    root = Path(image_root).resolve()
    if not path.resolve().is_relative_to(root):
        raise ImageError(f"{path}: a symlink leads outside the image root {root} (refused; make the "
                         f"root itself the link instead)")
    return path


def _draft_size(img: Image.Image, image_size: int) -> Tuple[int, int]:
    """The smallest size worth decoding a JPEG at: twice the target (as before), or, for huge
    photos, enough pixels to still exceed the target while bounding the decoder's memory."""
    ratio = 0.5
    if img.width * img.height > DRAFT_PIXELS:
        ratio = min(ratio, math.sqrt(DRAFT_PIXELS / (img.width * img.height)))
    ratio = max(ratio, image_size / max(img.size))
    return max(1, int(img.width * ratio)), max(1, int(img.height * ratio))


def _bomb_message(path: Path, exc: Exception) -> str:
    pixels = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
    return f"{path}: {size} exceeds the {MAX_PIXELS:,} pixel limit (decompression bomb guard)"


def load_image(path: os.PathLike, image_size: int = 0, loading: str = "how-met"
               ) -> Tuple[np.ndarray, Tuple[int, int]]:
    """Read ``path`` as an (H, W, 3) uint8 RGB array, shrunk so max(H, W) <= image_size.

    Returns the array and the original (width, height). Images are never enlarged
    (image_size <= 0 keeps the original size). ``loading``:

    - ``"how-met"``: EXIF orientation applied, transparency over white, JPEG draft decoding
      for large images, BILINEAR shrink;
    - ``"official"``: what the published HOW/cirtorch loader does -- EXIF ignored, PIL's plain
      RGB conversion, then a LANCZOS ``thumbnail`` (1.1-1.4 grey levels from "how-met" on
      the shared sets).
    """
    if loading not in IMAGE_LOADING:
        raise ValueError(f"image loading must be one of {IMAGE_LOADING}, got {loading!r}")
    official = loading == "official"
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check below
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"{path}: {img.width}x{img.height} = {img.width * img.height:,} "
                                     f"pixels exceeds the {MAX_PIXELS:,} pixel limit (decompression "
                                     f"bomb guard)")
                original = img.size
                if official:
                    img = img.convert("RGB")
                    if image_size:
                        img.thumbnail((image_size, image_size), Image.LANCZOS)
                    return _as_array(img, path), original
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotates by 90 degrees
                    original = original[::-1]
                if image_size and max(img.size) > 2 * image_size and img.format == "JPEG":
                    # Let the JPEG decoder downscale by a power of two: much faster, and bounded
                    # memory for huge photos; the resize below still gives the exact target size.
                    img.draft("RGB", _draft_size(img, image_size))
                img = ImageOps.exif_transpose(img)
                img.load()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_message(path, exc)) from None
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as exc:
        reason = str(exc).split("\n")[0] or type(exc).__name__
        raise ImageError(f"{path}: unreadable image ({reason})") from None
    return _shrink(_to_rgb(img), image_size, path), original


def image_array(image, image_size: int = 0) -> Tuple[np.ndarray, Tuple[int, int]]:
    """``load_image`` for an image already in memory: a PIL image (EXIF orientation applied)
    or an (H, W, 3) uint8 RGB array."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"image array must be (H, W, 3) uint8 RGB, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
    else:
        raise ImageError(f"not an image: {type(image).__name__} (give a path, a PIL image or an array)")
    return _shrink(_to_rgb(image), image_size, "image"), image.size


def _shrink(img: Image.Image, image_size: int, path) -> np.ndarray:
    if image_size and max(img.size) > image_size:
        ratio = image_size / max(img.size)
        size = (max(1, round(img.width * ratio)), max(1, round(img.height * ratio)))
        img = img.resize(size, Image.BILINEAR, reducing_gap=3.0)
    return _as_array(img, path)


def _as_array(img: Image.Image, path) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError(f"{path}: unexpected decoded shape {arr.shape}")
    return arr


def list_images(folder: os.PathLike) -> List[str]:
    """Image files under ``folder`` (recursive), as sorted paths relative to it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a directory")
    found = [p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)
