"""``mantranet weights list|identify|fetch``: which weight file is which, and getting the official ones."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import h5py
import numpy as np

from converter import ConversionError, convert_h5, output_paths, read_keras_h5, save_conversion
from converter.convert import FORMATS, first_block_filters
from converter.download import DEADLINE_S, DownloadError, ProgressBar, download
from converter.legacy import PART_NAMES, port_checkpoint_by_hash, read_checkpoint, split_parts
from converter.mapping import FEATEX_LAYER, check_declared_sizes, keras_shapes, official_layers, uses_frozen_order
from converter.official_code import fetch_official_code
from converter.releases import (
    file_digests,
    official_code,
    official_code_path,
    official_release,
    official_releases,
    port_checkpoints,
    release_by_hash,
    resolve_variant,
    weights_dir,
)
from mantranet_torch import RELEASES, ManTraNetConfig
from mantranet_torch.files import file_problem, os_reason
from mantranet_torch.weights import (
    MODEL_PARTS,
    PROVENANCE_KEY,
    WeightFileError,
    metadata_config,
    model_parts,
    read_weights,
)

from .errors import CommandError

HDF5, PYTORCH, SAFETENSORS = "HDF5", "PyTorch checkpoint", "safetensors"
ZIP_MAGIC, PICKLE_PROTOCOL_2 = b"PK\x03\x04", b"\x80\x02"  # torch.save's zip archive, and its legacy format


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="list, identify and fetch weight files",
        description="The official releases and the earlier PyTorch port's checkpoints: list them, identify a file "
        "by its content, download and convert a release.",
    )
    commands = p.add_subparsers(dest="weights_command", required=True, metavar="SUBCOMMAND")
    commands.add_parser("list", help="the releases, their settings, and which are in the weights folder").set_defaults(
        run=run_list
    )
    identify = commands.add_parser("identify", help="which file FILE is, by its content (its name is ignored)")
    identify.add_argument("file", type=Path, metavar="FILE")
    identify.set_defaults(run=run_identify)
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
    fetch.add_argument("-o", "--output", type=Path, metavar="DIR", help="folder for the files (default: weights)")
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
    folder = weights_dir()
    print(f"weights folder: {folder}")
    rows = [("release", "file", "filters", "transform", "windows", ".h5", "converted")]
    for r in official_releases():
        c = r.config
        windows = ",".join(map(str, c.window_sizes))
        h5 = local_status(folder / r.file, r.git_blob_sha1)
        rows.append((str(r.index), r.file, str(c.first_block_filters), c.transform_activation or "linear", windows, h5,
                     converted(folder, Path(r.file).stem)))  # fmt: skip
    print_table(rows)
    print("\nearlier PyTorch port (`mantranet convert` imports these):")
    rows = [("file", "holds", "local", "converted")]
    for c in port_checkpoints():
        rows.append(
            (c.file, c.holds, local_status(folder / c.file, c.git_blob_sha1), converted(folder, Path(c.file).stem))
        )
    print_table(rows)
    return 0


def local_status(path: Path, git_blob_sha1: str) -> str:
    if not os.path.lexists(path):
        return "-"
    problem = file_problem(path)
    if problem:
        return f"present, {problem}"
    try:
        digests = file_digests(path)
    except OSError as e:
        return f"present, unreadable ({os_reason(e)})"
    return "verified" if digests.git_blob_sha1 == git_blob_sha1 else "present, content differs"


def converted(folder: Path, stem: str) -> str:
    found = [fmt for fmt, suffix in sorted(FORMATS.items()) if (folder / (stem + suffix)).is_file()]
    return ", ".join(found) or "-"


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


# ---- identify ----


def run_identify(args: argparse.Namespace) -> int:
    path: Path = args.file
    problem = file_problem(path)
    if problem:
        raise CommandError(f"{path}: {problem}")
    try:
        digests = file_digests(path)
    except OSError as e:
        raise CommandError(f"{path}: cannot be read ({os_reason(e)})") from None
    print(f"{path}: {digests.size} bytes, git blob SHA-1 {digests.git_blob_sha1}")
    release, checkpoint = release_by_hash(digests.git_blob_sha1), port_checkpoint_by_hash(digests.git_blob_sha1)
    if release is not None:
        print(f"  content: official release {release.index} ({release.file}), {settings(release.config)}")
    elif checkpoint is not None:
        print(f"  content: the earlier PyTorch port's {checkpoint.file} ({checkpoint.holds})")
    else:
        print("  content: unknown (neither an official release nor an earlier-port checkpoint of releases.json)")
    kind = sniff(path)
    if kind == HDF5:
        describe_hdf5(path)
    elif kind == SAFETENSORS:
        describe_tensors(path, SAFETENSORS, *read_weights(path))
    elif kind == PYTORCH:
        tensors = read_checkpoint(path)
        describe_tensors(path, PYTORCH, tensors, read_weights(path)[1] if is_ours(tensors) else {})
    else:
        print("  format: none known here (not HDF5, safetensors or a PyTorch checkpoint)")
    return 0


def settings(config: ManTraNetConfig) -> str:
    return (
        f"{config.first_block_filters} first-block filters, transform {config.transform_activation or 'linear'}, "
        f"windows {', '.join(map(str, config.window_sizes))}"
    )


def sniff(path: Path) -> str | None:
    """The file's format by its first bytes, whatever its name."""
    if h5py.is_hdf5(path):
        return HDF5
    with path.open("rb") as f:
        head = f.read(9)
    if head.startswith((ZIP_MAGIC, PICKLE_PROTOCOL_2)):
        return PYTORCH
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return SAFETENSORS
    return None


