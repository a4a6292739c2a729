"""``mantranet weights list|identify|fetch``: which weight file is which, and getting the official ones."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from converter.convert import FORMATS
from converter.download import DEADLINE_S, DownloadError
from converter.file_record import EARLIER_PORT, OFFICIAL, identify
from converter.official_code import fetch_official_code
from converter.releases import official_code, official_code_path, official_release
from converter.trained import fetch, list_weights

from . import progress
from .errors import CommandError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="list, identify and fetch weight files",
        description="The official releases and the earlier PyTorch port's checkpoints: list them, identify a file "
        "by its content, download and convert a release.",
    )
    commands = p.add_subparsers(dest="weights_command", required=True, metavar="SUBCOMMAND")
    listing = commands.add_parser("list", help="the releases, their settings, and which are in the weights folder")
    identifying = commands.add_parser("identify", help="which file FILE is, by its content (its name is ignored)")
    identifying.add_argument("file", type=Path, metavar="FILE")
    for command, what in ((listing, "the weights folder's path"), (identifying, "what the file holds, in one line")):
        out = command.add_mutually_exclusive_group()
        out.add_argument("--json", action="store_true", help="print the result as JSON")
        out.add_argument("--quiet", action="store_true", help=f"print only {what}")
    listing.set_defaults(run=run_list)
    identifying.set_defaults(run=run_identify)
    fetch = commands.add_parser(
        "fetch",
        help="download official release N, verify it, convert it; or (--code) the official model code",
    )
    fetch.add_argument("index", type=int, nargs="?", metavar="N", help="the release 0-4")
    fetch.add_argument(
        "--code",
        action="store_true",
        help="download the official src/modelCore.py instead (verified by its git blob SHA-1) for "
        "'mantranet parity --reference official'; its licence allows academic, non-commercial use only",
    )
    fetch.add_argument("--url", help="a mirror to download from instead of the official URL")
    fetch.add_argument(
        "-o", "--output", type=Path, metavar="DIR", help="folder for the files (default: the user weights cache)"
    )
    fetch.add_argument("--allow-unknown", action="store_true", help="keep a download whose content is not release N")
    fetch.add_argument("--no-convert", action="store_true", help="download and verify only")
    fetch.add_argument("--format", choices=sorted(FORMATS), default="safetensors", help="of the converted file")
    fetch.add_argument("--force", action="store_true", help="replace existing files")
    fetch.add_argument(
        "--timeout",
        type=float,
        default=DEADLINE_S,
        metavar="SECONDS",
        help="give up on a transfer not done in this time (default: %(default)g); an interrupted download resumes",
    )
    fetch.set_defaults(run=run_fetch)


# ---- list ----


def run_list(args: argparse.Namespace) -> int:
    listing = list_weights()
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    if args.quiet:
        print(listing["folder"])
        return 0
    print(f"weights folder: {listing['folder']}")
    rows = [("release", "file", "filters", "transform", "windows", ".h5", "converted")]
    for r in listing["official"]:
        c = r["config"]
        windows = ",".join(map(str, c["window_sizes"]))
        rows.append((str(r["index"]), r["file"], str(c["first_block_filters"]), c["transform_activation"] or "linear",
                     windows, r["local"], ", ".join(r["converted"]) or "-"))  # fmt: skip
    print_table(rows)
    print("\nearlier PyTorch port (`mantranet convert` imports these):")
    rows = [("file", "holds", "local", "converted")]
    rows += [
        (c["file"], c["holds"], c["local"], ", ".join(c["converted"]) or "-") for c in listing["earlier_pytorch_port"]
    ]
    print_table(rows)
    return 0


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# ---- identify ----


def run_identify(args: argparse.Namespace) -> int:
    record = identify(args.file)
    if args.json:
        print(json.dumps(record.to_dict(), indent=2))
    elif args.quiet:
        what = {OFFICIAL: f"official release {record.release}", EARLIER_PORT: f"earlier port {record.checkpoint}"}
        kind = record.details.get("kind")
        print(f"{record.path}: {what.get(record.content, 'unknown content')}, {record.format or 'unknown format'}"
              + (f" ({kind})" if kind else ""))  # fmt: skip
    else:
        print("\n".join(record.lines))
    return 0


# ---- fetch ----


def run_fetch_code(args: argparse.Namespace) -> int:
    target = args.output / official_code().file if args.output else official_code_path()
    try:
        with progress.Bytes(official_code().file) as bar:
            fetched = fetch_official_code(args.url, target, force=args.force, progress=bar)
    except DownloadError as e:
        raise CommandError(str(e)) from None
    sha = fetched.digests.git_blob_sha1
    if not fetched.downloaded:
        print(f"{target}: already present, verified (git blob SHA-1 {sha})")
    else:
        print(f"downloaded {target} ({fetched.digests.size} bytes): verified, the official code (git blob SHA-1 {sha})")
    print("its licence allows academic, non-commercial use only (see the official ManTraNet README)")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    if args.code:
        if args.index is not None:
            raise CommandError("give either a release N or --code, not both")
        return run_fetch_code(args)
    if args.index is None:
        raise CommandError("which release? give N (0-4), or --code for the official model code")
    release = official_release(args.index)
    try:
        with progress.Bytes(release.file) as bar:
            result = fetch(
                args.index,
                args.output,
                url=args.url,
                convert=not args.no_convert,
                fmt=args.format,
                allow_unknown=args.allow_unknown,
                force=args.force,
                progress=bar,
                deadline_s=args.timeout,
            )
    except DownloadError as e:
        raise CommandError(str(e)) from None
    target = result.h5
    if not result.downloaded:
        print(f"{target}: already present, verified (git blob SHA-1 {result.git_blob_sha1})")
    elif result.verified:
        resumed = f", resumed after {result.resumed_from} bytes" if result.resumed_from else ""
        print(f"downloaded {target} ({target.stat().st_size} bytes{resumed}): verified, release {release.index}")
    else:
        print(
            f"downloaded {target} ({target.stat().st_size} bytes): NOT release {release.index}'s content "
            f"(git blob SHA-1 {result.git_blob_sha1}, expected {release.git_blob_sha1}); "
            "kept, as --allow-unknown asks"
            + (f"; it is not an HDF5 file (it starts with {result.not_hdf5}): not a weight file" if result.not_hdf5
               else "")
        )  # fmt: skip
    if result.weights is None:
        return 0
    if not result.converted:
        print(f"{result.weights}: already converted from this file")
        return 0
    manifest = json.loads(result.manifest.read_text())
    print(f"converted as release {manifest['variant']} (identified by {manifest['identified_by']}), "
          f"config {manifest['config']}")  # fmt: skip
    print(f"wrote {result.weights} (sha256 {manifest['output']['sha256'][:16]}...)")
    print(f"wrote {result.manifest}")
    return 0
