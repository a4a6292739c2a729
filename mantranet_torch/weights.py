"""The PyTorch weight files: safetensors (default) or a plain .pt state dict, each carrying its config.

A safetensors file keeps the architecture in its string metadata; a .pt file keeps it in the state
dict's own ``_metadata`` (what ``torch.load(weights_only=True)`` restores and ``load_state_dict``
ignores), so either file alone is enough to rebuild the model.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor

from .config import GRU, LSTM, ManTraNetConfig
from .files import file_problem, listing, one_paragraph, os_reason
from .model import ManTraNet

CONFIG_KEY = "mantranet.config"
PROVENANCE_KEY = "mantranet.provenance"
SAFETENSORS_SUFFIX = ".safetensors"
PT_SUFFIXES = (".pt", ".pth")
H5_SUFFIXES = (".h5", ".hdf5")  # Keras' weight files
MAX_PT_BYTES = 1 << 30  # ManTraNet's weights take 15 MB: an archive unpacking to more is refused unread
MANIFEST_SUFFIX = ".json"  # a weight file's manifest: NAME.safetensors.json beside NAME.safetensors
MAX_MANIFEST_BYTES = 1 << 20  # ours take 1-2 KB: a bigger file of that name is someone else's
MODEL_PARTS = ("featex", "detector")
HDF5, PYTORCH, SAFETENSORS = "HDF5", "PyTorch checkpoint", "safetensors"  # what ``sniff`` tells apart
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at offset 0, or 512, 1024, 2048, ... after a user block
ZIP_MAGIC, PICKLE_PROTOCOL_2 = b"PK\x03\x04", b"\x80\x02"  # torch.save's zip archive, and its legacy format
RECURRENT_MODULES = {LSTM: "detector.clstm.", GRU: "detector.cgru."}  # state-dict prefix, by config.recurrent
# A BatchNorm variance (ours, or a Keras dataset path): negative values are refused, no data gives them
VARIANCE_KEY = re.compile(r"(^|[./])moving_variance(:\d+)?$")
# torch.load's text around the reason it refused a file: the same for every file, so left out of ours
_TORCH_BOILERPLATE = re.compile(r"^(Weights only load failed|Check the documentation of torch\.load)")


class WeightFileError(ValueError):
    """A weight file that cannot be read as ManTraNet weights; the message names the file."""


class WeightCastWarning(UserWarning):
    """Weights stored in another floating-point type than the model's float32, cast on loading."""


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
    problem = file_problem(path)
    if problem:
        raise WeightFileError(f"{path}: {problem}")
    suffix = path.suffix.lower()
    if suffix not in (SAFETENSORS_SUFFIX, *PT_SUFFIXES, *H5_SUFFIXES):
        suffix = {SAFETENSORS: SAFETENSORS_SUFFIX, PYTORCH: PT_SUFFIXES[0], HDF5: H5_SUFFIXES[0]}.get(
            sniff(path), suffix
        )
    if suffix in (SAFETENSORS_SUFFIX, *PT_SUFFIXES):
        check_manifest(path)
    if suffix == SAFETENSORS_SUFFIX:
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
                metadata = f.metadata() or {}
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
            raise WeightFileError(f"{path}: not a readable safetensors file ({one_paragraph(str(e), path)})") from None
        if not all(isinstance(v, str) for v in metadata.values()):
            raise WeightFileError(f"{path}: not a readable safetensors file (metadata values must be strings)")
        return tensors, dict(metadata)
    if suffix in PT_SUFFIXES:
        check_pt_size(path)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt or code-carrying pickles
            raise WeightFileError(f"{path}: {torch_load_reason(e, path)}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise WeightFileError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
        if not all(isinstance(k, str) for k in sd):
            raise WeightFileError(f"{path}: expected a state dict of tensors, but a key is not a str")
        metadata = getattr(sd, "_metadata", None)
        metadata = metadata.get("", {}) if isinstance(metadata, dict) else {}
        metadata = metadata if isinstance(metadata, dict) else {}
        return dict(sd), {k: v for k, v in metadata.items() if isinstance(k, str) and isinstance(v, str)}
    if suffix in H5_SUFFIXES:
        raise WeightFileError(
            f"{path}: a Keras HDF5 file; load it with converter.load_weights, or convert it with `mantranet convert`"
        )
    raise WeightFileError(f"{path}: unknown weight format {suffix!r} (expected .safetensors, .pt or .pth)")


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + MANIFEST_SUFFIX)


