"""One loader for every weight file this project reads: official Keras ``.h5`` (converted in memory, nothing
written), this project's ``.safetensors`` / ``.pt``, and the earlier PyTorch port's checkpoints."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from mantranet_torch import RELEASES, ManTraNet, ManTraNetConfig
from mantranet_torch.files import file_problem
from mantranet_torch.weights import (
    HDF5,
    PYTORCH,
    WeightCastWarning,
    WeightFileError,
    load,
    model_from_state_dict,
    model_parts,
    sniff,
)

from .convert import convert_h5
from .errors import ConversionError
from .legacy import EarlierPortWarning, load_earlier_port, read_checkpoint

WeightPaths = str | Path | Sequence[str | Path]


def load_weights(
    path: WeightPaths,
    variant: int | None = None,
    config: ManTraNetConfig | None = None,
    map_location: str | torch.device = "cpu",
    quiet: bool = False,
) -> ManTraNet:
    """The model a weight file holds, in eval mode on ``map_location``; the format is read off the content.

    - an official-layout Keras HDF5 file: identified (content hash, then file name, then ``variant``) and
      converted in memory with every check ``mantranet convert`` makes;
    - a ``.safetensors`` / ``.pt`` file of this project: its config from its metadata (``config``, or release
      ``variant``'s, takes precedence);
    - the earlier PyTorch port's ``MantraNetv4.pt``, or its ``IMTFEv4.pt`` and ``AnomalyDetectorv4.pt`` together
      (a sequence of two paths): imported with Ptrain4's architecture unless ``config``/``variant`` say otherwise.
      Its approximations come as ``EarlierPortWarning`` unless ``quiet``. Arrays stored in another float type
      than float32 are cast, with a ``WeightCastWarning``.

    Args:
        path: the file, or the earlier port's two files.
        variant: the release 0-4 when the file does not tell.
        config: the architecture, instead of the one the file records or implies.
        map_location: where the weights go.
        quiet: no ``EarlierPortWarning``.

    Returns:
        The model in eval mode.

    Raises:
        ConversionError: an official-layout or earlier-port file that cannot be converted; the message names
            the file and what is wrong.
        WeightFileError: a file of this project that cannot be read.
    """
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    if not paths:
        raise ConversionError("no weight file given")
    for p in paths:
        problem = file_problem(p)
        if problem:
            raise WeightFileError(f"{p}: {problem}")
    if variant is not None and variant not in RELEASES:
        raise ConversionError(f"variant {variant}: no such release; releases are {sorted(RELEASES)}")
    first = paths[0]
    kind = sniff(first)
    if kind is None:
        raise WeightFileError(
            f"{first}: not a weight file this project reads: by its first bytes neither HDF5 (an official .h5), "
            "safetensors nor a PyTorch checkpoint"
        )
    if len(paths) == 1 and kind == HDF5:
        conversion = convert_h5(first, variant)
        for note in conversion.keras.notes:
            warnings.warn(f"{first}: {note}", WeightCastWarning, stacklevel=2)
        return model_from_state_dict(conversion.state_dict, conversion.config, str(first)).to(map_location)
    chosen = config or (RELEASES[variant] if variant is not None else None)
    if len(paths) == 1 and kind != PYTORCH:
        return load(first, chosen, map_location)  # safetensors, or a name-and-content mismatch it reports
    if len(paths) == 1 and model_parts(read_checkpoint(first)):
        return load(first, chosen, map_location)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", EarlierPortWarning)
        state, result = load_earlier_port(paths, chosen)
    if result.partial:
        raise WeightFileError(
            f"{', '.join(map(str, paths))}: hold only the earlier port's {result.parts[0]}, not a whole model; "
            "pass IMTFEv4.pt and AnomalyDetectorv4.pt together"
        )
    return model_from_state_dict(state, result.config, ", ".join(map(str, paths))).to(map_location)
