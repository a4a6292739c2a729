"""Numeric precision of inference: the names, where bfloat16 is native, and true float32 around a call.

- ``fp32`` (the default): float32 throughout, and truly float32: TF32 (NVIDIA Ampere and newer) and oneDNN's
  implicit lower-precision modes are switched off for the call, whatever the process had set.
- ``tf32``: float32 tensors, but cuDNN convolutions and CUDA matmuls may round their inputs to TF32 (10-bit
  mantissa) on NVIDIA GPUs of compute capability 8.0 and newer; elsewhere it computes what ``fp32`` computes.
- ``bf16``: the feature extractor under bfloat16 autocast, the detector in float32. Fast only where the
  hardware computes bfloat16 natively (see ``bf16_support``); elsewhere it is emulated, slower than fp32.
- ``auto``: ``bf16`` where it is native, ``fp32`` elsewhere.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16", "tf32", "auto")

# Where bfloat16 arithmetic is native on CPUs, as torch.cpu.get_capabilities() names it (CPUID, via cpuinfo):
# AMX (Sapphire Rapids and newer), AVX-512 BF16 (Cooper Lake, Zen 4 and newer), Arm's BF16 extension (BFMMLA).
# Without them oneDNN converts bfloat16 to float32 element by element, and a bf16 network runs slower than fp32.
CPU_BF16_FEATURES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX-512 BF16", "bf16": "Arm BF16"}
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below its first ISA with bfloat16 instructions: under them it emulates.
ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
CUDA_BF16_CAPABILITY = (8, 0)  # Ampere: bfloat16 tensor cores

# The fp32_precision settings of torch.backends each precision runs under ("ieee": true float32).
FLOAT32_FLAGS = ("cudnn.conv", "cudnn.rnn", "cuda.matmul", "mkldnn.conv", "mkldnn.matmul")
_TRUE_FP32 = dict.fromkeys(FLOAT32_FLAGS, "ieee")
FLOAT32_SETTINGS = {
    "fp32": _TRUE_FP32,
    "bf16": _TRUE_FP32,  # what autocast leaves in float32 (the detector) stays true float32
    "tf32": {**_TRUE_FP32, "cudnn.conv": "tf32", "cudnn.rnn": "tf32", "cuda.matmul": "tf32", "mkldnn.matmul": "tf32"},
}


class _LegacySwitch:
    """One of PyTorch's older TF32 switches, which keep a value of their own beside the fp32_precision
    settings and refuse to be read when the two disagree; set alongside them so that both read the same."""

    def __init__(self, flag: str, get: Callable[[], object], set_: Callable[[object], None], values: dict) -> None:
        self.flag, self.get, self.set, self.values = flag, get, set_, values

    def read(self) -> object | None:
        try:
            return self.get()
        except RuntimeError:  # the process mixed the two kinds of setting: nothing to restore
            return None


LEGACY_SWITCHES = (
    _LegacySwitch(
        "cudnn.conv",
        lambda: torch.backends.cudnn.allow_tf32,
        lambda value: setattr(torch.backends.cudnn, "allow_tf32", value),
        {"ieee": False, "tf32": True},
    ),
    _LegacySwitch(
        "cuda.matmul",
        torch.get_float32_matmul_precision,
        torch.set_float32_matmul_precision,
        {"ieee": "highest", "tf32": "high"},
    ),
)


class SlowPrecisionWarning(UserWarning):
    """bf16 asked of hardware that only emulates bfloat16: slower than fp32, and less exact."""


@dataclass(frozen=True)
class Bf16Support:
    """Whether ``device`` computes bfloat16 natively, and why (one phrase, for messages)."""

    device: str
    native: bool
    reason: str


def bf16_support(device: torch.device | str = "cpu") -> Bf16Support:
    """Whether bfloat16 is native on ``device``: on CPUs, AMX-BF16, AVX-512 BF16 or Arm BF16 usable by oneDNN;
    on CUDA, compute capability 8.0 or newer. Other device types are not probed (reported not native)."""
    device = torch.device(device)
    if device.type == "cuda":
        capability = tuple(torch.cuda.get_device_capability(device))
        have = f"compute capability {capability[0]}.{capability[1]}"
        if capability >= CUDA_BF16_CAPABILITY:
            return Bf16Support("cuda", True, f"this GPU has bfloat16 tensor cores ({have})")
        return Bf16Support("cuda", False, f"this GPU has no bfloat16 tensor cores ({have}, below 8.0)")
    if device.type == "cpu":
        return _cpu_bf16_support()
    return Bf16Support(device.type, False, f"bfloat16 support is not probed on {device.type} devices")


def _cpu_bf16_support() -> Bf16Support:
    capability = torch.backends.cpu.get_cpu_capability()
    features = torch.cpu.get_capabilities()
    found = [name for key, name in CPU_BF16_FEATURES.items() if features.get(key)]
    if not found:
        return Bf16Support(
            "cpu",
            False,
            f"this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX on x86, BF16 on Arm; PyTorch CPU "
            f"capability {capability}), so oneDNN emulates bfloat16 arithmetic through float32",
        )
    have = ", ".join(found)
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return Bf16Support("cpu", False, f"this CPU has {have}, but oneDNN is off, and PyTorch's own kernels emulate")
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if cap and cap.upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return Bf16Support("cpu", False, f"this CPU has {have}, but ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from it")
    return Bf16Support("cpu", True, f"this CPU has {have} (PyTorch CPU capability {capability})")


def resolve_precision(precision: str, device: torch.device | str, warn: bool = True) -> str:
    """The precision a call on ``device`` runs in: ``auto`` becomes ``bf16`` or ``fp32``.

    Warns (``SlowPrecisionWarning``, one line) when ``bf16`` is asked of a device without native bfloat16,
    unless ``warn`` is false.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision not in ("auto", "bf16"):
        return precision
    support = bf16_support(device)
    if precision == "auto":
        return "bf16" if support.native else "fp32"
    if warn and not support.native:
        warnings.warn(
            f"precision bf16 will be slower than fp32 here, not faster: {support.reason}; use fp32 (or auto)",
            SlowPrecisionWarning,
            stacklevel=2,
        )
    return precision


def _flag(path: str) -> tuple[object, str]:
    """The torch.backends object and attribute that hold one fp32_precision setting, e.g. ``cudnn.conv``."""
    backend, op = path.split(".")
    return functools.reduce(getattr, (backend, op), torch.backends), "fp32_precision"


def float32_settings() -> dict[str, str]:
    """The process's current fp32_precision setting of each of ``FLOAT32_FLAGS``."""
    return {path: getattr(*_flag(path)) for path in FLOAT32_FLAGS}


@contextmanager
def float32_precision(precision: str) -> Iterator[None]:
    """Run the block under ``precision``'s float32 settings, then restore the process's own exactly.

    The settings are process-wide: calls running at once in threads of one process share them.
    """
    if precision not in FLOAT32_SETTINGS:
        raise ValueError(f"precision must be one of {tuple(FLOAT32_SETTINGS)}, got {precision!r}")
    settings = FLOAT32_SETTINGS[precision]
    before = float32_settings()
    legacy_before = [(switch, switch.read()) for switch in LEGACY_SWITCHES]
    try:
        for switch, value in legacy_before:
            if value is not None:
                switch.set(switch.values[settings[switch.flag]])
        for path, value in settings.items():
            setattr(*_flag(path), value)
        yield
    finally:
        for switch, value in legacy_before:
            if value is not None:
                switch.set(value)
        for path, value in before.items():
            setattr(*_flag(path), value)
