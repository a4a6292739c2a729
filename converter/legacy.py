"""Checkpoints of the earlier PyTorch port (``MantraNetv4.pt``, ``IMTFEv4.pt``, ``AnomalyDetectorv4.pt``).

That port hard-codes the architecture of the official Ptrain4 (16 first-block filters, a linear
``transform``, windows 7, 15, 31), so its checkpoints import with Ptrain4's config unless the caller
chooses another. Files are read with ``torch.load(weights_only=True)`` only.

It keeps no BatchNorm statistics: it normalises each image by its own mean and variance (eps 1e-3).
The import sets ``bnorm`` to moving_mean 0 and moving_variance 0, so bnorm scales by 1/sqrt(1e-3).
Why: the detector's output depends on bnorm only through |(window mean - x) / max(std, t)|, with
t = 1e-6 + min_std. Any per-channel affine bnorm cancels there while the clamp is inactive. The
port's own statistics scale its std to sqrt(v / (v + 1e-3)), for the per-image variance v; a
variance of 0 scales it to sqrt(v / 1e-3), which crosses the clamp t at a variance only a factor
(1 - t^2) apart, and gives the same ratio to within a relative t^2 / 2 where it is clamped. So the
import reproduces the port on every pixel to within t^2 / 2 (6.6e-5 for AnomalyDetectorv4's largest
min_std), and the official release wherever the official clamp (whose moving statistics are lost)
is inactive.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mantranet_torch import RELEASES, ManTraNet, ManTraNetConfig
from mantranet_torch.files import file_problem, listing
from mantranet_torch.layers import STD_FLOOR, bayar_constraint, l2_normalize_tf, srm_kernels
from mantranet_torch.model import DETECTOR_CHANNELS, FEATURE_CHANNELS, LSTM_HIDDEN
from mantranet_torch.weights import WeightFileError, check_pt_size, check_weight_values, torch_load_reason

from .convert import TOOL_NAME, probe_image, tool_version
from .errors import ConversionError
from .mapping import torch_shapes
from .releases import Digests, PortCheckpoint, file_digests, port_checkpoints

PORT_RELEASE = 4  # the official release whose architecture the earlier port hard-codes
FEATEX, DETECTOR = "featex", "detector"
PART_PREFIXES = {FEATEX: "IMTFE.", DETECTOR: "AnomalyDetector."}  # in MantraNetv4.pt, which holds both
PART_NAMES = {FEATEX: "feature extractor", DETECTOR: "anomaly detector"}
BNORM_MEAN, BNORM_VARIANCE = 0.0, 0.0  # see the module docstring
SRM_KEY = "SRMConv2D.weight"  # the port stores the SRM constants; they are checked, never imported
SRM_TOLERANCE = 1e-7  # a few float32 ulps of the largest tap (0.5): the same constants, however computed
BAYAR_TOLERANCE = 1e-4  # off-centre taps of a constrained kernel sum to 1 up to float32 rounding


@dataclass(frozen=True)
class PortTransform:
    """How one of our tensors is taken from the port's, and the port's shape given ours."""

    name: str
    take: Callable[[Tensor], Tensor]
    port_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


AS_IS = PortTransform("as is", lambda t: t, lambda s: s)
MIN_STD = PortTransform("(1, C, 1, 1) -> (C,)", lambda t: t.reshape(-1), lambda s: (1, s[0], 1, 1))
# The port's ConvLSTM runs ONE convolution over concat(x_t, h): input channels 0..63 are x_t, 64..71 h.
LSTM_INPUT = PortTransform(
    "in-channels 0-63 of concat(x, h)",
    lambda t: t[:, :DETECTOR_CHANNELS],
    lambda s: (s[0], s[1] + LSTM_HIDDEN, *s[2:]),
)
LSTM_RECURRENT = PortTransform(
    "in-channels 64-71 of concat(x, h)",
    lambda t: t[:, DETECTOR_CHANNELS:],
    lambda s: (s[0], DETECTOR_CHANNELS + s[1], *s[2:]),
)

# fmt: off
PORT_MAPPING: tuple[tuple[str, str, PortTransform], ...] = (
    # earlier-port key (no part prefix)       our state-dict key                   layout change
    ("init_conv.weight",                      "featex.b1c1.regular_kernel",        AS_IS),
    ("BayarConv2D.weight",                    "featex.b1c1.bayar_kernel",          AS_IS),
    ("middle_and_last_block.0.weight",        "featex.b1c2.weight",                AS_IS),
    ("middle_and_last_block.0.bias",          "featex.b1c2.bias",                  AS_IS),
    ("middle_and_last_block.2.weight",        "featex.b2c1.weight",                AS_IS),
    ("middle_and_last_block.2.bias",          "featex.b2c1.bias",                  AS_IS),
    ("middle_and_last_block.4.weight",        "featex.b2c2.weight",                AS_IS),
    ("middle_and_last_block.4.bias",          "featex.b2c2.bias",                  AS_IS),
    ("middle_and_last_block.6.weight",        "featex.b3c1.weight",                AS_IS),
    ("middle_and_last_block.6.bias",          "featex.b3c1.bias",                  AS_IS),
    ("middle_and_last_block.8.weight",        "featex.b3c2.weight",                AS_IS),
    ("middle_and_last_block.8.bias",          "featex.b3c2.bias",                  AS_IS),
    ("middle_and_last_block.10.weight",       "featex.b3c3.weight",                AS_IS),
    ("middle_and_last_block.10.bias",         "featex.b3c3.bias",                  AS_IS),
    ("middle_and_last_block.12.weight",       "featex.b4c1.weight",                AS_IS),
    ("middle_and_last_block.12.bias",         "featex.b4c1.bias",                  AS_IS),
    ("middle_and_last_block.14.weight",       "featex.b4c2.weight",                AS_IS),
    ("middle_and_last_block.14.bias",         "featex.b4c2.bias",                  AS_IS),
    ("middle_and_last_block.16.weight",       "featex.b4c3.weight",                AS_IS),
    ("middle_and_last_block.16.bias",         "featex.b4c3.bias",                  AS_IS),
    ("middle_and_last_block.18.weight",       "featex.b5c1.weight",                AS_IS),
    ("middle_and_last_block.18.bias",         "featex.b5c1.bias",                  AS_IS),
    ("middle_and_last_block.20.weight",       "featex.b5c2.weight",                AS_IS),
    ("middle_and_last_block.20.bias",         "featex.b5c2.bias",                  AS_IS),
    ("middle_and_last_block.22.weight",       "featex.transform.weight",           AS_IS),
    ("middle_and_last_block.22.bias",         "featex.transform.bias",             AS_IS),
    ("adaptation.weight",                     "detector.outlier_trans.weight",     AS_IS),
    ("sigma_F",                               "detector.glb_std.min_std",          MIN_STD),
    ("conv_lstm.cell_list.0.conv.weight",     "detector.clstm.kernel",             LSTM_INPUT),
    ("conv_lstm.cell_list.0.conv.weight",     "detector.clstm.recurrent_kernel",   LSTM_RECURRENT),
    ("conv_lstm.cell_list.0.conv.bias",       "detector.clstm.bias",               AS_IS),
    ("end.0.weight",                          "detector.pred.weight",              AS_IS),
    ("end.0.bias",                            "detector.pred.bias",                AS_IS),
)
# Ours, not in the port: set at import (see the module docstring).
SET_AT_IMPORT: tuple[tuple[str, float], ...] = (
    ("detector.bnorm.moving_mean",            BNORM_MEAN),
    ("detector.bnorm.moving_variance",        BNORM_VARIANCE),
)
# fmt: on


class EarlierPortWarning(UserWarning):
    """What an import from the earlier port cannot carry over, or had to change."""


@dataclass
class PortSource:
    path: Path
    digests: Digests
    checkpoint: PortCheckpoint | None  # set when the content is a known checkpoint of the port
    parts: tuple[str, ...]


@dataclass
class PortImport:
    """An imported checkpoint: our state dict, its config, and where it came from (saved as the manifest)."""

    sources: list[PortSource]
    config: ManTraNetConfig
    variant: int | None
    identified_by: str
    state_dict: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in (FEATEX, DETECTOR) if any(p in s.parts for s in self.sources))

    @property
    def partial(self) -> bool:
        return len(self.parts) < 2

    @property
    def output_stem(self) -> str:
        """The default output name: the file's stem, or both stems joined for a two-file import."""
        return "+".join(s.path.stem for s in self.sources)

    def provenance(self) -> dict:
        return {
            "sources": [
                {
                    "name": s.path.name,
                    "size": s.digests.size,
                    "sha256": s.digests.sha256,
                    "git_blob_sha1": s.digests.git_blob_sha1,
                    "format": "earlier PyTorch port checkpoint",
                    "known_checkpoint": None if s.checkpoint is None else s.checkpoint.file,
                    "parts": [PART_NAMES[p] for p in s.parts],
                }
                for s in self.sources
            ],
            "release": None,
            "variant": self.variant,
            "identified_by": self.identified_by,
            "part": "full model" if not self.partial else f"{PART_NAMES[self.parts[0]]} only",
            "config": self.config.to_dict(),
            "notes": self.notes,
            "tool": {"name": TOOL_NAME, "version": tool_version()},
        }


