"""ManTraNet as an ONNX file for any image size, checked in ONNX Runtime against the PyTorch model at export time.

The graph has one input, ``image`` (float32 N x 3 x H x W scaled to [-1, 1], as ``model(x)`` takes), and one output,
``likelihood`` (float32 N x 1 x H x W); batch, height and width are dynamic from 1 up. With ``layers=True`` it also
outputs the other 20 named layers (``layer.b1c1`` .. ``layer.cLSTM``, in PyTorch layouts) for layer-by-layer parity.

Precision per op, as the PyTorch model computes it: convolutions, activations, the LSTM and divStd in float32; the
per-image mean and std (glbStd, the global step of nestedAvgFeatex) and the window means (a zero-padded integral
image: CumSum, Slice, Sub, Add, Div by in-image counts) in float64, cast to float32 once per output. ONNX Runtime's
CPU provider implements every one of those ops for double. The counts and H x W are computed in int64 and cast
explicitly, so no Div mixes float32 and float64 operands.

onnx, onnxscript (the exporter's) and onnxruntime are the optional extra ``onnx``: imported when used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mantranet_torch import LAYERS, ManTraNet, ManTraNetConfig
from mantranet_torch.files import refuse_existing, write_bytes_atomic
from mantranet_torch.model import layer_names
from mantranet_torch.weights import CONFIG_KEY, PROVENANCE_KEY

from .convert import TOOL_NAME, tool_version
from .errors import ConversionError
from .file_record import identify
from .load import load_weights

INPUT_NAME = "image"
OUTPUT_NAME = "likelihood"
LAYER_PREFIX = "layer."
LAYERS_KEY = "mantranet.layer_outputs"
DEFAULT_OPSET = 18  # the dynamo exporter's own opset: other opsets go through ONNX's version converter
MIN_OPSET = 18
ORT_TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"
INSTALL_HINT = "pip install 'mantranet-torch[onnx]' (onnx, onnxscript and onnxruntime)"
# Probe sizes (batch, height, width): 1 x 1 (every padding wider than the image), odd and thin sizes, a batch.
PROBE_SIZES: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 5, 7), (2, 33, 97), (1, 64, 48))
# ONNX Runtime and PyTorch each compute the map in float32 within 3.3e-6 of float64 (tests/test_model.py); their
# convolutions sum in different orders, so they may differ by about twice that. 2e-5 leaves 3x headroom and is
# still far below what a wrong op does (a wrong padding or window moves the map by 1e-3 or more).
PROBE_ATOL = 2e-5
EXAMPLE_SHAPE = (2, 3, 24, 20)  # an example batch of 2: PyTorch specialises a dimension whose example size is 1


def _require(module: str):
    # ONNX Runtime (1.2x and later) keeps a telemetry device id and database under ~/.cache/Microsoft unless
    # this is set before it loads: an export is no occasion to write into the user's home. A value the user
    # set is kept; an onnxruntime the caller imported earlier has read it already.
    os.environ.setdefault(ORT_TELEMETRY_ENV, "1")
    try:
        return __import__(module)
    except ImportError:
        raise ConversionError(f"ONNX export needs the {module} package: {INSTALL_HINT}") from None


@dataclass
class Probe:
    shape: tuple[int, ...]
    max_abs_difference: float


@dataclass
class OnnxExport:
    target: Path
    config: ManTraNetConfig
    opset: int
    outputs: list[str]
    size: int
    probes: list[Probe] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


class _Outputs(nn.Module):
    """The graph's outputs: the likelihood map, then (``layers``) every other named layer in network order."""

    def __init__(self, model: ManTraNet, layers: bool) -> None:
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        if not self.layers:
            return (self.model(image),)
        taps = dict(self.model.stages(image))
        return (taps["pred"], *(taps[name] for name in layer_names(self.model.config) if name != "pred"))


def output_names(layers: bool, config: ManTraNetConfig | None = None) -> list[str]:
    """The graph's output names; ``config`` (default the official ConvLSTM's) names its recurrent layer."""
    if not layers:
        return [OUTPUT_NAME]
    return [OUTPUT_NAME, *(LAYER_PREFIX + name for name in layer_names(config or ManTraNetConfig()) if name != "pred")]


