"""The ``how-met`` command: one module per pipeline stage defines its commands' options (once)
and thin handlers that call a library function; shared option groups live in ``options``.

Option defaults come from the light ``settings`` modules; a command's stage modules (torch,
faiss, numba) are imported only when that command runs, so ``how-met index`` and ``--help``
never load torch.
"""
from __future__ import annotations

import argparse
import signal
import sys

from ..utils import setup_logging
from . import evaluation, features, recognition, search, training

# Order is the order of the pipeline.
COMMANDS = {**features.COMMANDS, **training.COMMANDS, **search.COMMANDS, **evaluation.COMMANDS,
            **recognition.COMMANDS}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows an option's default in ``--help`` when it has one worth saying (not for flags, not
    None), and the example of each command as written."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="how-met", description="Instance-level recognition with HOW local "
                                     "descriptors, ASMK and kNN classification (Met protocol).")
    from .. import __version__
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"how-met {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, formatter_class=HelpFormatter,
                           epilog="example:\n" + "\n".join(f"  {line}" for line in command.example.split("\n")))
        command.configure(p)
        p.set_defaults(run=command.run)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    # SIGTERM (a scheduler's or `kill`'s stop) ends the job like Ctrl-C: the stores keep every
    # finished image and the next run continues from there.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = args.run(args)
    except KeyboardInterrupt as exc:
        name = exc.args[0] if exc.args else "SIGINT"
        print(f"how-met {args.command}: interrupted ({name}); rerun the same command to continue",
              file=sys.stderr)
        return 128 + getattr(signal, str(name), signal.SIGINT)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        if args.verbose:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"how-met {args.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return int(result or 0)
