"""Any PyTorch implementation of ManTraNet as the compared side: a user's port, loaded by their own factory, its
modules lined up with the Keras layers by a layer map.

``--candidate FILE.py:FACTORY``: FACTORY returns an ``nn.Module`` with its weights loaded; it is called with the
official ``.h5`` path when it takes an argument. ``--layer-map FILE.json`` says, per Keras layer name, which
module computes it and how its output is laid out::

    {
      "input": {"layout": "NCHW", "range": "-1..1"},
      "layers": {
        "b1c1": "features.conv1",
        "glbStd": {"module": "detector.std", "layout": "NC"},
        "nestedAvgFeatex": {"module": "detector.windows", "layout": "NTCHW"},
        "cLSTM": {"module": "detector.lstm", "output": 0},
        "L2": {"module": "features", "local": false}
      }
    }

``input``: how the candidate's ``forward`` takes the image (``layout`` NCHW or NHWC; ``range`` -1..1, the
official scaling, 0..1 or 0..255). Per layer: ``module``, the dotted path of the submodule (as
``named_modules`` names it); ``layout``, the letters of its output's axes, N, C, H, W and, for the two 5-D layers
(nestedAvgFeatex, divStd), T where the time axis is (default NCHW / NTCHW; a missing H, W or T is a size-1 axis, so
glbStd may be "NC"); ``output``, which output to take when the module returns a tuple, list or dict (an index, a
key, or a list of them for nested ones); ``input_layout``, the layout of its input in local mode (default: that of
the layer feeding it; for b1c1, the image's layout, its values in [-1, 1] whatever ``range`` the model's own
``forward`` takes); ``local``: false for a module that cannot be fed the layer's input alone (a composite one).

Cumulative mode runs the candidate's own ``forward`` on the image with forward hooks on the mapped modules (the
last call of each). Local mode calls each mapped module on the reference's input to that layer, converted to the
module's layout. A Keras layer absent from the map is reported as unmapped, never failed.

``suggest_layer_map`` proposes a map: it runs the candidate with hooks on every module, and for each Keras layer in
network order takes, among the modules executed after the ones chosen for its inputs, one whose output has the layer's
shape in some layout, the closest to the reference's output where several do.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mantranet_torch import LAYERS

from .errors import ParityInputError
from .runner import INPUT, LAYER_INPUTS

KERAS_4D, KERAS_5D = "NHWC", "NTHWC"
FIVE_D = ("nestedAvgFeatex", "divStd")
RANGES = {"-1..1": (1.0, 0.0), "0..1": (0.5, 0.5), "0..255": (127.5, 127.5)}  # candidate = official * a + b
Selector = int | str | list


def keras_layout(layer: str) -> str:
    return KERAS_5D if layer in FIVE_D else KERAS_4D


def default_layout(layer: str) -> str:
    return "NTCHW" if layer in FIVE_D else "NCHW"


def _check_layout(text: str, layer: str, where: str) -> str:
    letters = set(KERAS_5D if layer in FIVE_D else KERAS_4D)
    if (
        not isinstance(text, str)
        or len(set(text)) != len(text)
        or not set(text) <= letters
        or not {"N", "C"} <= set(text)
    ):
        raise ParityInputError(
            f"{where}: layout {text!r} for {layer}: expected the letters of its axes, N and C and any of "
            f"{''.join(sorted(letters - {'N', 'C'}))}, each once (e.g. {default_layout(layer)!r})"
        )
    return text


def to_keras(value: np.ndarray, layout: str, layer: str) -> np.ndarray:
    """An output laid out as ``layout`` in the Keras layout of ``layer`` (missing axes become size 1)."""
    if value.ndim != len(layout):
        raise ValueError(f"{layer}: a {value.ndim}-D output ({tuple(value.shape)}) for layout {layout!r}")
    target = keras_layout(layer)
    present = [letter for letter in target if letter in layout]
    value = value.transpose([layout.index(letter) for letter in present])
    shape = [value.shape[present.index(letter)] if letter in layout else 1 for letter in target]
    return value.reshape(shape)


def from_keras(value: np.ndarray, layout: str, layer: str) -> np.ndarray:
    """The inverse of ``to_keras``: a Keras-layout array of ``layer`` in ``layout`` (size-1 axes dropped)."""
    target = keras_layout(layer)
    dropped = tuple(i for i, letter in enumerate(target) if letter not in layout)
    value = value.reshape([s for i, s in enumerate(value.shape) if i not in dropped])
    kept = [letter for letter in target if letter in layout]
    return np.ascontiguousarray(value.transpose([kept.index(letter) for letter in layout]))


@dataclass(frozen=True)
class LayerEntry:
    module: str
    layout: str
    output: Selector | None = None
    input_layout: str | None = None
    local: bool = True

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"module": self.module, "layout": self.layout}
        if self.output is not None:
            entry["output"] = self.output
        if self.input_layout is not None:
            entry["input_layout"] = self.input_layout
        if not self.local:
            entry["local"] = False
        return entry


@dataclass(frozen=True)
class LayerMap:
    """Keras layer name to the candidate's module, with layouts; and how the candidate takes the image."""

    layers: Mapping[str, LayerEntry]
    input_layout: str = "NCHW"
    input_range: str = "-1..1"
    source: str = "layer map"

    @classmethod
    def parse(cls, data: Any, source: str = "layer map") -> LayerMap:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise ParityInputError(f'{source}: expected a JSON object with a "layers" object (Keras name: module)')
        unknown = [name for name in data["layers"] if name not in LAYERS]
        if unknown:
            raise ParityInputError(f"{source}: unknown Keras layers {unknown}; the layers are {', '.join(LAYERS)}")
        layers = {}
        for name in LAYERS:
            if name not in data["layers"]:
                continue
            raw = data["layers"][name]
            raw = {"module": raw} if isinstance(raw, str) else raw
            if not isinstance(raw, dict) or not isinstance(raw.get("module"), str):
                raise ParityInputError(f'{source}: {name}: expected a module path or an object with "module"')
            extra = set(raw) - {"module", "layout", "output", "input_layout", "local"}
            if extra:
                raise ParityInputError(f"{source}: {name}: unknown keys {sorted(extra)}")
            layout = _check_layout(raw.get("layout", default_layout(name)), name, source)
            input_layout = raw.get("input_layout")
            if input_layout is not None and not isinstance(input_layout, str):
                raise ParityInputError(f"{source}: {name}: input_layout must be a string such as 'NCHW'")
            layers[name] = LayerEntry(
                raw["module"], layout, raw.get("output"), input_layout, bool(raw.get("local", True))
            )
        image = data.get("input", {})
        layout, value_range = image.get("layout", "NCHW"), image.get("range", "-1..1")
        if layout not in ("NCHW", "NHWC"):
            raise ParityInputError(f"{source}: input layout {layout!r}: expected 'NCHW' or 'NHWC'")
        if value_range not in RANGES:
            raise ParityInputError(f"{source}: input range {value_range!r}: expected one of {', '.join(RANGES)}")
        return cls(layers, layout, value_range, source)

    @classmethod
    def read(cls, path: str | Path) -> LayerMap:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise ParityInputError(f"{path}: cannot read it ({e.strerror or e})") from None
        except ValueError as e:
            raise ParityInputError(f"{path}: not JSON ({e})") from None
        return cls.parse(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": {"layout": self.input_layout, "range": self.input_range},
            "layers": {name: entry.to_dict() for name, entry in self.layers.items()},
        }


