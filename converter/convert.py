"""Keras HDF5 to PyTorch: read, identify, map, verify, then save with a provenance manifest."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import torch

import mantranet_torch
from mantranet_torch import RELEASES, ManTraNetConfig
from mantranet_torch.config import FIXED_FIRST_LAYER_FILTERS
from mantranet_torch.files import refuse_existing, write_files_atomic
from mantranet_torch.weights import encode_pt, encode_safetensors, manifest_path, model_from_state_dict

from .cache import weights_dir
from .errors import ConversionError
from .keras_h5 import WEIGHTS_ONLY, KerasWeights, read_keras_h5, write_keras_h5
from .mapping import (
    REGULAR_KERNEL,
    check_keras_shapes,
    check_official_layout,
    keras_to_torch,
    official_layers,
    torch_to_keras,
    uses_frozen_order,
)
from .releases import Digests, Identification, bytes_digest, file_digests, resolve_variant

TOOL_NAME = "mantranet-torch"
FORMATS = {"safetensors": ".safetensors", "pt": ".pt"}
PROBE_SIZE = 9  # a probe image large enough to exercise every padding path, small enough to be instant


def tool_version() -> str:
    return mantranet_torch.__version__


class Converted(Protocol):
    """What ``save_conversion`` writes: an HDF5 ``Conversion`` or an import from the earlier port."""

    config: ManTraNetConfig
    state_dict: dict[str, torch.Tensor]

    def provenance(self) -> dict: ...


@dataclass
class Conversion:
    source: Path
    keras: KerasWeights
    digests: Digests
    identification: Identification
    config: ManTraNetConfig
    state_dict: dict[str, torch.Tensor]

    def provenance(self) -> dict:
        release = self.identification.release
        return {
            "source": {
                "name": self.source.name,
                "size": self.digests.size,
                "sha256": self.digests.sha256,
                "git_blob_sha1": self.digests.git_blob_sha1,
                "layout": self.keras.layout,
            },
            "release": None if release is None else {"index": release.index, "file": release.file},
            "variant": self.identification.index,
            "identified_by": self.identification.by,
            "config": self.config.to_dict(),
            "tool": {"name": TOOL_NAME, "version": tool_version()},
        }


def first_block_filters(arrays: Mapping[str, np.ndarray | h5py.Dataset]) -> int | None:
    """b1c1's width, read off the regular kernel's shape (HWIO, out = width - the 9 SRM and 3 Bayar filters)."""
    kernel = arrays.get(REGULAR_KERNEL)
    return None if kernel is None or len(kernel.shape) != 4 else int(kernel.shape[3]) + FIXED_FIRST_LAYER_FILTERS


def identify_keras_file(
    path: str | Path, variant: int | None = None
) -> tuple[KerasWeights, Digests, Identification, ManTraNetConfig]:
    """Read a Keras file and decide its release as every tool here does: hash, then name, then ``variant``."""
    path = Path(path)
    found: list[tuple[Digests, Identification]] = []

    def check(datasets: Mapping[str, h5py.Dataset]) -> None:  # before any array is read
        digests = file_digests(path)
        ident = resolve_variant(path, digests, first_block_filters(datasets), variant)
        check_keras_shapes({k: d.shape for k, d in datasets.items()}, RELEASES[ident.index], str(path))
        found.append((digests, ident))

    keras = read_keras_h5(path, check)
    digests, ident = found[0]
    return keras, digests, ident, RELEASES[ident.index]


def convert_h5(path: str | Path, variant: int | None = None) -> Conversion:
    """Read an official-layout Keras file, identify its release and map its arrays to PyTorch, checked: a strict
    load, a bit-exact round trip and a finite probe output (what ``mantranet convert`` does before writing).

    Args:
        path: an official-layout ``.h5`` file (either layout the official code writes).
        variant: the release 0-4 when neither the file's hash nor its name tells.

    Returns:
        The ``Conversion``: the state dict, the release's config, the file's digests and identification.

    Raises:
        ConversionError: the file is not what it should be; the message names the file and the layer or array.
    """
    path = Path(path)
    keras, digests, ident, config = identify_keras_file(path, variant)
    state = keras_to_torch(keras.arrays, config, str(path))
    conversion = Conversion(path, keras, digests, ident, config, state)
    verify(conversion)
    return conversion


def probe_image() -> torch.Tensor:
    """A fixed 1 x 3 x 9 x 9 input spanning [-1, 1], run by every conversion to check its outputs are finite."""
    return torch.linspace(-1.0, 1.0, 3 * PROBE_SIZE * PROBE_SIZE).reshape(1, 3, PROBE_SIZE, PROBE_SIZE)


def verify(conversion: Conversion) -> None:
    """The model takes the state dict strictly, maps back to the file's arrays bit for bit, and runs finite."""
    model = model_from_state_dict(conversion.state_dict, conversion.config, str(conversion.source))
    for path, value in torch_to_keras(conversion.state_dict).items():
        if not np.array_equal(value, conversion.keras.arrays[path].astype(np.float32)):
            raise AssertionError(f"mapping round trip changed {path}")
    with torch.inference_mode():
        out = model(probe_image())
    if not torch.isfinite(out).all():
        raise ConversionError(f"{conversion.source}: the converted model gives non-finite outputs on a probe image")