def check_manifest(path: Path) -> None:
    """Refuse a weight file whose manifest (written with it by ``mantranet convert``) describes another file:
    the two were left from different runs. A file without a manifest, or beside a JSON file that is not one
    of ours, is taken as it is (its own metadata carries its provenance)."""
    manifest = manifest_path(path)
    if file_problem(manifest) or manifest.stat().st_size > MAX_MANIFEST_BYTES:
        return
    try:
        record = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return
    output = record.get("output") if isinstance(record, dict) else None
    if not isinstance(output, dict) or output.get("name") != path.name or not isinstance(output.get("sha256"), str):
        return
    try:
        with path.open("rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise WeightFileError(f"{path}: cannot be read ({os_reason(e)})") from None
    if sha256 != output["sha256"]:
        raise WeightFileError(
            f"{path}: its manifest {manifest.name} describes another file (sha256 {output['sha256'][:16]}..., this "
            f"file's is {sha256[:16]}...): the two are from different runs. Convert again, or delete "
            f"{manifest.name} to use the file as it is"
        )


def check_pt_size(path: Path) -> None:
    """Refuse, before ``torch.load`` unpacks it, a zip archive (torch.save's format) that would unpack to
    more than MAX_PT_BYTES: its members may be compressed, so its size on disk does not bound its memory."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # torch.load gives the reason
    if unpacked > MAX_PT_BYTES:
        raise WeightFileError(
            f"{path}: its archive unpacks to {unpacked:,} bytes, more than the {MAX_PT_BYTES:,} any ManTraNet "
            "weight file takes"
        )


def torch_load_reason(error: Exception, path: str | Path) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one paragraph: the global it would have to
    import (code it would run), or torch's own reason without the advice it gives around every reason."""
    text = str(error)
    found = re.search(r"GLOBAL\s+([\w.]+)", text)
    if found:
        return (
            f"refused: loading it would run code (it pickles {found.group(1)}); only plain state dicts of tensors "
            "are read (torch.load with weights_only=True). Re-save it with torch.save(model.state_dict(), ...) "
            "where you trust its source"
        )
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip() and not _TORCH_BOILERPLATE.match(p.strip())]
    reason = one_paragraph("\n\n".join(paragraphs), path) or type(error).__name__
    return f"not a plain PyTorch state dict (torch.load with weights_only=True: {reason})"


def _tensor_kind(value: Tensor) -> str | None:
    """What makes a tensor unusable as weights: nested, sparse, or without data (meta); None for a dense one."""
    if value.is_nested:
        return "nested"
    if value.layout != torch.strided:
        return f"{value.layout}".removeprefix("torch.")
    if value.device.type == "meta":
        return "meta (data-less)"
    return None


def check_weight_values(
    values: Mapping[str, Tensor | np.ndarray], source: str, names: Mapping[str, str] | None = None
) -> None:
    """Every array floating point and finite in float32, every BatchNorm variance >= 0; else WeightFileError.

    The one check of weight values, run by every loader (``model_from_state_dict``) and by the converters on
    the file's own arrays. ``names`` maps a key to the name the message uses (a Keras array's path, say).
    """
    for key, value in values.items():
        name = (names or {}).get(key, key)
        if isinstance(value, Tensor):
            kind = _tensor_kind(value)
            if kind:
                raise WeightFileError(f"{source}: {name} is a {kind} tensor, expected a dense one holding its values")
            if not value.is_floating_point():
                raise WeightFileError(f"{source}: {name} has dtype {value.dtype}, expected floating point")
            as_float32 = value.detach().to("cpu", torch.float32).numpy()
        else:
            if value.dtype.kind != "f":
                raise WeightFileError(f"{source}: {name} has dtype {value.dtype}, expected floating point")
            with np.errstate(over="ignore"):
                as_float32 = np.asarray(value, dtype=np.float32)
        bad = ~np.isfinite(as_float32)  # a value beyond float32's range became inf, and is refused
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise WeightFileError(
                f"{source}: {name} holds {int(bad.sum())} value(s) that are not finite in float32, "
                f"the first {value[index].item()} at index {index}"
            )
        if VARIANCE_KEY.search(key):
            negative = as_float32 < 0
            if negative.any():
                index = tuple(int(i) for i in np.argwhere(negative)[0])
                raise WeightFileError(
                    f"{source}: {name} holds {int(negative.sum())} negative variance(s), the first "
                    f"{value[index].item()} at index {index}; a variance is never negative"
                )


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
            f"{path}: carries no ManTraNet config in its metadata (files written by `mantranet convert` do): name "
            "the release whose architecture it has (--variant N on the command line, config=RELEASES[N] in "
            "Python), or convert its official .h5 again with `mantranet convert`"
        )
    return tensors, config, metadata


