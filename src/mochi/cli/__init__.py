"""The `mochi` command: parse arguments, build a request, hand it to the library. No logic lives here.

One module per command family (``weights``: info, convert; ``generate``; ``serve``; ``lora``: prepare-data,
train-lora, convert-lora; ``accel``: calibrate-cache), ``options`` for what several share. Each sub-command
is a pair: ``_add_<name>`` registers its parser (listed in the module's ``COMMANDS``), ``_run_<name>`` runs
it. Handlers import the library lazily, so `mochi --help` is instant. User errors (ValueError, missing files)
print one line and exit 2, never a traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mochi import __version__
from mochi.cli import accel, generate, lora, serve, weights

# Command modules in the order `mochi --help` lists them.
COMMAND_MODULES = (generate, serve, lora, weights, accel)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mochi", description="Mochi 1 text-to-video: generate, convert, fine-tune, serve."
    )
    parser.add_argument("--version", action="version", version=f"mochi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        for add in module.COMMANDS:
            add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("mochi: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"mochi: error: {e}", file=sys.stderr)
        return 2