def output_paths(source: Path, out: str | Path | None, fmt: str) -> tuple[Path, Path]:
    """The weight file and its manifest. ``out`` may be a file, a folder (an existing one, one given with a
    trailing slash, or a new path without a suffix: created), or None (the weights folder)."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    suffix = FORMATS[fmt]
    if out is None:
        target = weights_dir() / (source.stem + suffix)
    else:
        folder = Path(out).is_dir() or str(out).endswith(("/", os.sep)) or not Path(out).suffix
        target = Path(out) / (source.stem + suffix) if folder else Path(out)
    if target.suffix != suffix:
        raise ConversionError(f"{target}: a {fmt} output must end in {suffix}")
    return target, manifest_path(target)


def save_conversion(conversion: Converted, target: Path, manifest_path: Path, force: bool = False) -> dict:
    """Write the weight file and its manifest atomically: never one beside the other of another run.

    Args:
        conversion: what ``convert_h5`` (or the earlier port's import) returned.
        target: the weight file, ``.safetensors`` or ``.pt``.
        manifest_path: its manifest (JSON).
        force: replace existing files.

    Returns:
        The manifest written: the provenance and the weight file's name, SHA-256 and size.

    Raises:
        ConversionError: an output exists without ``force``, or cannot be written.
    """
    refuse_existing([target, manifest_path], force)
    provenance = conversion.provenance()
    encode = encode_pt if target.suffix == FORMATS["pt"] else encode_safetensors
    data = encode(conversion.state_dict, conversion.config, provenance)
    manifest = {**provenance, "output": {"name": target.name, "sha256": bytes_digest(data), "size": len(data)}}
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    write_files_atomic({target: data, manifest_path: manifest_bytes}, force)
    return manifest


def write_official_h5(
    path: str | Path,
    arrays: dict[str, np.ndarray],
    config: ManTraNetConfig,
    layout: str = WEIGHTS_ONLY,
    str_attrs: bool = False,
    frozen_first_layers: bool | None = None,
) -> None:
    """Write Keras arrays as an official-layout file (35 arrays, 10 layer groups).

    ``frozen_first_layers`` defaults to what the official loader expects for ``config``.
    """
    check_official_layout(config, "arrays")
    if frozen_first_layers is None:
        frozen_first_layers = uses_frozen_order(config)
    keras_to_torch(arrays, config, "arrays")  # the same strict checks as reading
    write_keras_h5(path, official_layers(arrays, frozen_first_layers), layout=layout, str_attrs=str_attrs)
