"""The `mochi` command: parse arguments, build a request, hand it to the library. No logic lives here.

One module per command family (``weights``: info, convert; ``generate``; ``serve``; ``lora``: prepare-data,
train-lora, convert-lora; ``accel``: calibrate-cache; ``plan``), ``options`` for what several share. Each
sub-command is a pair: ``_add_<name>`` registers its parser (listed in the module's ``COMMANDS``),
``_run_<name>`` runs it. Handlers import the library lazily, so `mochi --help` is instant. `main` is the
error boundary: user errors (`mochi.errors.MochiError`, ValueError, OSError: see `mochi.errors.user_message`)
print one line and exit 2, never a traceback, as does a torchrun rank whose collective failed because another
rank stopped or hangs (`mochi.parallel.context.peer_failure`); Ctrl-C exits 130, SIGTERM 143, both after the
same cleanup (temporaries removed); a reader that closes the pipe early (`mochi info X | head -1`) ends it
quietly (exit 141, as for SIGPIPE); anything else is a bug and keeps its traceback. Every float option must
be finite (`finite_float`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from collections.abc import Sequence

from mochi import __version__
from mochi.cli import accel, generate, lora, plan, serve, weights
from mochi.errors import Terminated

# Command modules in the order `mochi --help` lists them.
COMMAND_MODULES = (generate, plan, serve, lora, weights, accel)


class _Parser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN202 - argparse's signature
        from mochi.cli.options import bare_offload, dashed_values

        argv = dashed_values(sys.argv[1:] if args is None else args, self._option_string_actions)
        argv, self._freed = bare_offload(argv)  # a bare --offload leaves the prompt alone
        return super().parse_known_args(argv, namespace)

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN202 - argparse's signature
        parsed, extras = self.parse_known_args(args, namespace)
        meant = [word for word in extras if word in self._freed]
        if meant:  # `--offload bogus` with the prompt given: the word was a mode, not "unrecognized"
            from mochi.offload import parse_offload

            try:
                parse_offload(meant[0])
            except ValueError as e:
                self.exit(2, f"mochi: error: --{e} (a bare --offload means model)\n")
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mochi", description="Mochi 1 text-to-video: generate, convert, fine-tune, serve.")
    parser.add_argument("--version", action="version", version=f"mochi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        for add in module.COMMANDS:
            add(sub)
    for command in sub.choices.values():
        for action in command._actions:
            if action.type is float:  # inf and nan parse as floats, but no option of mochi means them
                action.type = finite_float
            elif action.type is None and action.dest in NAMED_VALUES:
                action.type = nonempty  # "" named the current folder or the default, silently
    return parser


# Options and arguments whose value names something (a path, a device, a host): never empty.
NAMED_VALUES = frozenset(
    {"cache", "cache_coefficients", "checkpoint", "data", "device", "devices", "dst", "host", "init_video"}
    | {"lora", "lora_dir", "model", "out", "out_dir", "src", "t5", "tokenizer", "vae", "variant", "videos"}
)


def nonempty(text: str) -> str:
    """argparse type: a value that is not empty (nor only spaces)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give a value")
    return text


def finite_float(text: str) -> float:
    """argparse type: a float that is neither infinite nor NaN, written without '_' (Python reads "0_1" as
    1.0: a typo of 0.1 ran at ten times the value)."""
    if "_" in text:
        shown = text.replace("_", "")
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a plain decimal number: '_' is not allowed ({shown}?)"
        )
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _terminate(signum: int, frame: object) -> None:
    raise Terminated("terminated")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        # Inside the boundary: parsing imports torch (a bare --offload is told from a prompt by
        # mochi.offload), and Ctrl-C in those seconds gave KeyboardInterrupt's traceback.
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("mochi: interrupted", file=sys.stderr)
        return 130
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    from mochi.errors import ARG_PREFIX, user_message

    naming = ARG_PREFIX.set("--")  # messages name the flags, not from_pretrained's arguments
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # ignored by the parent: stays ignored
            previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if isinstance(getattr(args, "model", None), str) and args.model.startswith("embedded:"):
            from mochi.weights.bundle import embedded_path, model_alias

            # A sidecar's "model", passed back: the embedded model (None, or its file where None means else).
            if model_alias(args.model) is None:
                args.model = str(embedded_path()) if getattr(args, "embedded_as_file", False) else None
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is met inside the boundary, not at exit
        return code
    except Terminated:
        print("mochi: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("mochi: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout has gone: nothing more can be shown, and Python's flush at exit must not fail.
        with contextlib.suppress(OSError, ValueError):  # stdout may not be a file (a test's capture)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        message = user_message(e)
        if message is None and "torch.distributed" in sys.modules:  # under torchrun: a peer gone or stuck
            from mochi.parallel.context import peer_failure

            message = peer_failure(e)
        if message is None:
            raise
        print(f"mochi: error: {message}", file=sys.stderr)
        return 2
    finally:
        ARG_PREFIX.reset(naming)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
