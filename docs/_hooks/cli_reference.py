"""mkdocs hook: the command-line reference written at build time from the parsers themselves (``format_help()``
of ``mantranet`` and of every command and subcommand), so the page cannot drift from the code."""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- cli-reference -->"
PAGE = "reference/cli.md"
WIDTH = "80"  # argparse wraps help at $COLUMNS: a fixed width (one that fits the page) gives the same page everywhere


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parsers of ``parser``'s subcommands, in the order they were added."""
    for action in parser._actions:  # argparse keeps its subparsers here only
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def sections(parser: argparse.ArgumentParser, name: str, level: int = 2) -> list[str]:
    """A heading and the help text of ``parser``, then the same for each of its subcommands."""
    out = [f"{'#' * level} `{name}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for sub, sub_parser in subcommands(parser).items():
        out += sections(sub_parser, f"{name} {sub}", level + 1)
    return out


def cli_reference() -> str:
    from mantranet_cli.main import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        return "\n".join(sections(build_parser(), "mantranet"))
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs passes all four
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE}: the marker {MARKER} is missing")
    return markdown.replace(MARKER, cli_reference())
