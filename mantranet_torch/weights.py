"""The PyTorch weight files: safetensors (default) or a plain .pt state dict, each carrying its config.

A safetensors file keeps the architecture in its string metadata; a .pt file keeps it in the state
dict's own ``_metadata`` (what ``torch.load(weights_only=True)`` restores and ``load_state_dict``
ignores), so either file alone is enough to rebuild the model.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor

from .config import ManTraNetConfig
from .model import ManTraNet

CONFIG_KEY = "mantranet.config"
PROVENANCE_KEY = "mantranet.provenance"
SAFETENSORS_SUFFIX = ".safetensors"
PT_SUFFIXES = (".pt", ".pth")
H5_SUFFIXES = (".h5", ".hdf5")  # Keras' weight files
MODEL_PARTS = ("featex", "detector")
HDF5, PYTORCH, SAFETENSORS = "HDF5", "PyTorch checkpoint", "safetensors"  # what ``sniff`` tells apart
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at offset 0, or 512, 1024, 2048, ... after a user block
ZIP_MAGIC, PICKLE_PROTOCOL_2 = b"PK\x03\x04", b"\x80\x02"  # torch.save's zip archive, and its legacy format


class WeightFileError(ValueError):
    """A weight file that cannot be read as ManTraNet weights; the message names the file."""


def encode_safetensors(state_dict: dict[str, Tensor], config: ManTraNetConfig, provenance: dict) -> bytes:
    metadata = {CONFIG_KEY: _dumps(config.to_dict()), PROVENANCE_KEY: _dumps(provenance)}
    data = safetensors_save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata)
    return _canonical_header(data)


def _canonical_header(data: bytes) -> bytes:
    """Rewrite a safetensors header with sorted keys: safetensors orders metadata keys at random.

    Layout: an 8-byte little-endian header length, the JSON header (space-padded to a multiple of 8),
    then the tensor data, whose offsets are relative to its own start and so stay valid.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def encode_pt(state_dict: dict[str, Tensor], config: ManTraNetConfig, provenance: dict) -> bytes:
    sd = OrderedDict((k, v.contiguous()) for k, v in state_dict.items())
    sd._metadata = OrderedDict({"": {CONFIG_KEY: _dumps(config.to_dict()), PROVENANCE_KEY: _dumps(provenance)}})
    buf = io.BytesIO()  # saving to a buffer keeps the archive's inner names, and so the bytes, fixed
    torch.save(sd, buf)
    return buf.getvalue()


def sniff(path: str | Path) -> str | None:
    """A weight file's format by its first bytes, whatever its name: HDF5, PYTORCH, SAFETENSORS or None."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
        offset = 0
        while offset + len(HDF5_SIGNATURE) <= size:
            f.seek(offset)
            if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return HDF5
            offset = 512 if offset == 0 else 2 * offset
    if head.startswith((ZIP_MAGIC, PICKLE_PROTOCOL_2)):
        return PYTORCH
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return SAFETENSORS
    return None


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and string metadata of a .safetensors or .pt file (metadata may be empty); a file of another
    name is read by its content."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (SAFETENSORS_SUFFIX, *PT_SUFFIXES, *H5_SUFFIXES):
        suffix = {SAFETENSORS: SAFETENSORS_SUFFIX, PYTORCH: PT_SUFFIXES[0], HDF5: H5_SUFFIXES[0]}.get(
            sniff(path), suffix
        )
    if suffix == SAFETENSORS_SUFFIX:
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
                return tensors, dict(f.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise WeightFileError(f"{path}: not a readable safetensors file ({e})") from None
    if suffix in PT_SUFFIXES:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt or code-carrying pickles
            raise WeightFileError(f"{path}: not a loadable weights-only PyTorch file ({e})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise WeightFileError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
        metadata = getattr(sd, "_metadata", {}).get("", {})
        return dict(sd), {k: v for k, v in metadata.items() if isinstance(v, str)}
    if suffix in H5_SUFFIXES:
        raise WeightFileError(
            f"{path}: a Keras HDF5 file; load it with converter.load_weights, or convert it with `mantranet convert`"
        )
    raise WeightFileError(f"{path}: unknown weight format {suffix!r} (expected .safetensors, .pt or .pth)")


def model_parts(tensors: dict[str, Tensor]) -> tuple[str, ...]:
    """The parts of ManTraNet (``featex``, ``detector``) that a state dict holds tensors of, in model order."""
    return tuple(p for p in MODEL_PARTS if any(k.startswith(p + ".") for k in tensors))


def read_model_weights(
    path: str | Path, config: ManTraNetConfig | None = None
) -> tuple[dict[str, Tensor], ManTraNetConfig, dict[str, str]]:
    """A whole model's tensors, its config (``config`` takes precedence over the file's) and the metadata."""
    tensors, metadata = read_weights(path)
    parts = model_parts(tensors)
    if 0 < len(parts) < len(MODEL_PARTS):
        present = parts[0]
        raise WeightFileError(
            f"{path}: holds only the model's {present} (a partial import), not a full model; load its tensors "
            f"into ManTraNet(config).{present} without the '{present}.' prefix"
        )
    config = config or metadata_config(path, metadata)
    if config is None:
        raise WeightFileError(
            f"{path}: carries no ManTraNet config in its metadata (files written by `mantranet convert` do); "
            "in Python, pass config="
        )
    return tensors, config, metadata


def metadata_config(path: str | Path, metadata: dict[str, str]) -> ManTraNetConfig | None:
    """The config a weight file's metadata carries, or None when it carries none."""
    if CONFIG_KEY not in metadata:
        return None
    try:
        return ManTraNetConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
    except (ValueError, KeyError, TypeError) as e:
        raise WeightFileError(f"{path}: malformed ManTraNet config in its metadata ({e})") from None


def load(
    path: str | Path, config: ManTraNetConfig | None = None, map_location: str | torch.device = "cpu"
) -> ManTraNet:
    """The model in eval mode, its architecture read from the file (or ``config``, which takes precedence)."""
    tensors, config, _ = read_model_weights(path, config)
    return model_from_state_dict(tensors, config, str(path)).to(map_location)


def model_from_state_dict(state: dict[str, Tensor], config: ManTraNetConfig, source: str) -> ManTraNet:
    """``ManTraNet(config)`` holding ``state`` (loaded strictly), in eval mode; a misfit names ``source``."""
    model = ManTraNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightFileError(f"{source}: does not fit ManTraNet {config.to_dict()}: {e}") from None
    return model.eval()


def _dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
