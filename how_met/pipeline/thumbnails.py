"""Thumbnails of the images a report shows: ~128 px JPEG copies beside the page."""
from __future__ import annotations

import hashlib
import html
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from urllib.parse import quote

from PIL import Image, ImageDraw

from ..features.images import image_file, load_image
from ..utils import atomic_path

logger = logging.getLogger("how_met.report")

THUMB_SIZE = 128
THUMBS_DIR = "thumbs"


class Thumbnails:
    """~128 px JPEG copies of the images the page shows, named by a hash of path and mtime."""

    def __init__(self, image_root: Optional[Path], out_dir: Path):
        self.image_root = image_root
        self.dir = out_dir / THUMBS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self._made: Dict[str, Tuple[str, int, int]] = {}
        self.missing: List[str] = []

    def _placeholder(self) -> Tuple[str, int, int]:
        name = "missing.png"
        path = self.dir / name
        if not path.exists():
            image = Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (225, 225, 225))
            draw = ImageDraw.Draw(image)
            draw.line([(0, 0), (THUMB_SIZE - 1, THUMB_SIZE - 1)], fill=(170, 170, 170), width=2)
            draw.line([(0, THUMB_SIZE - 1), (THUMB_SIZE - 1, 0)], fill=(170, 170, 170), width=2)
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
        return f"{THUMBS_DIR}/{name}", THUMB_SIZE, THUMB_SIZE

    def get(self, key: str) -> Tuple[str, int, int]:
        """(relative src, width, height) of the thumbnail of image ``key``."""
        if key in self._made:
            return self._made[key]
        try:
            if self.image_root is None:
                raise FileNotFoundError("no image root")
            source = image_file(self.image_root, key)
            stat = source.stat()
            tag = f"{key}\0{stat.st_size}\0{stat.st_mtime_ns}"
            name = hashlib.sha1(tag.encode("utf-8")).hexdigest()[:20] + ".jpg"
            path = self.dir / name
            if path.exists():
                with Image.open(path) as thumb:
                    size = thumb.size
            else:
                # the extractor's decoder: same guards (size limit, bounded memory, EXIF)
                img = Image.fromarray(load_image(source, THUMB_SIZE * 2)[0])
                img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.LANCZOS)
                size = img.size
                with atomic_path(path) as tmp:
                    img.save(tmp, format="JPEG", quality=85)
            entry = (f"{THUMBS_DIR}/{name}", size[0], size[1])
        except (OSError, AttributeError, ValueError) as exc:
            logger.debug("report: no thumbnail for %s (%s)", key, exc)
            self.missing.append(key)
            entry = self._placeholder()
        self._made[key] = entry
        return entry

    def img(self, key: str, css_class: str = "", title: str = "") -> str:
        src, width, height = self.get(key)
        cls = f' class="{html.escape(css_class, quote=True)}"' if css_class else ""
        return (f'<img src="{quote(src)}" width="{width}" height="{height}" '
                f'alt="{html.escape(key)}" title="{html.escape(title or key)}"{cls}>')
