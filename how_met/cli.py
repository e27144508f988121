"""The ``how-met`` command: a thin layer over the library's stage modules.

Each subcommand lives in the module that implements the stage; that module defines
``configure_parser(parser)`` (adds the options) and ``run_cli(args)`` (does the work).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .utils import setup_logging

# subcommand -> (module, one-line help). Order is the order of the pipeline.
COMMANDS = {
    "extract": ("how_met.extract", "extract HOW local (and global) features into an HDF5 store"),
    "merge": ("how_met.extract", "merge shard feature stores into one"),
    "whiten": ("how_met.extract", "learn the PCA-whitening of the HOW reduction layer from images"),
    "codebook": ("how_met.codebook", "train a k-means codebook of visual words from a feature store"),
    "index": ("how_met.ivf", "build or extend a binary ASMK inverted file"),
    "query": ("how_met.query", "rank database images for query features or images"),
    "evaluate": ("how_met.evaluate", "run the whole Met protocol (all stages, resumable) and report"),
    "demo": ("how_met.demo", "build a small museum from bundled photos and evaluate it"),
    "report": ("how_met.report", "write a static HTML report of an evaluation"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="how-met", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure = getattr(module, f"configure_{name}_parser", None) or module.configure_parser
        configure(p)
        p.set_defaults(_run=getattr(module, f"run_{name}_cli", None) or module.run_cli)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        result = args._run(args)
    except KeyboardInterrupt:
        print("how-met: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        if args.verbose:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"how-met {args.command}: error: {msg}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
