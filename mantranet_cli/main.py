"""Entry point: ``mantranet <command> ...``; each command lives in its own module."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence

from converter import ConversionError
from converter.convert import tool_version
from mantranet_torch import SlowPrecisionWarning, WeightFileError

from . import (
    convert_cmd,
    demo_cmd,
    detect_cmd,
    evaluate_cmd,
    export_keras_cmd,
    export_onnx_cmd,
    parity_cmd,
    selftest_cmd,
    synth_cmd,
    train_cmd,
    weights_cmd,
)
from .errors import CommandError

COMMANDS = (
    demo_cmd,
    convert_cmd,
    weights_cmd,
    export_keras_cmd,
    export_onnx_cmd,
    parity_cmd,
    selftest_cmd,
    detect_cmd,
    evaluate_cmd,
    synth_cmd,
    train_cmd,
)
EXPECTED_ERRORS = (CommandError, ConversionError, WeightFileError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mantranet", description="Official ManTraNet weights in PyTorch: convert, verify, debug, detect, evaluate."
    )
    parser.add_argument("--version", action="version", version=f"mantranet-torch {tool_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    parser.set_defaults(dispatch=main)  # for commands that run other commands (demo), without importing this module
    return parser


def one_line_warnings(command: str, default: Callable) -> Callable:
    """``warnings.showwarning`` that prints the library's warnings to the user as one line each."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, SlowPrecisionWarning):
            print(f"mantranet {command}: warning: {message}", file=sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores warnings.showwarning on the way out
        warnings.showwarning = one_line_warnings(args.command, warnings.showwarning)
        try:
            return args.run(args)
        except EXPECTED_ERRORS as e:
            print(f"mantranet {args.command}: error: {e}", file=sys.stderr)
            return getattr(e, "exit_code", 1)
        except KeyboardInterrupt:
            print(f"mantranet {args.command}: interrupted", file=sys.stderr)
            return 130