def model_and_provenance(weights: str | Path, variant: int | None = None) -> tuple[ManTraNet, dict]:
    """The model of any weight file ``load_weights`` reads, and where it came from (hashes, what the file is)."""
    model = load_weights(weights, variant=variant, quiet=True)
    record = identify(weights)
    source = {"name": Path(weights).name, "size": record.size, "sha256": record.sha256}
    source["git_blob_sha1"] = record.git_blob_sha1
    what = {"content": record.content, "format": record.format, "release": record.release}
    if "provenance" in record.details:  # a file of ours: where it was converted from
        what["converted_from"] = record.details["provenance"]
    return model, {"source": source, **what, "config": model.config.to_dict()}


def export_onnx(
    weights: str | Path,
    target: str | Path,
    opset: int = DEFAULT_OPSET,
    layers: bool = False,
    force: bool = False,
    variant: int | None = None,
) -> OnnxExport:
    """Export ``weights`` to ``target`` as ONNX for any image size, checked, atomically.

    The check runs ONNX Runtime on the ``PROBE_SIZES`` inputs and compares the map with the PyTorch model's; over
    ``PROBE_ATOL`` nothing is written.

    Args:
        weights: any file ``converter.load_weights`` reads.
        target: the ``.onnx`` file.
        opset: the ONNX opset, at least ``MIN_OPSET``.
        layers: add the 20 other named layers as outputs (for ``mantranet parity --torch-weights``).
        force: replace an existing ``target``.
        variant: the release of an ``.h5`` file whose hash and name do not tell.

    Returns:
        An ``OnnxExport``: the path, config, opset, outputs, size and the probes of the check.

    Raises:
        ConversionError: a bad opset, an existing output, a missing ``onnx`` extra, or a failed check.
    """
    target = Path(target)
    if opset < MIN_OPSET:
        raise ConversionError(f"--opset {opset}: the exporter writes opset {MIN_OPSET} or newer")
    refuse_existing([target], force)
    onnx = _require("onnx")
    _require("onnxscript")
    _require("onnxruntime")
    model, provenance = model_and_provenance(weights, variant)
    names = output_names(layers, model.config)
    proto = export_graph(model, layers, opset)
    metadata = {
        CONFIG_KEY: json.dumps(model.config.to_dict(), sort_keys=True),
        PROVENANCE_KEY: json.dumps(
            {
                **provenance,
                "exported_by": {"name": TOOL_NAME, "version": tool_version(), "torch": torch.__version__},
                "python": platform.python_version(),
                "opset": opset,
            },
            sort_keys=True,
        ),
        LAYERS_KEY: json.dumps([n.removeprefix(LAYER_PREFIX) for n in names[1:]]),
    }
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ConversionError(f"{weights}: the exported graph is not valid ONNX ({e})") from None
    data = proto.SerializeToString()
    probes = check_against_torch(data, model)
    write_bytes_atomic(target, data, force)
    return OnnxExport(target, model.config, opset, names, len(data), probes, metadata)


def export_graph(model: ManTraNet, layers: bool = False, opset: int = DEFAULT_OPSET):
    """``model`` as an in-memory ``onnx.ModelProto`` (dynamic batch, height and width), unchecked, no metadata."""
    batch, height, width = (torch.export.Dim(n, min=1) for n in ("batch", "height", "width"))
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            _Outputs(model, layers).eval(),
            (torch.zeros(EXAMPLE_SHAPE),),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=output_names(layers, model.config),
            dynamic_shapes={INPUT_NAME: {0: batch, 2: height, 3: width}},
            external_data=False,
            verbose=False,
        )
    return program.model_proto


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's own log lines and warnings (about optional operator libraries it skips) kept from users."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def probe_input(batch: int, height: int, width: int) -> np.ndarray:
    """A fixed pseudo-random float32 input in [-1, 1] of the given shape."""
    return np.random.default_rng(height * 1000 + width).uniform(-1, 1, (batch, 3, height, width)).astype(np.float32)


