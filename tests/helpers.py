"""Small helpers shared by the tests: layouts and official-layout fixture files."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from converter import convert_h5, keras_to_torch, synthetic_keras_weights, write_official_h5
from mantranet_torch import RELEASES, ManTraNet
from mantranet_torch.weights import model_from_state_dict
from parity_tests.shared_data import SAMPLES, SHARED  # noqa: F401 (the tests' one place for ../shared)
from parity_tests.shared_data import SEED_PORT_DETECTOR as SEED_PORT  # noqa: F401


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    """NCHW (or N,T,C,H,W) torch output as a float64 NHWC (N,T,H,W,C) array, the Keras layout."""
    a = t.detach().double().numpy()
    return a.transpose(0, 1, 3, 4, 2) if a.ndim == 5 else a.transpose(0, 2, 3, 1)


def official_file(path: Path, release: int, seed: int = 0, **kwargs) -> dict[str, np.ndarray]:
    """Write an official-layout file for ``release`` with seeded weights; returns its Keras arrays."""
    arrays = synthetic_keras_weights(RELEASES[release], seed)
    write_official_h5(path, arrays, RELEASES[release], **kwargs)
    return arrays


def converted_model(path: Path, variant: int | None = None) -> ManTraNet:
    conversion = convert_h5(path, variant)
    return model_from_state_dict(conversion.state_dict, conversion.config, str(path))


def point_layout_into(path: Path, victim: str, target: str, shift: int = 0) -> None:
    """Rewrite, byte by byte, the data-layout message of dataset ``victim`` so that its data address points into
    ``target``'s storage, as a crafted file would (h5py writes no such file).

    Contiguous: the address in the layout message (version 3: ``03 01``, address, size) becomes target's first
    byte + ``shift``. Chunked (version 3: ``03 02``, rank + 1, chunk-index address, chunk dimensions, element
    size): the chunk-index address becomes target's, so both read the same chunks (``shift`` is ignored; give
    both the same chunk shape). The message is the first such pattern after the dataset's object header address.
    """
    import re

    import h5py

    def layout(dataset: h5py.Dataset) -> tuple[int, re.Match]:
        dsid = dataset.id
        if dsid.get_create_plist().get_layout() == h5py.h5d.CHUNKED:
            dims = b"".join(d.to_bytes(4, "little") for d in (*dataset.chunks, dataset.dtype.itemsize))
            pattern = re.escape(b"\x03\x02" + bytes([dataset.ndim + 1])) + b"(.{8})" + re.escape(dims)
        else:
            address = dsid.get_offset().to_bytes(8, "little") + dsid.get_storage_size().to_bytes(8, "little")
            pattern = b"\x03\x01(.{8})" + re.escape(address[8:])
        header = h5py.h5o.get_info(dsid).addr
        found = re.compile(pattern, re.DOTALL).search(data, header)
        assert found is not None and found.start() - header < 4096, f"no layout message for {dataset.name}"
        return dsid.get_offset() or 0, found

    data = bytearray(path.read_bytes())
    with h5py.File(path, "r") as f:
        (_, victim_layout), (target_at, target_layout) = layout(f[victim]), layout(f[target])
        chunked = f[victim].chunks is not None
    address = target_layout.group(1) if chunked else (target_at + shift).to_bytes(8, "little")
    data[victim_layout.start(1) : victim_layout.end(1)] = address
    path.write_bytes(bytes(data))


@functools.cache
def synthetic_model(release: int, seed: int | None = None) -> ManTraNet:
    """Release ``release``'s model in eval mode with seeded synthetic weights (seed: the release's index unless
    given), built once per session: callers only run it."""
    config = RELEASES[release]
    model = ManTraNet(config)
    model.load_state_dict(
        keras_to_torch(synthetic_keras_weights(config, release if seed is None else seed), config, "synthetic")
    )
    return model.eval()


@functools.cache
def downscaled_photo() -> np.ndarray:
    """A real photograph (the shared original I45_2zzbvc.jpg, a sixth of its size), or 200 x 200 pixels of seeded
    noise when the shared samples are absent. Callers get the same array: they copy before changing it."""
    path = SAMPLES / "original" / "I45_2zzbvc.jpg"
    if not path.exists():
        return np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    photo = Image.open(path).convert("RGB")
    return np.array(photo.resize((photo.width // 6, photo.height // 6), Image.BILINEAR))