def port_checkpoint_by_hash(git_blob_sha1: str) -> PortCheckpoint | None:
    return next((c for c in port_checkpoints() if c.git_blob_sha1 == git_blob_sha1), None)


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """A state dict of tensors, read with ``torch.load(weights_only=True)``; anything else is refused."""
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise ConversionError(f"{path}: {problem}")
    try:
        check_pt_size(path)
    except WeightFileError as e:
        raise ConversionError(str(e)) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for files that are not checkpoints at all
        raise ConversionError(f"{path}: {torch_load_reason(e, path)}") from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    key = next((k for k in obj if not isinstance(k, str)), None)
    if key is not None:
        raise ConversionError(f"{path}: expected a state dict of tensors, but it has a key {key!r} that is not a str")
    other = next((k for k, v in obj.items() if not isinstance(v, Tensor)), None)
    if other is not None:
        raise ConversionError(
            f"{path}: expected a state dict of tensors, but key {other!r} holds {type(obj[other]).__name__}"
        )
    return dict(obj)


def port_keys(part: str) -> list[str]:
    keys = list(dict.fromkeys(port for port, ours, _ in PORT_MAPPING if ours.startswith(part + ".")))
    return [*keys, SRM_KEY] if part == FEATEX else keys


def split_parts(path: Path, checkpoint: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """The parts a checkpoint holds, prefixes removed: both (prefixed, as in MantraNetv4.pt) or one."""
    prefixed = [k for k in checkpoint if k.startswith(tuple(PART_PREFIXES.values()))]
    if prefixed:
        parts: dict[str, dict[str, Tensor]] = {}
        for key, value in checkpoint.items():
            part = next((p for p, prefix in PART_PREFIXES.items() if key.startswith(prefix)), None)
            if part is None:
                raise ConversionError(
                    f"{path}: unexpected key {key} with shape {tuple(value.shape)}: every key of a two-part "
                    f"checkpoint starts with {' or '.join(PART_PREFIXES.values())}"
                )
            parts.setdefault(part, {})[key.removeprefix(PART_PREFIXES[part])] = value
        return parts
    found = [p for p in (FEATEX, DETECTOR) if set(port_keys(p)) & set(checkpoint)]
    if len(found) == 1:
        return {found[0]: checkpoint}
    sample = ", ".join(list(checkpoint)[:4]) or "none"
    if not found and any(k.startswith((FEATEX + ".", DETECTOR + ".")) for k in checkpoint):
        raise ConversionError(f"{path}: already a mantranet-torch weight file (keys {sample}, ...); load it directly")
    if not found:
        raise ConversionError(
            f"{path}: not a checkpoint of the earlier PyTorch port: none of its keys ({sample}) is one of the "
            f"port's (init_conv.weight, adaptation.weight, ...)"
        )
    raise ConversionError(
        f"{path}: holds keys of both the feature extractor and the anomaly detector without the "
        f"{' / '.join(PART_PREFIXES.values())} prefixes of a two-part checkpoint"
    )


def check_part(path: Path, part: str, tensors: dict[str, Tensor], config: ManTraNetConfig) -> None:
    """Every key present with its shape, none left over, every value finite; errors name key and shapes."""
    try:  # first: a nested or sparse tensor has no shape to compare
        check_weight_values(tensors, str(path), {k: f"key {k}" for k in tensors})
    except WeightFileError as e:
        raise ConversionError(str(e)) from None
    ours = torch_shapes(config)
    expected: dict[str, tuple[int, ...]] = {}
    for port, key, transform in PORT_MAPPING:
        if key.startswith(part + "."):
            expected[port] = transform.port_shape(ours[key])
    if part == FEATEX:
        expected[SRM_KEY] = tuple(srm_kernels().shape)
    problems = [f"missing key {k} (expected shape {s})" for k, s in expected.items() if k not in tensors]
    problems += [f"unexpected key {k} with shape {tuple(v.shape)}" for k, v in tensors.items() if k not in expected]
    problems += [
        f"key {k}: expected shape {s}, found {tuple(tensors[k].shape)}"
        for k, s in expected.items()
        if k in tensors and tuple(tensors[k].shape) != s
    ]
    if problems:
        raise ConversionError(
            f"{path}: does not match the earlier port's {PART_NAMES[part]} for {config.describe()}: "
            + listing(problems)
        )


def check_srm(path: Path, kernel: Tensor) -> None:
    """The port's stored SRM filters must be ours, channel for channel (output 3*i + c: filter i on colour c)."""
    expected = srm_kernels()
    diff = (kernel.float() - expected).abs().amax(dim=(1, 2, 3))
    bad = (diff > SRM_TOLERANCE).nonzero()
    if len(bad):
        channel = int(bad[0])
        raise ConversionError(
            f"{path}: {SRM_KEY} output channel {channel} differs from the SRM constant expected there "
            f"(srm{channel // 3 + 1} on {'RGB'[channel % 3]}) by up to {float(diff[channel]):.3g}; the expected order "
            "is srm1 on R, G, B, then srm2, then srm3"
        )


def bayar_satisfied(kernel: Tensor) -> bool:
    """Centre -1 and the other taps summing to 1, for every (output, input) pair of an OIHW kernel."""
    kh, kw = kernel.shape[-2:]
    centre = kernel[..., kh // 2, kw // 2]
    off_centre = kernel.sum(dim=(2, 3)) - centre
    return bool((centre == -1).all() and ((off_centre - 1).abs() <= BAYAR_TOLERANCE).all())


def resolve_config(config: ManTraNetConfig | int | None) -> tuple[ManTraNetConfig, int | None, str]:
    if config is None:
        return RELEASES[PORT_RELEASE], PORT_RELEASE, f"the earlier port's fixed architecture, Ptrain{PORT_RELEASE}'s"
    if isinstance(config, int):
        if config not in RELEASES:
            raise ConversionError(f"--variant {config}: no such release; releases are {sorted(RELEASES)}")
        return RELEASES[config], config, "--variant"
    return config, None, "the caller's config"


def load_earlier_port(
    paths: str | Path | Sequence[str | Path], config: ManTraNetConfig | int | None = None
) -> tuple[dict[str, Tensor], PortImport]:
    """Our state dict from the earlier port's checkpoint(s), and what was imported.

    ``paths``: ``MantraNetv4.pt``; ``IMTFEv4.pt`` and ``AnomalyDetectorv4.pt``; or one part alone (a
    partial import whose keys load into ``ManTraNet(config).featex`` or ``.detector`` after removing
    the part prefix). ``config``: a config, a release index, or None for Ptrain4's. Emits an
    ``EarlierPortWarning`` for every approximation made.
    """
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not 1 <= len(paths) <= 2:
        raise ConversionError(f"expected one or two checkpoints of the earlier port, got {len(paths)}")
    config, variant, by = resolve_config(config)
    sources, found = [], {}
    for path in paths:
        parts = split_parts(path, read_checkpoint(path))
        for part, tensors in parts.items():
            if part in found:
                raise ConversionError(
                    f"{path}: holds the {PART_NAMES[part]} again (already read from {found[part][0]})"
                )
            check_part(path, part, tensors, config)
            found[part] = (path, tensors)
        digests = file_digests(path)
        sources.append(PortSource(path, digests, port_checkpoint_by_hash(digests.git_blob_sha1), tuple(parts)))

    state, notes = {}, []
    for port, key, transform in PORT_MAPPING:
        part = key.split(".", 1)[0]
        if part in found:
            state[key] = transform.take(found[part][1][port]).to(torch.float32).contiguous().clone()
    if FEATEX in found:
        path, tensors = found[FEATEX]
        check_srm(path, tensors[SRM_KEY])
        if not bayar_satisfied(state["featex.b1c1.bayar_kernel"]):
            state["featex.b1c1.bayar_kernel"] = bayar_constraint(state["featex.b1c1.bayar_kernel"])
            notes.append(
                f"{path.name}: BayarConv2D.weight does not satisfy the Bayar constraint; imported constrained, as "
                "the earlier port uses it (it re-applies the constraint in every forward call)"
            )
    if DETECTOR in found:
        for key, value in SET_AT_IMPORT:
            state[key] = torch.full((DETECTOR_CHANNELS,), value, dtype=torch.float32)
        notes.append(bnorm_note(state["detector.glb_std.min_std"]))
    result = PortImport(sources, config, variant, by, state, notes)
    if result.partial:
        have = result.parts[0]
        notes.append(
            f"partial import: {PART_NAMES[have]} only, not a full model; its {have}.* tensors load into "
            f"ManTraNet(config).{have} (without the '{have}.' prefix); a full model needs both parts"
        )
    verify_import(result)
    for note in notes:
        warnings.warn(note, EarlierPortWarning, stacklevel=2)
    return state, result


def bnorm_note(min_std: Tensor) -> str:
    t = float(min_std.max()) + STD_FLOOR
    return (
        "the earlier port keeps no BatchNorm statistics (it normalises each image by its own); bnorm is set to "
        f"moving_mean {BNORM_MEAN:g}, moving_variance {BNORM_VARIANCE:g}, so the ConvLSTM input equals the earlier "
        f"port's to within a relative {t * t / 2:.1e} on every pixel (largest min_std {t:.3g}), and the official "
        "release's wherever its glbStd clamp is inactive; where that clamp is active (a channel whose per-image std "
        "falls below min_std) outputs can differ from the official ones"
    )


def verify_import(result: PortImport) -> None:
    """Every part loads strictly into our model and the result runs finite on a probe."""
    model = ManTraNet(result.config).eval()
    for part in result.parts:
        module = getattr(model, part)
        prefix = part + "."
        module.load_state_dict(
            {k.removeprefix(prefix): v for k, v in result.state_dict.items() if k.startswith(prefix)}
        )
    probe = probe_image()
    with torch.inference_mode():
        if not result.partial:
            out = model(probe)
        elif result.parts == (FEATEX,):
            out = model.featex(probe)
        else:
            height, width = probe.shape[-2:]
            features = torch.linspace(-3.0, 3.0, FEATURE_CHANNELS * height * width).reshape(1, -1, height, width)
            out = model.detector(l2_normalize_tf(features.sin()))
    if not torch.isfinite(out).all():
        names = ", ".join(s.path.name for s in result.sources)
        raise ConversionError(f"{names}: the imported weights give non-finite outputs on a probe input")