def check_against_torch(onnx_model: bytes | str | Path, model: ManTraNet) -> list[Probe]:
    """The map of ONNX Runtime against ``model``'s on every probe input; over PROBE_ATOL is a ConversionError."""
    session = OnnxModel(onnx_model)
    probes = []
    for shape in PROBE_SIZES:
        x = probe_input(*shape)
        with torch.inference_mode():
            expected = model(torch.from_numpy(x)).numpy()
        got = session(x)
        diff = float(np.abs(got.astype(np.float64) - expected).max()) if got.shape == expected.shape else np.inf
        if not diff <= PROBE_ATOL:
            raise ConversionError(
                f"ONNX Runtime's map on a {'x'.join(map(str, shape))} probe differs from PyTorch's by {diff:.3g} "
                f"(shape {got.shape} vs {expected.shape}; tolerance {PROBE_ATOL:g}): the export is not faithful"
            )
        probes.append(Probe(shape, diff))
    return probes


class OnnxModel:
    """An exported file in ONNX Runtime (CPU): ``model(x)`` is the map, ``model.trace(x)`` every named layer.

    ``x``: float32 N x 3 x H x W in [-1, 1], as ``ManTraNet`` takes; outputs in ManTraNet's layouts.
    """

    def __init__(
        self, source: bytes | str | Path, threads: int | None = None, options: dict[str, object] | None = None
    ) -> None:
        """options: ``onnxruntime.SessionOptions`` attributes to set, e.g. ``{"enable_mem_pattern": False}``."""
        ort = _require("onnxruntime")
        session_options = ort.SessionOptions()
        if threads:
            session_options.intra_op_num_threads = threads
        for name, value in (options or {}).items():
            setattr(session_options, name, value)
        self.path = None if isinstance(source, bytes) else Path(source)
        where = "the exported graph" if self.path is None else str(self.path)
        if self.path is not None and not self.path.is_file():
            raise ConversionError(f"{self.path}: no such file")
        try:
            data = source if isinstance(source, bytes) else str(source)
            self.session = ort.InferenceSession(data, session_options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ONNX Runtime raises its own exception types for unreadable or invalid models
            raise ConversionError(f"{where}: ONNX Runtime cannot load it ({e})") from None
        self.where = where
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.outputs = [o.name for o in self.session.get_outputs()]
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != [INPUT_NAME] or not self.outputs or self.outputs[0] != OUTPUT_NAME:
            raise ConversionError(
                f"{where}: not a ManTraNet export (inputs {inputs}, outputs {self.outputs[:2]}...; expected input "
                f"{INPUT_NAME!r} and first output {OUTPUT_NAME!r})"
            )

    @property
    def config(self) -> ManTraNetConfig | None:
        return ManTraNetConfig.from_dict(json.loads(self.metadata[CONFIG_KEY])) if CONFIG_KEY in self.metadata else None

    @property
    def has_layers(self) -> bool:
        return len(self.outputs) == len(LAYERS)

    def _run(self, x: np.ndarray | Tensor, names: list[str]) -> list[np.ndarray]:
        x = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an N x 3 x H x W array, got shape {x.shape}")
        return self.session.run(names, {INPUT_NAME: x.astype(np.float32, copy=False)})

    def __call__(self, x: np.ndarray | Tensor) -> np.ndarray:
        return self._run(x, [OUTPUT_NAME])[0]

    def trace(self, x: np.ndarray | Tensor) -> dict[str, np.ndarray]:
        """The 21 named layers' outputs, keyed by their Keras names in network order (``layer_names(config)``:
        ``mantranet_torch.LAYERS``, or with cGRU for the ConvGRU variant).

        Needs a file exported with ``layers=True`` (``mantranet export-onnx --layers``).
        """
        if not self.has_layers:
            raise ConversionError(
                f"{self.where}: holds the map only; export it with --layers (layers=True) for its named layers"
            )
        values = dict(zip(self.outputs, self._run(x, self.outputs), strict=True))
        names = layer_names(self.config or ManTraNetConfig())
        return {name: values[OUTPUT_NAME if name == "pred" else LAYER_PREFIX + name] for name in names}