def describe_hdf5(path: Path) -> None:
    try:
        keras = read_keras_h5(path, lambda datasets: check_declared_sizes(datasets, str(path)))
    except ConversionError as e:
        print(f"  format: HDF5, but not a Keras weight file ({str(e).removeprefix(f'{path}: ')})")
        return
    for note in keras.notes:
        print(f"  note: {note}")
    with h5py.File(path, "r") as f:
        root = f if keras.layout == "weights-only" else f["model_weights"]
        names = np.atleast_1d(np.asarray(root.attrs.get("layer_names", []), dtype=object))
        attrs = "bytes" if names.size and isinstance(names[0], bytes) else "str"
    print(
        f"  format: Keras HDF5, {keras.layout} layout, {len(keras.arrays)} arrays in {len(keras.layer_names)} layers, "
        f"attributes as {attrs}, keras_version {keras.keras_version}"
    )
    shapes = {k: tuple(v.shape) for k, v in keras.arrays.items()}
    fits = [i for i, c in sorted(RELEASES.items()) if keras_shapes(c) == shapes]
    if not fits:
        filters = first_block_filters(keras.arrays)
        print(f"  shapes: fit no release (b1c1 width {filters}); `mantranet convert` names the arrays at fault")
        return
    frozen = featex_order(keras.arrays)
    print(f"  shapes: fit {releases_text(fits)}")
    if frozen is not None:
        by_order = [i for i in fits if uses_frozen_order(RELEASES[i]) == frozen]
        what = "first layers listed last (as Keras saves a Featex with them frozen)" if frozen else "natural order"
        print(f"  Featex weights: {what}, as the official loader reads {releases_text(by_order)}")
    try:
        ident = resolve_variant(path, file_digests(path), first_block_filters(keras.arrays), None)
        print(f"  `mantranet convert` takes it as release {ident.index} (by {ident.by})")
    except ConversionError:
        print("  `mantranet convert` needs --variant N: neither its content nor its name tells the release")


def releases_text(indices: list[int]) -> str:
    return ("release " if len(indices) == 1 else "releases ") + ", ".join(map(str, indices))


def featex_order(arrays: dict[str, np.ndarray]) -> bool | None:
    """True when Featex's first layers come last (frozen order), False for natural order, None for neither."""
    order = [k for k in arrays if k.startswith(FEATEX_LAYER + "/")]
    for frozen in (False, True):
        layers = dict(official_layers(arrays, frozen))
        if order == [f"{FEATEX_LAYER}/{name}" for name, _ in layers[FEATEX_LAYER]]:
            return frozen
    return None


def is_ours(tensors: dict) -> bool:
    return bool(model_parts(tensors))


