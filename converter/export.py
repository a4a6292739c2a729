"""Our weight files back to an official-layout Keras HDF5 file, which the original code loads as it loads
the official releases (weights fine-tuned in PyTorch go back to Keras this way)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mantranet_torch import ManTraNetConfig
from mantranet_torch.files import folder_lock, make_parent, publish, refuse_existing, remove_stale_parts, staged_path
from mantranet_torch.weights import H5_SUFFIXES, PROVENANCE_KEY, read_model_weights

from .convert import write_official_h5
from .errors import ConversionError
from .keras_h5 import LAYOUTS, WEIGHTS_ONLY
from .mapping import check_official_layout, torch_to_keras, uses_frozen_order


@dataclass
class Export:
    target: Path
    config: ManTraNetConfig
    layout: str
    arrays: int
    frozen_order: bool  # Featex's first layers listed last, as the official loader expects for this config
    provenance: dict | None


def export_keras(weights: str | Path, target: str | Path, layout: str = WEIGHTS_ONLY, force: bool = False) -> Export:
    """Write ``weights`` (our .safetensors or .pt) as an official-layout HDF5 file, atomically."""
    weights, target = Path(weights), Path(target)
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if target.suffix.lower() not in H5_SUFFIXES:
        raise ConversionError(f"{target}: a Keras weight file must end in .h5 or .hdf5")
    refuse_existing([target], force)
    tensors, config, metadata = read_model_weights(weights)
    check_official_layout(config, str(weights))
    provenance = read_provenance(weights, metadata)  # before anything is written
    try:
        arrays = torch_to_keras(tensors)
    except ConversionError as e:
        raise ConversionError(f"{weights}: {e}") from None
    make_parent(target)
    try:
        with folder_lock(target.parent), remove_stale_parts(target), staged_path(target) as tmp:
            try:
                write_official_h5(tmp, arrays, config, layout=layout)  # checks every shape and value first
            except ConversionError as e:
                raise ConversionError(f"{weights}: {str(e).removeprefix('arrays: ')}") from None
            publish(tmp, target, force)
    except OSError as e:
        raise ConversionError(f"{target}: cannot write ({e.strerror or e})") from None
    return Export(target, config, layout, len(arrays), uses_frozen_order(config), provenance)


def read_provenance(path: Path, metadata: dict[str, str]) -> dict | None:
    """The provenance record a weight file of ours carries (a JSON object), None when it carries none."""
    if PROVENANCE_KEY not in metadata:
        return None
    try:
        provenance = json.loads(metadata[PROVENANCE_KEY])
    except ValueError as e:
        raise ConversionError(f"{path}: its provenance metadata ({PROVENANCE_KEY}) is not JSON ({e})") from None
    if not isinstance(provenance, dict):
        raise ConversionError(
            f"{path}: its provenance metadata ({PROVENANCE_KEY}) is a JSON {type(provenance).__name__}, "
            "expected an object; the file was altered or not written by this project"
        )
    return provenance
