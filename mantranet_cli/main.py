"""Entry point: ``mantranet <command> ...``; each command lives in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from converter import ConversionError
from converter.convert import tool_version
from mantranet_torch import WeightFileError

from . import convert_cmd, demo_cmd, detect_cmd, evaluate_cmd, export_keras_cmd, parity_cmd, weights_cmd
from .errors import CommandError

COMMANDS = (demo_cmd, convert_cmd, weights_cmd, export_keras_cmd, parity_cmd, detect_cmd, evaluate_cmd)
EXPECTED_ERRORS = (CommandError, ConversionError, WeightFileError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mantranet", description="Official ManTraNet weights in PyTorch: convert, verify, debug, detect, evaluate."
    )
    parser.add_argument("--version", action="version", version=f"mantranet-torch {tool_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except EXPECTED_ERRORS as e:
        print(f"mantranet {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt:
        print(f"mantranet {args.command}: interrupted", file=sys.stderr)
        return 130
