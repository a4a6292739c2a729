"""Precision: where bf16 is native, what auto picks, the slow-bf16 warning, and true float32 around each call."""

from __future__ import annotations

import contextlib
import io
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mantranet_cli.main import main
from mantranet_torch import RELEASES, ManTraNet, SlowPrecisionWarning, bf16_support
from mantranet_torch.precision import FLOAT32_FLAGS, FLOAT32_SETTINGS, resolve_precision
from mantranet_torch.weights import encode_safetensors
from tests.helpers import downscaled_photo, synthetic_model

pytestmark = pytest.mark.usefixtures("one_thread")

CPU_FLAGS = Path("/proc/cpuinfo")


def model() -> ManTraNet:
    return synthetic_model(4)


def image() -> np.ndarray:
    """48 x 56 pixels of a real photograph, or seeded noise when the shared samples are absent."""
    return downscaled_photo()[10:58, 20:76].copy()


def settings() -> dict[str, object]:
    """Every float32 setting PyTorch has, read through its own API (new and legacy)."""
    out: dict[str, object] = {}
    for path in FLOAT32_FLAGS:
        backend, op = path.split(".")
        out[path] = getattr(getattr(torch.backends, backend), op).fp32_precision
    out["cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
    out["cuda.matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    out["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return out


@pytest.fixture
def user_settings() -> Iterator[dict[str, object]]:
    """A process that chose lower precision itself (TF32 matmuls, bf16 oneDNN matmuls); put back afterwards."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = True
    yield settings()
    torch.backends.cudnn.allow_tf32 = cudnn
    torch.set_float32_matmul_precision(matmul)


def seen_during(precision: str, tile: int | None = None) -> tuple[np.ndarray, list[dict[str, object]]]:
    """The map, and the settings the first and the last layer saw while predict ran."""
    m, seen = model(), []
    hooks = [
        layer.register_forward_pre_hook(lambda *_: seen.append(settings()))
        for layer in (m.featex.b1c1, m.detector.pred)
    ]
    try:
        heat = m.predict(image(), tile=tile, precision=precision)
    finally:
        for hook in hooks:
            hook.remove()
    return heat, seen


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("tile", [None, 32])
def test_each_precision_sets_its_float32_settings_for_the_call_and_restores_the_processs(
    precision: str, tile: int | None, user_settings: dict[str, object]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPrecisionWarning)
        _, seen = seen_during(precision, tile)
    tf32 = precision == "tf32"
    # What cuDNN and cuBLAS read on a GPU, set here on CPU (the settings are the same objects on every build):
    # fp32 and bf16's float32 part are IEEE float32; only tf32 lets convolutions and matmuls round to TF32.
    expected = {
        "cudnn.conv": "tf32" if tf32 else "ieee",
        "cudnn.rnn": "tf32" if tf32 else "ieee",
        "cuda.matmul": "tf32" if tf32 else "ieee",
        "mkldnn.conv": "ieee",  # oneDNN's implicit bf16/tf32 for float32 convolutions stays off
        "mkldnn.matmul": "tf32" if tf32 else "ieee",
        "cudnn.allow_tf32": tf32,
        "cuda.matmul.allow_tf32": tf32,
        "float32_matmul_precision": "high" if tf32 else "highest",
    }
    assert len(seen) >= 2 and all(s == expected for s in seen)
    assert user_settings["float32_matmul_precision"] == "medium" and user_settings["mkldnn.matmul"] == "bf16"
    assert settings() == user_settings


def test_the_default_settings_are_restored_too() -> None:
    before = settings()
    seen_during("fp32")
    assert settings() == before


def test_tf32_computes_the_fp32_map_on_a_cpu() -> None:
    # TF32 exists on NVIDIA GPUs only; oneDNN's float32 convolutions stay IEEE under tf32, so the maps are equal
    fp32, _ = seen_during("fp32")
    tf32, _ = seen_during("tf32")
    np.testing.assert_array_equal(tf32, fp32)


def cpuinfo_says_native() -> bool:
    """The kernel's own list of CPU flags: an independent reading of CPUID from torch's cpuinfo."""
    flags = set()
    for line in CPU_FLAGS.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.skipif(not CPU_FLAGS.exists() or platform.machine() != "x86_64", reason="needs Linux on x86-64")
def test_the_cpu_probe_agrees_with_the_kernels_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    native = cpuinfo_says_native()
    support = bf16_support("cpu")
    assert support.native == native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    # capping oneDNN below its bf16 ISA makes bf16 emulated on any CPU
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert not bf16_support("cpu").native and "ONEDNN_MAX_CPU_ISA" in bf16_support("cpu").reason


def cpu_with(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Make the CPU capability probe report (or not) AVX-512 BF16, with every other bf16 feature absent."""
    capabilities = {"architecture": "x86_64", "avx512_bf16": native, "amx_bf16": False, "amx_tile": False}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


def test_auto_is_the_fp32_map_without_native_bf16_and_the_bf16_map_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fp32 = model().predict(image(), precision="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowPrecisionWarning)
        bf16 = model().predict(image(), precision="bf16")
    cpu_with(monkeypatch, native=False)
    assert resolve_precision("auto", "cpu") == "fp32"
    np.testing.assert_array_equal(model().predict(image(), precision="auto"), fp32)
    monkeypatch.undo()  # this CPU as it is, with oneDNN capped below bf16: no mock of the probe
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    np.testing.assert_array_equal(model().predict(image(), precision="auto"), fp32)
    cpu_with(monkeypatch, native=True)
    assert resolve_precision("auto", "cpu") == "bf16"
    auto = model().predict(image(), precision="auto")
    np.testing.assert_array_equal(auto, bf16)
    assert np.abs(auto - fp32).max() > 1e-4  # bfloat16's 8-bit mantissa shows: auto did not run fp32


def test_bf16_warns_once_per_call_only_without_native_support(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_with(monkeypatch, native=False)
    with pytest.warns(SlowPrecisionWarning) as said:
        model().predict(image(), precision="bf16")
    assert len(said) == 1
    message = str(said[0].message)
    assert "slower than fp32" in message and "no bfloat16 instructions" in message and "\n" not in message
    cpu_with(monkeypatch, native=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPrecisionWarning)
        model().predict(image(), precision="bf16")
        model().predict(image(), precision="auto")


def test_the_cuda_probe_reads_the_compute_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    for capability, native in [((7, 5), False), ((8, 0), True), ((9, 0), True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        support = bf16_support("cuda:0")
        assert support.native == native and f"{capability[0]}.{capability[1]}" in support.reason
        assert resolve_precision("auto", "cuda") == ("bf16" if native else "fp32")
    assert not bf16_support("meta").native


def test_precision_names_are_checked() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")
    assert set(FLOAT32_SETTINGS) == {"fp32", "bf16", "tf32"}  # what auto resolves to, and tf32


def detect(*args: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["detect", *args])
    return code, stdout.getvalue(), stderr.getvalue()


def test_detect_warns_once_on_one_line_and_auto_writes_the_fp32_map(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cpu_with(monkeypatch, native=False)
    weights = tmp_path / "w.safetensors"
    config = RELEASES[4]
    weights.write_bytes(encode_safetensors(model().state_dict(), config, {"source": "synthetic"}))
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(image()).save(images / "a.png")
    Image.fromarray(image()[::-1].copy()).save(images / "b.png")
    common = (str(images), "-w", str(weights), "--save-npy")

    show = warnings.showwarning
    code, _, stderr = detect(*common, "-o", str(tmp_path / "bf16"), "--precision", "bf16")
    warned = [line for line in stderr.splitlines() if "warning" in line]
    assert code == 0 and len(warned) == 1 and warnings.showwarning is show
    assert warned[0].startswith("mantranet detect: warning: precision bf16 will be slower than fp32")

    code, stdout, stderr = detect(*common, "-o", str(tmp_path / "auto"), "--precision", "auto")
    assert code == 0 and "warning" not in stderr and "precision auto: fp32, as this CPU has no bfloat16" in stdout
    code, _, _ = detect(*common, "-o", str(tmp_path / "fp32"))
    for name in ("a", "b"):
        np.testing.assert_array_equal(
            np.load(tmp_path / "auto" / f"{name}.npy"), np.load(tmp_path / "fp32" / f"{name}.npy")
        )