def metadata_config(path: str | Path, metadata: dict[str, str]) -> ManTraNetConfig | None:
    """The config a weight file's metadata carries, or None when it carries none."""
    if CONFIG_KEY not in metadata:
        return None
    try:
        return ManTraNetConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
    except (ValueError, KeyError, TypeError, OverflowError) as e:
        raise WeightFileError(f"{path}: malformed ManTraNet config in its metadata ({e})") from None


def load(
    path: str | Path, config: ManTraNetConfig | None = None, map_location: str | torch.device = "cpu"
) -> ManTraNet:
    """A weight file of this project (``.safetensors`` or ``.pt``) as a model; needs nothing but torch and
    safetensors (``converter.load_weights`` reads every other kind too).

    Args:
        path: the weight file.
        config: the architecture, taking precedence over the one the file records.
        map_location: where the weights go.

    Returns:
        The model in eval mode.

    Raises:
        WeightFileError: the file cannot be read as ManTraNet weights; the message names it and why.
    """
    tensors, config, _ = read_model_weights(path, config)
    return model_from_state_dict(tensors, config, str(path)).to(map_location)


@functools.lru_cache(maxsize=16)
def state_shapes(config: ManTraNetConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of ``ManTraNet(config)``, from a model on the meta device (nothing allocated).
    Cached: read-only for callers."""
    with torch.device("meta"):
        model = ManTraNet(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def model_from_state_dict(state: dict[str, Tensor], config: ManTraNetConfig, source: str) -> ManTraNet:
    """``ManTraNet(config)`` holding ``state`` (loaded strictly), in eval mode; a misfit names ``source``."""
    check_weight_values(state, source)  # first: a nested or sparse tensor has no shape to compare
    shapes = state_shapes(config)  # then the shapes, without allocating: a config may declare a huge model
    problems = [f"missing key {k}" for k in shapes if k not in state]
    problems += [f"unexpected key {k}" for k in state if k not in shapes]
    problems += [
        f"{k}: expected shape {shapes[k]}, found {tuple(v.shape)}"
        for k, v in state.items()
        if k in shapes and tuple(v.shape) != shapes[k]
    ]
    if problems:
        raise WeightFileError(
            f"{source}: does not fit ManTraNet {config.to_dict()}: {_recurrent_mismatch(state, config)}"
            f"{listing(problems)}"
        )
    model = ManTraNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightFileError(f"{source}: does not fit ManTraNet {config.to_dict()}: {one_paragraph(str(e))}") from None
    cast = sorted({str(v.dtype).removeprefix("torch.") for v in state.values() if v.dtype != torch.float32})
    if cast:
        warnings.warn(
            WeightCastWarning(f"{source}: weights stored as {', '.join(cast)}, cast to float32"), stacklevel=2
        )
    return model.eval()


def _recurrent_mismatch(state: Mapping[str, Tensor], config: ManTraNetConfig) -> str:
    """Why a state dict of the other detector variant misfits, to say first, where that is the case; else ''."""
    held = [kind for kind, prefix in RECURRENT_MODULES.items() if any(k.startswith(prefix) for k in state)]
    if len(held) != 1 or held[0] == config.recurrent:
        return ""
    theirs, ours = RECURRENT_MODULES[held[0]].rstrip("."), RECURRENT_MODULES[config.recurrent].rstrip(".")
    return (
        f"its recurrent layer is {theirs} (recurrent={held[0]!r}), the config's {ours} "
        f"(recurrent={config.recurrent!r}); "
    )


def _dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
