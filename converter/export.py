"""Our weight files back to an official-layout Keras HDF5 file, which the original code loads as it loads
the official releases (weights fine-tuned in PyTorch go back to Keras this way)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mantranet_torch import RELEASES, ManTraNetConfig
from mantranet_torch.files import folder_lock, make_parent, publish, refuse_existing, remove_stale_parts, staged_path
from mantranet_torch.weights import H5_SUFFIXES, PROVENANCE_KEY, check_weight_values, read_model_weights

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
    warnings: list[str] = field(default_factory=list)  # what the written file cannot say (see config_warning)


def config_warning(config: ManTraNetConfig) -> str | None:
    """Why an official-layout file misleads for ``config``, or None when the original code builds it.

    A Keras .h5 holds arrays only: the original code builds one of the releases' architectures, picked by
    the user, so windows or a transform activation outside them are lost in the file (the weights' shapes
    do not depend on them). Written all the same (the arrays are exact), with this warning.
    """
    if config in RELEASES.values():
        return None
    same = [
        (n, c)
        for n, c in RELEASES.items()
        if c.first_block_filters == config.first_block_filters and len(c.window_sizes) == len(config.window_sizes)
    ]
    built = (
        f"it builds Ptrain{same[-1][0]}'s ({same[-1][1].describe()}) for these arrays"
        if same
        else "it builds no model of these shapes"
    )
    return (
        f"the original code cannot express this config ({config.describe()}): a Keras .h5 holds arrays only, and "
        f"{built}; maps computed from the written file there differ from this model's"
    )


def export_keras(
    weights: str | Path, target: str | Path, layout: str = WEIGHTS_ONLY, force: bool = False, variant: int | None = None
) -> Export:
    """Write ``weights`` as an official-layout HDF5 file, atomically: back to the original Keras code.

    Args:
        weights: our ``.safetensors`` or ``.pt`` file.
        target: the ``.h5`` (or ``.hdf5``) file.
        layout: ``WEIGHTS_ONLY`` (``save_weights``'s layout) or ``FULL_MODEL`` (``model.save``'s).
        force: replace an existing ``target``.
        variant: the release whose architecture the file has, when its metadata carries no config (it takes
            precedence).

    Returns:
        An ``Export``: the path, config, layout, array count and provenance; its ``warnings`` say what the file
        cannot record (a config the original code cannot build).

    Raises:
        WeightFileError: a file every loader refuses (non-float or non-finite values, say): one verdict.
        ConversionError: a bad layout or suffix, an existing output, or weights that cannot be read or written.
    """
    weights, target = Path(weights), Path(target)
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if target.suffix.lower() not in H5_SUFFIXES:
        raise ConversionError(f"{target}: a Keras weight file must end in .h5 or .hdf5")
    refuse_existing([target], force)
    if variant is not None and variant not in RELEASES:
        raise ConversionError(f"variant {variant}: no such release; releases are {sorted(RELEASES)}")
    tensors, config, metadata = read_model_weights(weights, RELEASES[variant] if variant is not None else None)
    check_official_layout(config, str(weights))
    check_weight_values(tensors, str(weights))  # the loaders' check: a file detect refuses is not exported
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
    warning = config_warning(config)
    return Export(target, config, layout, len(arrays), uses_frozen_order(config), provenance, [warning] * bool(warning))


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