def describe_tensors(path: Path, kind: str, tensors: dict, metadata: dict[str, str]) -> None:
    if not is_ours(tensors):
        try:
            parts = split_parts(path, tensors)
        except ConversionError:
            print(f"  format: {kind}, {len(tensors)} tensors, neither ManTraNet weights nor the earlier port's")
            return
        held = " and ".join(PART_NAMES[p] for p in parts)
        print(
            f"  format: a checkpoint of the earlier PyTorch port by its keys ({held}); `mantranet convert` imports it"
        )
        return
    present = model_parts(tensors)
    part = "full model" if len(present) == len(MODEL_PARTS) else f"{present[0]} only (a partial import)"
    print(f"  format: {kind} of ManTraNet weights of this project, {len(tensors)} tensors, {part}")
    try:
        config = metadata_config(path, metadata)
    except WeightFileError as e:
        print(f"  config: unreadable: {e}")
    else:
        if config is not None:
            print(f"  config: {settings(config)}")
    if PROVENANCE_KEY not in metadata:
        print("  provenance: none recorded")
        return
    try:
        describe_provenance(json.loads(metadata[PROVENANCE_KEY]))
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        print(f"  provenance: malformed ({type(e).__name__}: {e})")


def describe_provenance(provenance: dict) -> None:
    """The manifest `mantranet convert` writes into a file's metadata, as lines; KeyError etc. when malformed."""
    sources = provenance.get("sources") or [provenance.get("source") or {}]
    for source in sources:
        print(f"  converted from: {source.get('name')} (git blob SHA-1 {source.get('git_blob_sha1')})")
    release = provenance.get("release")
    if release:
        print(f"  release: {release['index']} ({release['file']}), identified by {provenance.get('identified_by')}")
    else:
        print(f"  release: none matched by content; config from {provenance.get('identified_by')}")
    tool = provenance.get("tool", {})
    print(f"  by: {tool.get('name')} {tool.get('version')}")


# ---- fetch ----


def run_fetch_code(args: argparse.Namespace) -> int:
    target = args.output / official_code().file if args.output else official_code_path()
    bar = ProgressBar(official_code().file)
    try:
        fetched = fetch_official_code(args.url, target, force=args.force, progress=bar)
    except DownloadError as e:
        raise CommandError(str(e)) from None
    finally:
        bar.close()
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
    folder = args.output or weights_dir()
    target = folder / release.file
    bar = ProgressBar(release.file)
    try:
        fetched = download(
            args.url or release.url,
            target,
            release.git_blob_sha1,
            allow_unknown=args.allow_unknown,
            force=args.force,
            progress=bar,
            deadline_s=args.timeout,
        )
    except DownloadError as e:
        raise CommandError(str(e)) from None
    finally:
        bar.close()
    if not fetched.downloaded:
        print(f"{target}: already present, verified (git blob SHA-1 {fetched.digests.git_blob_sha1})")
    elif fetched.verified:
        resumed = f", resumed after {fetched.resumed_from} bytes" if fetched.resumed_from else ""
        print(f"downloaded {target} ({fetched.digests.size} bytes{resumed}): verified, release {release.index}")
    else:
        print(
            f"downloaded {target} ({fetched.digests.size} bytes): NOT release {release.index}'s content "
            f"(git blob SHA-1 {fetched.digests.git_blob_sha1}, expected {release.git_blob_sha1}); "
            "kept, as --allow-unknown asks"
        )
    if args.no_convert:
        return 0
    weights, manifest_path = output_paths(target, folder, args.format)
    if (
        weights.exists()
        and manifest_path.exists()
        and not args.force
        and manifest_source(manifest_path) == (fetched.digests.git_blob_sha1)
    ):
        print(f"{weights}: already converted from this file")
        return 0
    conversion = convert_h5(target)
    manifest = save_conversion(conversion, weights, manifest_path, force=args.force)
    ident = conversion.identification
    print(f"converted as release {ident.index} (identified by {ident.by}), config {conversion.config.to_dict()}")
    print(f"wrote {weights} (sha256 {manifest['output']['sha256'][:16]}...)")
    print(f"wrote {manifest_path}")
    return 0


def manifest_source(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("source", {}).get("git_blob_sha1")
    except (OSError, ValueError, AttributeError):
        return None
