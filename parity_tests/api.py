"""``run_parity``: the whole parity run of ``mantranet parity`` as one Python call.

    from parity_tests import run_parity
    run = run_parity("ManTraNet_Ptrain4.h5", ["photo.jpg"], crop="96x96")
    run.passed, run.first_divergent_layer     # the verdict
    run.to_json()                             # the JSON report, as ``mantranet parity --json`` writes it

It reads and checks every input first (weights, images, crop, memory), builds the reference and the PyTorch side,
then compares every named layer image by image (``runner.compare_layers``) with the float64 attribution policy
below, and returns a ``report.ParityRun``. Bad input raises ``ParityInputError`` (the command exits 2 on it); a
run that finds layers over tolerance returns normally with ``passed`` False.

TensorFlow is imported by ``run_parity`` only, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from converter import ConversionError, convert_h5
from converter.atomic import write_bytes_atomic
from converter.convert import tool_version
from mantranet_torch import LAYERS, WeightFileError, scale_pixels
from mantranet_torch.model import DETECTOR_LAYERS

from .candidate import RANGES, CandidateSide, LayerMap, Suggestion, load_candidate, suggest_layer_map
from .errors import ParityInputError
from .inputs import Crop, ImageInput, InputImage, check_memory, host_memory, read_inputs
from .report import Attributed, ImageParity, ParityRun
from .runner import Reference, Side, compare_layers
from .shrink import shrink as shrink_image
from .sides import TorchSide, torch_side
from .tolerances import DEFAULT_ATOL, DEFAULT_RTOL, LOCAL, MODES, POLICY, TolerancePolicy

# Beyond this many pixels only the detector is evaluated in float64, from the reference's features: the float64
# feature extractor is the slow part of attribution (timings: README, "parity"), and the drift worth arbitrating on
# large images is the detector's (the official float32 window means', which grows with the image).
FULL_ATTRIBUTION_PIXELS = 96 * 96

# Progress events, in order: START (once, the run's description filled in), then per image IMAGE, TRACED (the
# reference's trace is done), LAYER for each layer of each mode, DONE.
START, IMAGE, TRACED, LAYER, DONE = "start", "image", "traced", "layer", "done"


@dataclass
class ParityEvent:
    """What a ``progress`` callback receives. ``index`` counts images from 1 to ``count``."""

    kind: str
    run: ParityRun
    count: int
    index: int = 0
    image: InputImage | None = None
    mode: str | None = None
    layer: str | None = None


ProgressCallback = Callable[[ParityEvent], None]


def tolerance_policy(atol: float | None = None, rtol: float | None = None) -> tuple[TolerancePolicy, dict[str, Any]]:
    """The project's per-layer policy, or one tolerance for every layer when ``atol`` or ``rtol`` is given; with
    its description for the report."""
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ParityInputError(f"{flag} {value}: must be a finite number >= 0")
    if atol is None and rtol is None:
        return POLICY, {"policy": "project", "table": POLICY.to_dict()}
    atol = DEFAULT_ATOL if atol is None else atol
    rtol = DEFAULT_RTOL if rtol is None else rtol
    policy = TolerancePolicy.uniform(atol, rtol)
    return policy, {"policy": "uniform", "atol": atol, "rtol": rtol, "table": policy.to_dict()}


def attribution_for(pixels: int, modes: Sequence[str]) -> tuple[list[str] | None, Attributed]:
    """``oracle_layers`` for ``compare_layers`` and what it covers: every layer on small images, else the
    detector's, in both modes from the reference's features (``cumulative_from_reference``)."""
    if pixels <= FULL_ATTRIBUTION_PIXELS:
        return None, Attributed(list(LAYERS), list(modes), f"{pixels} pixels: the whole network in float64")
    reason = (
        f"{pixels} pixels > {FULL_ATTRIBUTION_PIXELS}: the float64 feature extractor is slow at this size, so the "
        "float64 detector starts from the reference's features"
    )
    return list(DETECTOR_LAYERS), Attributed(list(DETECTOR_LAYERS), list(modes), reason)


def torch_threads() -> int:
    """PyTorch's threads while TensorFlow shares the machine: half the cores (the two alternate layer by layer and
    TensorFlow's pool keeps spinning between its ops; measured in the README)."""
    return max(1, (os.cpu_count() or 2) // 2)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null: TensorFlow's C++ start-up notices bypass Python and its log level."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (an embedding host): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_reference() -> Any:
    """The ``reference`` package (TensorFlow), or a one-line install hint. TensorFlow's C++ warnings (float64
    graphs it does not optimise, for one) are off unless the user set ``TF_CPP_MIN_LOG_LEVEL``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with native_stderr_silenced():
            import reference
    except ImportError as e:
        raise ParityInputError(
            f"the TensorFlow reference needs TensorFlow ({e}); "
            "install it with: pip install 'mantranet-torch[reference]'"
        ) from None
    return reference


def versions() -> dict[str, str]:
    """The versions that computed a report (TensorFlow's and Keras' once they are imported)."""
    found = {"mantranet-torch": tool_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("tensorflow", "keras", "tf_keras"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "unknown")
    return found


class _TracingReference:
    """The reference as ``compare_layers`` sees it, reporting when its trace is done."""

    def __init__(self, reference: Reference, done: Callable[[], None]) -> None:
        self.reference, self.done = reference, done
        self.arrays = reference.arrays

    def trace(self, x: np.ndarray) -> dict[str, np.ndarray]:
        out = self.reference.trace(x)
        self.done()
        return out


OURS, OFFICIAL = "ours", "official"


@dataclass(frozen=True)
class ReferenceChoice:
    """``--reference``: ``ours`` (the project's TensorFlow re-implementation), ``official`` (the official
    ``modelCore.py`` that ``mantranet weights fetch --code`` downloaded) or ``official:DIR`` (the user's copy)."""

    kind: str
    code: Path | None = None

    @classmethod
    def parse(cls, text: str) -> ReferenceChoice:
        if text == OURS:
            return cls(OURS)
        if text == OFFICIAL:
            return cls(OFFICIAL)
        if text.startswith(OFFICIAL + ":") and len(text) > len(OFFICIAL) + 1:
            return cls(OFFICIAL, Path(text[len(OFFICIAL) + 1 :]))
        raise ParityInputError(f"--reference {text}: expected 'ours', 'official' or 'official:DIR'")


def build_reference(choice: ReferenceChoice, weights: Path, variant: int | None) -> tuple[Reference, Any, dict]:
    """The reference, the exact (float64) answer the attribution measures both sides against, and their
    description for the report. Ours: the TensorFlow re-implementation and the float64 NumPy ``Oracle``. Official:
    the official code under tf_keras, in float32 and in float64."""
    from .oracle import Oracle

    package = import_reference()
    if choice.kind == OURS:
        ref = package.load(weights, variant)
        return ref, Oracle(ref.arrays, ref.config), {"kind": OURS, "exact": "float64 NumPy evaluation (oracle.py)"}
    with native_stderr_silenced():
        from reference import official
    try:
        code = official.find_official_code(choice.code)
        ref = official.OfficialModel(code, weights, variant)
        exact = official.OfficialModel(code, weights, variant, dtype="float64")
    except official.OfficialCodeError as e:
        raise ParityInputError(str(e)) from None
    info = {
        "kind": OFFICIAL,
        "code": str(code.path),
        "code_git_blob_sha1": code.git_blob_sha1,
        "code_verified": code.verified,
        "exact": "the official code in float64 (K.set_floatx('float64'))",
    }
    return ref, exact, info


def read_layer_map(layer_map: str | Path | dict | LayerMap | None) -> LayerMap:
    if layer_map is None:
        raise ParityInputError(
            "--candidate needs --layer-map FILE.json (Keras layer name to module path); "
            "propose one with --suggest-map FILE.json"
        )
    if isinstance(layer_map, LayerMap):
        return layer_map
    if isinstance(layer_map, dict):
        return LayerMap.parse(layer_map)
    return LayerMap.read(layer_map)


def _candidate_module(candidate: str | nn.Module, weights: Path) -> tuple[nn.Module, str, list[str]]:
    if isinstance(candidate, nn.Module):
        return candidate.eval(), f"{type(candidate).__name__} (a module given in Python)", []
    model, description = load_candidate(candidate, weights)
    return model, description, [candidate.rpartition(":")[0]]


def candidate_side(candidate: str | nn.Module | Side, layer_map: str | Path | dict | LayerMap | None, weights: Path):
    """The compared side for another implementation: a ``runner.Side`` as it is (its own layer naming, e.g. an
    exported graph's session), or a user's PyTorch module, loaded and checked against its layer map."""
    if not isinstance(candidate, (str, nn.Module)):
        if not (callable(getattr(candidate, "stages", None)) and callable(getattr(candidate, "layer", None))):
            raise ParityInputError(
                f"candidate: a {type(candidate).__name__} is neither FILE.py:FACTORY, an nn.Module nor a Side"
            )
        description = getattr(candidate, "description", type(candidate).__name__)
        return TorchSide(candidate, description, [], getattr(candidate, "notes", []))
    mapping = read_layer_map(layer_map)
    model, description, paths = _candidate_module(candidate, weights)
    side = CandidateSide(model, mapping, description)
    return TorchSide(side, f"candidate {description}, layer map {mapping.source}", paths, side.notes)


def suggest_map(
    weights: str | Path,
    candidate: str | nn.Module,
    images: Sequence[ImageInput] = (),
    *,
    input_layout: str = "NCHW",
    input_range: str = "-1..1",
    variant: int | None = None,
    crop: str | Crop | None = None,
) -> tuple[LayerMap, list[Suggestion]]:
    """A layer map proposed for ``candidate`` from the first image (default: the built-in noise image), for the
    user to check and edit: its modules in execution order matched to the Keras layers by output shape, the
    closest to our reference's output where several fit (``candidate.suggest_layer_map``)."""
    if input_layout not in ("NCHW", "NHWC") or input_range not in RANGES:
        raise ParityInputError(f"input layout {input_layout!r} / range {input_range!r}: see candidate.LayerMap")
    if isinstance(crop, str):
        crop = Crop.parse(crop)
    image = read_inputs(list(images)[:1], crop)[0]
    try:
        ref = import_reference().load(weights, variant)
    except (ConversionError, WeightFileError) as e:
        raise ParityInputError(str(e)) from None
    model, _, _ = _candidate_module(candidate, Path(weights))
    x = scale_pixels(torch.from_numpy(image.pixels)).numpy()[None]
    return suggest_layer_map(model, x, ref.trace(x), input_layout, input_range)


def run_parity(
    weights: str | Path,
    images: Sequence[ImageInput] = (),
    *,
    reference: str | ReferenceChoice = OURS,
    torch_weights: Sequence[str | Path] | None = None,
    candidate: str | nn.Module | Side | None = None,
    layer_map: str | Path | dict | LayerMap | None = None,
    variant: int | None = None,
    modes: Sequence[str] = MODES,
    atol: float | None = None,
    rtol: float | None = None,
    crop: str | Crop | None = None,
    check_available_memory: bool = True,
    progress: ProgressCallback | None = None,
    shrink: str | Path | None = None,
    shrink_budget: float = 60.0,
) -> ParityRun:
    """Compare the PyTorch model with the TensorFlow reference layer by layer on ``images``.

    ``weights``: an official-layout ManTraNet ``.h5`` file; the reference runs it (``reference``: ``"ours"``, the
    project's TensorFlow re-implementation with a float64 NumPy evaluation as the exact answer; ``"official"`` or
    ``"official:DIR"``, the official ``modelCore.py`` run under tf_keras, in float64 for the exact answer: see
    ``ReferenceChoice``), and the PyTorch side is the
    same file converted in memory unless ``torch_weights`` names our ``.safetensors``/``.pt`` or the earlier
    port's checkpoints (one or two files; a checkpoint of one part is completed from ``weights``). ``variant``:
    the release 0-4 when neither the file's hash nor its name tells. ``images``: file paths, H x W x 3 uint8 RGB
    arrays, or none for the built-in set. ``modes``: cumulative and/or local. ``atol``/``rtol``: one tolerance for
    every layer instead of the project's per-layer policy. ``crop``: ``"WxH[+X+Y]"`` or a ``Crop``, applied to
    every image. ``progress``: called with a ``ParityEvent`` as the run goes.

    ``candidate``: compare another PyTorch implementation instead of ours: ``"FILE.py:FACTORY"`` (FACTORY returns
    the ``nn.Module`` with its weights loaded; it gets ``weights`` when it takes an argument) or the module itself,
    lined up with the Keras layers by ``layer_map`` (a JSON file, its dict, or a ``candidate.LayerMap``; see
    ``candidate.py``, and ``suggest_map`` to propose one). Layers it does not map are reported as unmapped. Any
    ``runner.Side`` may be given as well (``stages`` and ``layer`` in Keras names and layouts: our TensorFlow
    reference as ``sides.ReferenceSide``, an exported graph's runtime), without a layer map.

    ``shrink``: a folder; for each failing image (while ``shrink_budget`` seconds last, in all) the smallest crop,
    then the simplest pixel content, that still fails with the same first divergent layer is saved there as PNG,
    with the command line that reproduces it (``shrink.py``; listed in ``ParityRun.shrunk``).

    Returns the ``ParityRun`` (``passed``, ``first_divergent_layer``, per-image reports, ``to_json()``).
    Raises ``ParityInputError`` for anything it cannot compare, before any comparison starts.
    """
    modes = [m for m in MODES if m in modes]
    if not modes:
        raise ParityInputError(f"modes: expected some of {', '.join(MODES)}")
    policy, tolerance = tolerance_policy(atol, rtol)
    choice = reference if isinstance(reference, ReferenceChoice) else ReferenceChoice.parse(reference)
    if isinstance(crop, str):
        crop = Crop.parse(crop)
    if shrink is not None and (Path(shrink).exists() and not Path(shrink).is_dir()):
        raise ParityInputError(f"--shrink {shrink}: exists and is not a folder")
    if not (math.isfinite(shrink_budget) and shrink_budget > 0):
        raise ParityInputError(f"--shrink-budget {shrink_budget}: must be a number of seconds > 0")
    inputs = read_inputs(list(images), crop)
    if check_available_memory:
        check_memory(inputs, host_memory())
    try:
        conversion = convert_h5(Path(weights), variant)
        if candidate is not None:
            if torch_weights:
                raise ParityInputError("--candidate and --torch-weights: give one of them")
            side = candidate_side(candidate, layer_map, Path(weights))
        else:
            side = torch_side([Path(p) for p in torch_weights] if torch_weights else None, conversion)
        ref, oracle, about = build_reference(choice, Path(weights), variant)
    except (ConversionError, WeightFileError) as e:
        raise ParityInputError(str(e)) from None

    ident = conversion.identification
    release = ident.release.file if ident.release else f"release {ident.index}"
    if choice.kind == OURS:
        what = "the project's TensorFlow reference"
    else:
        code = "" if about["code_verified"] else " (NOT the official file: its git blob SHA-1 differs)"
        what = f"the official code {about['code']}{code}, under tf_keras"
    run = ParityRun(
        reference={
            **about,
            "description": f"{weights}: {release} (identified by {ident.by}), {what}",
            "path": str(weights),
            "release": release,
            "variant": ident.index,
            "identified_by": ident.by,
            "config": conversion.config.to_dict(),
        },
        torch={"description": side.description, "paths": side.paths, "notes": side.notes},
        tolerance=tolerance,
        modes=list(modes),
        versions=versions(),
    )
    notify = progress or (lambda event: None)
    notify(ParityEvent(START, run, len(inputs)))

    def compare(image: InputImage, index: int = 0, events: bool = False) -> ImageParity:
        def event(kind: str, mode: str | None = None, layer: str | None = None) -> None:
            if events:
                notify(ParityEvent(kind, run, len(inputs), index, image, mode, layer))

        height, width = image.pixels.shape[:2]
        oracle_layers, attributed = attribution_for(height * width, modes)
        x = scale_pixels(torch.from_numpy(image.pixels)).numpy()[None]
        event(IMAGE)
        started = time.perf_counter()
        report = compare_layers(
            _TracingReference(ref, lambda: event(TRACED)),
            side.model,
            x,
            oracle=oracle,
            oracle_layers=oracle_layers,
            modes=modes,
            policy=policy,
            progress=lambda mode, name: event(LAYER, mode, name),
            cumulative_from_reference=True,
        )
        seconds = time.perf_counter() - started
        result = ImageParity(image.name, image.source, height, width, image.notes, attributed, report, seconds)
        event(DONE)
        return result

    with _torch_threads(torch_threads()):
        for index, image in enumerate(inputs, start=1):
            run.images.append(compare(image, index, events=True))
        if shrink is not None and not run.passed:
            command = _command_line(weights, choice, torch_weights, candidate, layer_map, variant, modes, atol, rtol)
            deadline = time.monotonic() + shrink_budget
            for image, result in zip(inputs, run.images, strict=True):
                if not result.passed and time.monotonic() < deadline:
                    found = _shrink_one(image, result, compare, Path(shrink), command, deadline - time.monotonic())
                    run.shrunk.append(found)
    return run


def _command_line(
    weights: str | Path,
    choice: ReferenceChoice,
    torch_weights: Sequence[str | Path] | None,
    candidate: str | nn.Module | Side | None,
    layer_map: Any,
    variant: int | None,
    modes: Sequence[str],
    atol: float | None,
    rtol: float | None,
) -> list[str] | None:
    """The ``mantranet parity`` arguments that repeat this run on another image (None: not expressible, e.g. a
    candidate given as a module object)."""
    argv = ["mantranet", "parity", str(weights), "{image}"]
    if choice.kind != OURS:
        argv += ["--reference", OFFICIAL if choice.code is None else f"{OFFICIAL}:{choice.code}"]
    for path in torch_weights or ():
        argv += ["--torch-weights", str(path)]
    if candidate is not None:
        if not isinstance(candidate, str) or not isinstance(layer_map, (str, Path)):
            return None
        argv += ["--candidate", candidate, "--layer-map", str(layer_map)]
    if variant is not None:
        argv += ["--variant", str(variant)]
    if list(modes) == [LOCAL]:
        argv.append("--local")
    argv += [
        *(["--atol", repr(atol)] if atol is not None else []),
        *(["--rtol", repr(rtol)] if rtol is not None else []),
    ]
    return argv


def _shrink_one(
    image: InputImage,
    result: ImageParity,
    compare: Callable[[InputImage], ImageParity],
    folder: Path,
    command: list[str] | None,
    budget_s: float,
) -> dict[str, Any]:
    """``image``'s smallest, simplest variant failing at the same first divergent layer, saved as PNG in ``folder``
    with the command line that reproduces it."""
    layer = result.report.first_divergent_layer

    def fails(pixels: np.ndarray) -> bool:
        candidate = InputImage(image.name, image.source, pixels, [])
        try:
            return compare(candidate).report.first_divergent_layer == layer
        except Exception:  # an input the reference or candidate cannot take (too small for it): not this failure
            return False

    found = shrink_image(image.pixels, fails, budget_s)
    stem = Path(image.name).stem.replace(" ", "_") or "image"
    png = folder / f"{stem}-{found.box.width}x{found.box.height}.png"
    buffer = io.BytesIO()
    Image.fromarray(found.pixels).save(buffer, format="PNG")
    line = None if command is None else shlex.join([str(png) if a == "{image}" else a for a in command])
    note = line or "(not expressible as a command line: the candidate was given as a Python object)"
    text = (
        f"# {image.source}: first divergent layer {layer} at {result.width} x {result.height}; this "
        f"{found.box.width} x {found.box.height} crop (left {found.box.left}, top {found.box.top})"
        f"{', ' + ', '.join(found.simplified) if found.simplified else ''} fails there too.\n{note}\n"
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(png, buffer.getvalue(), force=True)
        write_bytes_atomic(png.with_suffix(".txt"), text.encode(), force=True)
    except (OSError, ConversionError) as e:
        raise ParityInputError(f"--shrink {folder}: cannot write the minimal image ({e})") from None
    return {
        "image": image.name,
        "layer": layer,
        "original": {"width": result.width, "height": result.height},
        **found.to_dict(),
        "path": str(png),
        "command": line,
    }


__all__ = ["LOCAL", "MODES", "ParityEvent", "ParityInputError", "ParityRun", "run_parity"]