# --- loading a candidate ----------------------------------------------------------------------------------------


def load_candidate(spec: str, weights: str | Path) -> tuple[nn.Module, str]:
    """``FILE.py:FACTORY`` imported and called (with ``weights`` when FACTORY takes an argument): the module in
    eval mode, and its description."""
    file, sep, factory_name = spec.rpartition(":")
    if not sep or not file or not factory_name:
        raise ParityInputError(f"--candidate {spec}: expected FILE.py:FACTORY")
    path = Path(file)
    if not path.is_file():
        raise ParityInputError(f"--candidate {spec}: {path}: no such file")
    module_name = f"mantranet_candidate_{abs(hash(path.resolve()))}"
    sys.path.insert(0, str(path.resolve().parent))  # the candidate's own imports of its sibling files
    try:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
        factory = getattr(module, factory_name, None)
        if not callable(factory):
            raise ParityInputError(f"--candidate {spec}: {path} defines no function {factory_name}")
        takes_path = any(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            for p in inspect.signature(factory).parameters.values()
        )
        model = factory(str(weights)) if takes_path else factory()
    except ParityInputError:
        raise
    except Exception as e:  # the user's code: its failure reported with where it came from
        raise ParityInputError(f"--candidate {spec}: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.resolve().parent))
    if not isinstance(model, nn.Module):
        raise ParityInputError(f"--candidate {spec}: {factory_name} returned {type(model).__name__}, not an nn.Module")
    return model.eval(), f"{spec} ({type(model).__name__})"


def _select(output: Any, selector: Selector | None, where: str) -> torch.Tensor:
    path = [] if selector is None else selector if isinstance(selector, list) else [selector]
    value = output
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{where}: output has no item {key!r} (output selector {selector!r})") from None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f'{where}: output is a {type(value).__name__}; say which item with "output"')
    return value


class CandidateSide:
    """A user's ``nn.Module`` as a ``runner.Side``, through a ``LayerMap``."""

    def __init__(self, model: nn.Module, layer_map: LayerMap, description: str = "candidate") -> None:
        self.model, self.map, self.description = model, layer_map, description
        modules = dict(model.named_modules())
        missing = [f"{name} -> {e.module!r}" for name, e in layer_map.layers.items() if e.module not in modules]
        if missing:
            raise ParityInputError(
                f"{layer_map.source}: no such module in the candidate: {', '.join(missing)} "
                "(module paths as model.named_modules() names them)"
            )
        self.modules = {name: modules[e.module] for name, e in layer_map.layers.items()}
        self.notes: list[str] = []
        unmapped = [name for name in LAYERS if name not in layer_map.layers]
        if unmapped:
            self.notes.append(f"unmapped (not compared): {', '.join(unmapped)}")
        parameter = next(model.parameters(), None)
        self.dtype = parameter.dtype if parameter is not None else torch.float32
        self.device = parameter.device if parameter is not None else torch.device("cpu")

    def _tensor(self, value: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(value)).to(self.device, self.dtype)

    def image(self, x: np.ndarray) -> torch.Tensor:
        """The official input (N x H x W x 3 in [-1, 1]) as the candidate takes it."""
        scale, offset = RANGES[self.map.input_range]
        x = x.astype(np.float64) * scale + offset
        return self._tensor(from_keras(x, self.map.input_layout, "b1c1").astype(np.float32))

    def _output(self, name: str, output: Any) -> np.ndarray:
        entry = self.map.layers[name]
        tensor = _select(output, entry.output, f"{name} ({entry.module})")
        return to_keras(tensor.detach().float().cpu().numpy(), entry.layout, name)

    def stages(self, x: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        captured: dict[str, Any] = {}

        def hook(name: str):
            def capture(module: nn.Module, args: Any, output: Any) -> None:
                captured[name] = output  # the last call counts

            return capture

        handles = [module.register_forward_hook(hook(name)) for name, module in self.modules.items()]
        try:
            with torch.inference_mode():
                self.model(self.image(x))
        finally:
            for handle in handles:
                handle.remove()
        for name in LAYERS:
            if name in self.map.layers:
                if name not in captured:
                    raise ParityInputError(
                        f"{self.map.source}: {name}: module {self.map.layers[name].module!r} "
                        "never ran in the candidate's forward"
                    )
                yield name, self._output(name, captured[name])

    def _input_layout(self, name: str, source: str) -> str:
        entry = self.map.layers[name]
        if entry.input_layout is not None and len(LAYER_INPUTS[name]) == 1:
            return _check_layout(entry.input_layout, source, self.map.source)
        producer = self.map.layers.get(source)
        return producer.layout if producer is not None else default_layout(source)

    def layer(self, name: str, *inputs: np.ndarray) -> np.ndarray | None:
        entry = self.map.layers.get(name)
        if entry is None or not entry.local:
            return None
        args = []
        for source, value in zip(LAYER_INPUTS[name], inputs, strict=True):
            if source == INPUT:  # the image as the first module receives it: in [-1, 1], in its input layout
                layout = _check_layout(entry.input_layout or self.map.input_layout, name, self.map.source)
                args.append(self._tensor(from_keras(value, layout, name)))
            else:
                args.append(self._tensor(from_keras(value, self._input_layout(name, source), source)))
        try:
            with torch.inference_mode():
                return self._output(name, self.modules[name](*args))
        except Exception as e:  # a module that cannot take the layer's input alone: local mode is not run for it
            note = f"local mode not run for {name}: {entry.module} on the reference's input failed ({e})"
            if note not in self.notes:
                self.notes.append(note)
            return None


# --- suggesting a map -------------------------------------------------------------------------------------------


def _tensors(output: Any, path: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    """Every tensor in a module's output, with its selector path."""
    if isinstance(output, torch.Tensor):
        yield path, output
    elif isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            yield from _tensors(item, (*path, i))
    elif isinstance(output, dict):
        for key, item in output.items():
            yield from _tensors(item, (*path, key))


def _layouts(layer: str, ndim: int) -> list[str]:
    """Every layout a ``ndim``-D output of ``layer`` may have, the PyTorch convention first."""
    letters = keras_layout(layer)
    found = ["".join(p) for p in itertools.permutations(letters, ndim) if {"N", "C"} <= set(p)]
    return sorted(found, key=lambda f: (f != default_layout(layer), f))


LOCAL_SLACK = 100.0  # a module's own output may be this much further off when fed the reference's input ...
LOCAL_FLOOR = 1e-3  # ... or this far, relative to the layer's scale: beyond, it is not the layer alone


def _computes_alone(
    model: nn.Module,
    entries: dict[str, LayerEntry],
    name: str,
    x: np.ndarray,
    reference: Mapping[str, np.ndarray],
    hooked_error: float,
    input_layout: str,
) -> bool:
    """Whether the module of ``entries[name]``, fed the reference's input to the layer, gives about what it gave
    in the candidate's own forward: false for an activation module after a convolution done in ``forward``, or a
    composite module."""
    side = CandidateSide(model, LayerMap(entries, input_layout), "suggestion")
    inputs = [x if source == INPUT else reference[source] for source in LAYER_INPUTS[name]]
    out = side.layer(name, *inputs)
    expected = np.asarray(reference[name], dtype=np.float64)
    if out is None or out.shape != expected.shape:
        return False
    error = float(np.abs(out - expected).max()) / max(float(np.abs(expected).max()), 1e-12)
    return error <= max(LOCAL_SLACK * hooked_error, LOCAL_FLOOR)


@dataclass
class Suggestion:
    layer: str
    entry: LayerEntry | None
    relative_error: float | None = None
    alternatives: int = 0
    why: list[str] = field(default_factory=list)


def suggest_layer_map(
    model: nn.Module,
    x: np.ndarray,
    reference: Mapping[str, np.ndarray],
    input_layout: str = "NCHW",
    input_range: str = "-1..1",
) -> tuple[LayerMap, list[Suggestion]]:
    """A proposed map (and, per layer, how well its choice matched): modules in execution order, matched to the
    Keras layers in network order by output shape (each after the modules matched to its inputs), the closest to
    ``reference`` (the reference's trace of ``x``) where several modules fit."""
    calls: list[tuple[str, Any]] = []
    handles = []
    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_hook(lambda m, a, out, path=path: calls.append((path, out))))
    base = LayerMap({}, input_layout, input_range)
    side = CandidateSide.__new__(CandidateSide)
    side.map, side.dtype = base, next(model.parameters()).dtype
    side.device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            model(side.image(x))
    finally:
        for handle in handles:
            handle.remove()
    entries: dict[str, LayerEntry] = {}
    suggestions = []
    positions = {INPUT: -1}  # where each matched layer ran, in execution order
    for name in LAYERS:
        # After what it computes from (the detector's branches may run in either order), when that is matched.
        start = max(positions.get(source, -1) for source in LAYER_INPUTS[name]) + 1
        expected = np.asarray(reference[name], dtype=np.float64)
        scale = max(float(np.abs(expected).max()), 1e-12)
        matches = []
        for position in range(start, len(calls)):
            path, output = calls[position]
            for selector, tensor in _tensors(output):
                value = tensor.detach().float().cpu().numpy()
                for layout in _layouts(name, value.ndim):
                    converted = to_keras(value, layout, name)
                    if converted.shape == expected.shape:
                        error = float(np.abs(converted - expected).max()) / scale
                        matches.append((error, position, path, layout, selector))
        if not matches:
            suggestions.append(Suggestion(name, None, why=["no module output of this shape after its inputs'"]))
            continue
        matches.sort(key=lambda m: m[0])
        chosen, why = None, []
        for error, position, path, layout, selector in matches:
            if error > 2 * matches[0][0] + 1e-9:
                break  # only near-ties compete on local mode
            output = None if not selector else selector[0] if len(selector) == 1 else list(selector)
            entry = LayerEntry(path, layout, output)
            if _computes_alone(model, {**entries, name: entry}, name, x, reference, error, input_layout):
                chosen = (error, position, entry)
                break
        if chosen is None:
            error, position, path, layout, selector = matches[0]
            output = None if not selector else selector[0] if len(selector) == 1 else list(selector)
            chosen = (error, position, LayerEntry(path, layout, output, local=False))
            why.append("local mode off: the module does not compute this layer from the layer's input alone")
        error, positions[name], entries[name] = chosen
        suggestions.append(Suggestion(name, entries[name], error, len(matches), why))
    return LayerMap(entries, input_layout, input_range, "suggested"), suggestions
