"""A tiny dataset in the exact Met layout, with real-looking JPEGs, for the tests (the photos
and JPEG writing are the demo museum's, ``how_met.pipeline.photos``).

``write_met_fixture(root)`` writes::

    root/[ground_truth/]MET_database.json       {"id": <MET id>, "path": "MET/<id>/<n>.jpg"}
    root/[ground_truth/]mini_MET_database.json  query classes + some of the others
    root/[ground_truth/]valset.json             {"path": "test_met/<hash>.jpg", "MET_id": <id>, ...}
    root/[ground_truth/]testset.json            distractors: "test_other/..." / "test_noart/..." without MET_id
    root/[images/]MET/<id>/<n>.jpg, root/[images/]test_met/<hash>.jpg, ...

Every class ("exhibit") is a square region of a scikit-image sample photo; its database
images are mildly jittered crops of that region and its queries are stronger perturbations
(shifted, rescaled, re-lit, noisy), so a working recogniser gets them right. Distractors are
crops of sample images that no class uses.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from how_met.pipeline.photos import save_jpeg, skimage_photo

# Colour photos that make the exhibits; greyscale textures/documents make the distractors.
_EXHIBIT_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                    "immunohistochemistry", "retina", "colorwheel")
_DISTRACTOR_SOURCES = ("brick", "grass", "gravel", "moon", "page", "text", "camera", "coins", "clock", "cell")


def _crop(image: np.ndarray, centre: Tuple[float, float], side: float, out_size: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    side = min(side, h, w)
    x0 = int(round(np.clip(centre[0] - side / 2, 0, w - side)))
    y0 = int(round(np.clip(centre[1] - side / 2, 0, h - side)))
    s = int(round(side))
    patch = Image.fromarray(image[y0:y0 + s, x0:x0 + s])
    return np.asarray(patch.resize((out_size, out_size), Image.BILINEAR))


def _relight(patch: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    x = patch.astype(np.float32) / 255.0
    gamma = np.exp(rng.uniform(-strength, strength))
    gain = 1.0 + rng.uniform(-strength, strength) * 0.5
    x = np.clip(x, 0, 1) ** gamma * gain
    x = x + rng.normal(0, 0.02 * strength, x.shape)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _write(path: Path, pixels: np.ndarray) -> None:
    save_jpeg(pixels, path, quality=90)


def _hash_name(*parts) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:16]


def write_met_fixture(root, n_classes: int = 6, images_per_class: int = 2, queries_per_class: int = 2,
                      n_db_only_classes: int = 2, distractors_per_split: int = 3, size: int = 160,
                      images_level: bool = True, ground_truth_dir: bool = False, seed: int = 0) -> Dict:
    """Write a tiny Met-layout dataset under ``root``; returns a summary.

    ``n_classes`` classes have database images and queries; ``n_db_only_classes`` more have
    database images only (the full database holds both, the mini database all query classes
    plus half of the others). Each class's queries alternate between val and test.
    ``images_level`` puts the images under ``root/images`` (as in the official release) or
    directly under ``root``; ``ground_truth_dir`` puts the JSON files in ``root/ground_truth``.

    Returns ``{"root", "image_root", "ground_truth", "class_ids", "db_images",
    "mini_db_images", "val_queries", "val_distractors", "test_queries", "test_distractors"}``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    image_root = root / "images" if images_level else root
    gt_dir = root / "ground_truth" if ground_truth_dir else root
    gt_dir.mkdir(parents=True, exist_ok=True)
    sources = {name: skimage_photo(name) for name in _EXHIBIT_SOURCES}

    total_classes = n_classes + n_db_only_classes
    class_ids = [int(v) for v in rng.choice(np.arange(1, 900_000), size=total_classes, replace=False)]
    regions = []
    for c in range(total_classes):
        # Classes cycle through the source photos; a reused photo gets a different region.
        image = sources[_EXHIBIT_SOURCES[c % len(_EXHIBIT_SOURCES)]]
        h, w = image.shape[:2]
        side = rng.uniform(0.45, 0.6) * min(h, w)
        slot = c // len(_EXHIBIT_SOURCES)
        cx = side / 2 + ((0.15 + 0.55 * slot) % 1.0) * (w - side)
        cy = side / 2 + rng.uniform(0.2, 0.8) * (h - side)
        regions.append((image, (cx, cy), side))

    database: List[dict] = []
    for c, (image, (cx, cy), side) in enumerate(regions):
        for n in range(images_per_class):
            jitter = side * 0.04
            patch = _crop(image, (cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)),
                          side * rng.uniform(0.95, 1.05), size)
            rel = f"MET/{class_ids[c]}/{n}.jpg"
            _write(image_root / rel, _relight(patch, rng, 0.05))
            database.append({"id": class_ids[c], "path": rel})

    splits: Dict[str, List[dict]] = {"val": [], "test": []}
    for c in range(n_classes):
        image, (cx, cy), side = regions[c]
        for q in range(queries_per_class):
            jitter = side * 0.08
            patch = _crop(image, (cx + rng.uniform(-jitter, jitter), cy + rng.uniform(-jitter, jitter)),
                          side * rng.uniform(0.8, 0.95), size)
            rel = f"test_met/{_hash_name('met', seed, c, q)}.jpg"
            _write(image_root / rel, _relight(patch, rng, 0.25))
            # Other keys may appear in the official files; loaders must ignore them.
            splits["val" if q % 2 == 0 else "test"].append({"path": rel, "MET_id": class_ids[c], "fixture": True})

    distractor_images = [skimage_photo(name) for name in _DISTRACTOR_SOURCES]
    counter = 0
    for split in ("val", "test"):
        for d in range(distractors_per_split):
            image = distractor_images[counter % len(distractor_images)]
            h, w = image.shape[:2]
            side = rng.uniform(0.5, 0.9) * min(h, w)
            centre = (rng.uniform(side / 2, w - side / 2), rng.uniform(side / 2, h - side / 2))
            kind = "test_other" if d % 2 == 0 else "test_noart"
            rel = f"{kind}/{_hash_name(kind, seed, split, d)}.jpg"
            _write(image_root / rel, _relight(_crop(image, centre, side, size), rng, 0.1))
            splits[split].append({"path": rel})
            counter += 1
    for entries in splits.values():  # queries of all kinds interleaved, as in the real files
        rng.shuffle(entries)

    mini_ids = set(class_ids[:n_classes]) | set(class_ids[n_classes::2])
    mini = [e for e in database if e["id"] in mini_ids]
    for name, entries in (("MET_database.json", database), ("mini_MET_database.json", mini),
                          ("valset.json", splits["val"]), ("testset.json", splits["test"])):
        with open(gt_dir / name, "w") as fh:
            json.dump(entries, fh, indent=1)

    def count(split, distractors):
        return sum(("MET_id" not in e) == distractors for e in splits[split])

    return {"root": root, "image_root": image_root, "ground_truth": gt_dir, "class_ids": class_ids,
            "db_images": len(database), "mini_db_images": len(mini),
            "val_queries": len(splits["val"]), "val_distractors": count("val", True),
            "test_queries": len(splits["test"]), "test_distractors": count("test", True)}
