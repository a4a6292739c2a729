"""The official releases as trained models: downloaded, verified, converted and cached once per user.

``fetch`` puts a release's official file (and its conversion) in a folder and returns the paths;
``pretrained`` returns the model, from the cache when it is there. The cache is ``converter.cache.weights_dir()``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mantranet_torch import ManTraNet
from mantranet_torch.files import file_problem, os_reason
from mantranet_torch.weights import load

from .cache import weights_dir
from .convert import FORMATS, convert_h5, output_paths, save_conversion
from .download import DEADLINE_S, TIMEOUT_S, DownloadError, Progress, download
from .errors import ConversionError
from .releases import bytes_digest, file_digests, official_release, official_releases, port_checkpoints


class PretrainedError(ConversionError):
    """A release that could not be had: offline, a wrong download, a damaged cache. One line, naming the URL and
    where the official file may be put by hand."""


@dataclass(frozen=True)
class FetchResult:
    """What ``fetch`` left on disk."""

    release: int
    h5: Path  # the official file
    git_blob_sha1: str  # of ``h5``
    verified: bool  # ``h5`` is the official release's content
    downloaded: bool  # False when a verified file was already there
    resumed_from: int  # bytes reused from an interrupted download
    weights: Path | None = None  # the converted file (None with convert=False)
    manifest: Path | None = None  # its provenance manifest
    converted: bool = False  # False when an up-to-date conversion was already there
    not_hdf5: str | None = None  # an unverified download kept by allow_unknown that is no HDF5 file: its first bytes

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def fetch(
    release: int,
    folder: str | Path | None = None,
    url: str | None = None,
    convert: bool = True,
    fmt: str = "safetensors",
    allow_unknown: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    timeout_s: float = TIMEOUT_S,
    deadline_s: float | None = DEADLINE_S,
) -> FetchResult:
    """Download official release ``release``, verify it, and convert it beside itself with a manifest; files
    already there and right are reused.

    Args:
        release: the official release, 0-4.
        folder: where the files go (default: the user cache, ``converter.cache.weights_dir()``).
        url: where to download from (default: the official URL of the release table).
        convert: also convert it (to ``fmt``, with a manifest).
        fmt: ``safetensors`` or ``pt``.
        allow_unknown: keep a download whose git blob SHA-1 is not the release's.
        force: replace a file in the way, and convert again.
        progress: called with (bytes done, bytes in all or None) as the download goes.
        timeout_s: the longest wait for any network event.
        deadline_s: the longest the whole download may take (None: no limit).

    Returns:
        A ``FetchResult``: the paths left (``h5``, ``weights``, ``manifest``), what was downloaded or converted.

    Raises:
        DownloadError: the network, the server, or the content is wrong; the message names the URL.
        ConversionError: the file cannot be converted, or a file cannot be written.
    """
    official = official_release(release)
    folder = Path(folder) if folder is not None else weights_dir()
    target = folder / official.file
    got = download(
        url or official.url, target, official.git_blob_sha1, allow_unknown=allow_unknown, force=force,
        progress=progress, timeout_s=timeout_s, deadline_s=deadline_s,
    )  # fmt: skip
    result = FetchResult(release, target, got.digests.git_blob_sha1, got.verified, got.downloaded, got.resumed_from)
    if not got.verified:  # kept as allow_unknown asks: say at once when it is no weight file at all
        result = FetchResult(**{**result.__dict__, "not_hdf5": _not_hdf5(target)})
    if not convert:
        return result
    if result.not_hdf5 is not None:
        raise DownloadError(
            f"{target}: downloaded and kept (allow_unknown, --allow-unknown), but it is not an HDF5 file (it starts "
            f"with {result.not_hdf5}), so not a weight file: check the URL, and delete the file"
        )
    weights, manifest = output_paths(target, folder, fmt)
    if not force and conversion_of(weights, manifest) == got.digests.git_blob_sha1:
        return FetchResult(**{**result.__dict__, "weights": weights, "manifest": manifest})
    save_conversion(convert_h5(target), weights, manifest, force=True)  # an outdated conversion is replaced
    return FetchResult(**{**result.__dict__, "weights": weights, "manifest": manifest, "converted": True})


def _not_hdf5(path: Path) -> str | None:
    """None for an HDF5 file; else its first bytes, as a hint of what it is (an HTML page, say)."""
    import h5py

    if h5py.is_hdf5(str(path)):
        return None
    with path.open("rb") as f:
        return repr(f.read(16))


def conversion_of(weights: Path, manifest: Path) -> str | None:
    """The git blob SHA-1 of the file ``weights`` was converted from, when it and its manifest are there and agree
    (the manifest records the weight file's SHA-256); else None."""
    try:
        record = json.loads(manifest.read_text())
        if not weights.is_file() or record["output"]["sha256"] != bytes_digest(weights.read_bytes()):
            return None
        return record["source"]["git_blob_sha1"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pretrained(
    release: int = 4,
    map_location: str | torch.device = "cpu",
    folder: str | Path | None = None,
    url: str | None = None,
    progress: Progress | None = None,
    timeout_s: float = TIMEOUT_S,
    deadline_s: float | None = DEADLINE_S,
) -> ManTraNet:
    """Official release ``release`` as a trained model in eval mode.

    From the cache (``folder``) when its conversion is there; else the official file there is verified and
    converted; else it is downloaded, verified by its git blob SHA-1, converted, and cached with its manifest.

    Args:
        release: the official release, 0-4.
        map_location: where the weights go.
        folder: the cache folder (default ``converter.cache.weights_dir()``).
        url: where to download from (default: the official URL).
        progress: called with (bytes done, bytes in all or None) during a download.
        timeout_s: the longest wait for any network event.
        deadline_s: the longest the whole download may take (None: no limit).

    Returns:
        The trained ``ManTraNet``.

    Raises:
        PretrainedError: it cannot be had; one line naming the URL and where to put the official file by hand.
    """
    official = official_release(release)
    folder = Path(folder) if folder is not None else weights_dir()
    weights, manifest = output_paths(folder / official.file, folder, "safetensors")
    if conversion_of(weights, manifest) == official.git_blob_sha1:
        return load(weights, map_location=map_location).eval()
    source = url or official.url
    try:
        result = fetch(release, folder, url=url, progress=progress, timeout_s=timeout_s, deadline_s=deadline_s)
    except (DownloadError, ConversionError) as e:
        raise PretrainedError(
            f"release {release}: {str(e).rstrip('.')}. Without network access, download {source} elsewhere and "
            f"put it at {folder / official.file}"
        ) from None
    return load(result.weights, map_location=map_location).eval()


def local_status(path: Path, git_blob_sha1: str) -> str:
    """Absent ("-"), "verified", "present, content differs", or "present, " and what is wrong with it."""
    if not os.path.lexists(path):
        return "-"
    problem = file_problem(path)
    if problem:  # a folder, a dangling link, a folder of its path that is a file, ...
        return f"present, {problem}"
    try:
        digests = file_digests(path)
    except OSError as e:
        return f"present, unreadable ({os_reason(e)})"
    return "verified" if digests.git_blob_sha1 == git_blob_sha1 else "present, content differs"


def list_weights(folder: str | Path | None = None) -> dict:
    """The release table with what ``folder`` holds of each entry. What ``mantranet weights list`` prints.

    Args:
        folder: the weights folder (default: the user cache).

    Returns:
        ``{"folder", "official": [...], "earlier_pytorch_port": [...]}``: each entry's file, git blob SHA-1, URL,
        the local file's status (``local_status``) and the formats it was converted to.
    """
    folder = Path(folder) if folder is not None else weights_dir()

    def entry(file: str, git_blob_sha1: str, **fields: object) -> dict:
        local = local_status(folder / file, git_blob_sha1)
        return {"file": file, **fields, "git_blob_sha1": git_blob_sha1, "local": local, "converted": converted(file)}

    def converted(file: str) -> list[str]:
        stem = Path(file).stem
        return [fmt for fmt, suffix in sorted(FORMATS.items()) if (folder / (stem + suffix)).is_file()]

    official = [
        entry(r.file, r.git_blob_sha1, index=r.index, config=r.config.to_dict(), url=r.url) for r in official_releases()
    ]
    port = [entry(c.file, c.git_blob_sha1, holds=c.holds, url=c.url) for c in port_checkpoints()]
    return {"folder": str(folder), "official": official, "earlier_pytorch_port": port}
