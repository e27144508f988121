"""Recogniser commands: recogniser, identify, add-exhibits."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List, Tuple

from ..utils import configure_threads
from .options import POSITIVE, Command, add_extractor_options, extraction_config


def _collection(args) -> Tuple[Path, List[str], list]:
    """(image root, image keys, exhibit ids) from --images FOLDER or --data (Met database)."""
    if args.images is not None:
        from ..recognition.recogniser import exhibits_in_folder
        keys, ids = exhibits_in_folder(args.images)
        return args.images, keys, ids
    from ..datasets import find_image_root, read_database
    keys, labels = read_database(args.data / "database.json")
    return find_image_root(args.data, keys), list(keys), [int(v) for v in labels]


def _add_collection_options(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, metavar="FOLDER",
                     help="the collection: one subfolder per exhibit (its name is the exhibit id), or "
                          "images at the top level, each an exhibit named by its file name")
    src.add_argument("--data", type=Path, help="Met-format directory: its database.json gives the exhibits")


def _configure_recogniser(p: argparse.ArgumentParser) -> None:
    _add_collection_options(p)
    p.add_argument("--out", type=Path, required=True, help="recogniser directory to write")
    add_extractor_options(p)
    p.add_argument("--codebook-size", type=POSITIVE, help="visual words of a codebook trained on the collection (default: the shipped "
                        "one for a collection under 1,092 images with the default extractor, else ~200 "
                        "descriptors per word)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (logged)")


def _run_recogniser(args) -> int:
    from ..recognition.recogniser import build_recogniser
    configure_threads()
    image_root, keys, ids = _collection(args)
    out = build_recogniser(image_root, keys, ids, args.out, config=extraction_config(args),
                           checkpoint=args.checkpoint, device=args.device, codebook_size=args.codebook_size,
                           skip_bad=args.skip_bad)
    print(json.dumps({"recogniser": str(out), "images": len(keys), "exhibits": len(set(map(str, ids)))}))
    return 0


def _configure_identify(p: argparse.ArgumentParser) -> None:
    p.add_argument("photos", type=Path, nargs="+", metavar="PHOTO", help="photos to recognise")
    p.add_argument("--recogniser", type=Path, required=True,
                   help="recogniser directory (how-met evaluate writes WORK/recogniser; how-met recogniser builds one)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def _run_identify(args) -> int:
    from ..recognition.recogniser import Recogniser
    configure_threads()
    from ..features.images import ImageError
    failed = 0
    with Recogniser(args.recogniser, device=args.device) as recogniser:
        for photo in args.photos:
            try:
                answer = recogniser.recognise(photo).as_dict()
            except ImageError as exc:  # one unreadable photo does not stop the others
                answer, failed = {"image": str(photo), "error": str(exc)}, failed + 1
            print(json.dumps(answer), flush=True)
    return 1 if failed else 0


def _configure_add_exhibits(p: argparse.ArgumentParser) -> None:
    _add_collection_options(p)
    p.add_argument("--recogniser", type=Path, required=True, help="recogniser directory to extend")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (logged)")


def _run_add_exhibits(args) -> int:
    from ..recognition.recogniser import Recogniser
    configure_threads()
    image_root, keys, ids = _collection(args)
    with Recogniser(args.recogniser) as recogniser:
        added = recogniser.add_exhibits(image_root, keys, ids, skip_bad=args.skip_bad)
        print(json.dumps({"recogniser": str(args.recogniser), "added": added, "images": len(recogniser),
                          "exhibits": recogniser.n_exhibits}))


COMMANDS = {
    "recogniser": Command(
        "build a recogniser for a collection, without queries to tune on (default settings)",
        "how-met recogniser --images my-collection/ --out my-recogniser",
        _configure_recogniser, _run_recogniser),
    "identify": Command(
        "which exhibit each photo shows: one JSON object per photo",
        "how-met identify --recogniser museum-eval/recogniser visitor1.jpg visitor2.jpg",
        _configure_identify, _run_identify),
    "add-exhibits": Command(
        "add images of new or known exhibits to a recogniser (no rebuild)",
        "how-met add-exhibits --recogniser my-recogniser --images new-acquisitions/",
        _configure_add_exhibits, _run_add_exhibits),
}
