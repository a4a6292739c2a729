"""``run_parity``: the whole parity run of ``mantranet parity`` as one Python call.

    from parity_tests import run_parity
    run = run_parity("ManTraNet_Ptrain4.h5", ["photo.jpg"], crop="96x96")
    run.passed, run.first_divergent_layer     # the verdict
    run.to_json()                             # the JSON report, as ``mantranet parity --json`` writes it

It reads and checks every input first (weights, images, crop, memory), builds both sides from one reading of the
weight file (``sides.build_sides``), then compares every named layer image by image (``ImageComparison``, over
``runner.compare_layers``) with the float64 attribution policy below, and returns a ``report.ParityRun``. Bad input
raises ``ParityInputError`` (the command exits 2 on it); a run that finds layers over tolerance returns normally
with ``passed`` False.

TensorFlow is imported by ``run_parity`` only, so importing this module costs nothing. The process-wide settings
(threads, TensorFlow's notices) are ``environment.py``'s; building the sides is ``sides.py``'s.
"""

from __future__ import annotations

import io
import math
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from converter import ConversionError
from mantranet_torch import LAYERS, WeightFileError, scale_pixels
from mantranet_torch.files import write_bytes_atomic
from mantranet_torch.model import DETECTOR_LAYERS

from .candidate import RANGES, LayerMap, Suggestion, suggest_layer_map
from .environment import (
    import_reference,
    native_stderr_silenced,  # noqa: F401  (imported from here before 0.2.0; moved)
    torch_thread_count,
    torch_threads,
    versions,
)
from .errors import ParityInputError
from .gradients import OPTIMIZERS, GradientReport, compare_gradients, gradient_sides, random_mask
from .inputs import Crop, ImageInput, InputImage, check_memory, host_memory, read_inputs
from .report import Attributed, ImageParity, ParityRun
from .runner import Reference, Side, compare_layers
from .shrink import shrink as shrink_image
from .sides import OFFICIAL, OURS, ReferenceChoice, Sides, build_sides, candidate_module
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
    """A layer map proposed for ``candidate``, for the user to check and edit: its modules in execution order
    matched to the Keras layers by output shape, the closest to our reference's output where several fit
    (``candidate.suggest_layer_map``), on the first image.

    Args:
        weights: the official-layout ``.h5`` file the reference runs.
        candidate: ``"FILE.py:FACTORY"`` or the ``nn.Module`` itself.
        images: the first is used (default: the built-in noise image).
        input_layout: the candidate's input layout, ``NCHW`` or ``NHWC``.
        input_range: its input range (``candidate.RANGES``).
        variant: the release 0-4 when the file does not tell.
        crop: ``"WxH[+X+Y]"`` or a ``Crop``.

    Returns:
        The proposed ``LayerMap`` and the ``Suggestion`` behind each entry.

    Raises:
        ParityInputError: bad weights, candidate, image or options.
    """
    if input_layout not in ("NCHW", "NHWC") or input_range not in RANGES:
        raise ParityInputError(f"input layout {input_layout!r} / range {input_range!r}: see candidate.LayerMap")
    if isinstance(crop, str):
        crop = Crop.parse(crop)
    image = read_inputs(list(images)[:1], crop)[0]
    try:
        ref = import_reference().load(weights, variant)
    except (ConversionError, WeightFileError) as e:
        raise ParityInputError(str(e)) from None
    model, _, _ = candidate_module(candidate, Path(weights))
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
    gradients: bool = False,
    train_steps: int = 0,
    optimizer: str = "adam",
    lr: float | None = None,
    train_mode: bool = False,
    mask: str | Path | np.ndarray | None = None,
    mask_seed: int = 0,
) -> ParityRun:
    """Compare the PyTorch model with the TensorFlow reference layer by layer on ``images``.

    The PyTorch side is ``weights`` converted in memory unless ``torch_weights`` or ``candidate`` says otherwise;
    the weight file is read and identified once for both sides (``sides.build_sides``).

    Args:
        weights: an official-layout ManTraNet ``.h5`` file, which the reference runs.
        images: file paths, H x W x 3 uint8 RGB arrays, or none for the built-in set.
        reference: ``"ours"`` (the project's TensorFlow re-implementation, a float64 NumPy evaluation as the
            exact answer), ``"official"`` or ``"official:DIR"`` (the official ``modelCore.py`` under tf_keras, in
            float64 for the exact answer), or a ``ReferenceChoice``.
        torch_weights: our ``.safetensors``/``.pt``, the earlier port's checkpoints (one or two files; a
            checkpoint of one part is completed from ``weights``), or an ONNX file exported with its layers.
        candidate: another PyTorch implementation instead of ours: ``"FILE.py:FACTORY"`` (FACTORY returns the
            ``nn.Module`` with its weights loaded; it gets ``weights`` when it takes an argument), the module
            itself, or any ``runner.Side`` (``stages`` and ``layer`` in Keras names and layouts), which needs no
            layer map. Layers it does not map are reported as unmapped.
        layer_map: the candidate's Keras layer name to module path: a JSON file, its dict, or a
            ``candidate.LayerMap`` (``suggest_map`` proposes one).
        variant: the release 0-4 when neither the file's hash nor its name tells.
        modes: cumulative and/or local.
        atol: one absolute tolerance for every layer instead of the project's per-layer policy.
        rtol: one relative tolerance for every layer.
        crop: ``"WxH[+X+Y]"`` or a ``Crop``, applied to every image.
        check_available_memory: refuse images whose comparison would not fit in the available memory.
        progress: called with a ``ParityEvent`` as the run goes.
        shrink: a folder; for each failing image (while ``shrink_budget`` seconds last, in all) the smallest
            crop, then the simplest pixel content, that still fails at the same first divergent layer is saved
            there as PNG with the command line that reproduces it (``shrink.py``; listed in ``ParityRun.shrunk``).
        shrink_budget: seconds for shrinking, in all.
        gradients: also compare the backward pass of Keras 2.2's binary cross-entropy against ``mask`` with the
            original code's (``reference="official"``): every weight array's gradient, the image's and each layer
            input's, from the loss back (``gradients.py``); each image's ``ImageParity.gradients`` holds it and
            ``ParityRun.first_divergent_gradient`` names the first row over tolerance.
        train_steps: K optimiser steps on both sides, the original's constraints after each, every array compared
            after each step (``ParityRun.first_divergent_step``).
        optimizer: "adam" or "sgd", as Keras 2 defines them.
        lr: the learning rate (default Keras': 1e-3 for Adam, 0.01 for SGD).
        train_mode: bnorm on the batch's statistics, as Keras' ``fit`` runs it.
        mask: the loss's target: an image file (nonzero pixels forged) or an H x W array, of the compared size.
        mask_seed: the seed of the random mask used when ``mask`` is None.

    Returns:
        The ``ParityRun`` (``passed``, ``first_divergent_layer``, per-image reports, ``to_json()``); a run that
        finds layers over tolerance returns normally with ``passed`` False.

    Raises:
        ParityInputError: anything it cannot compare, before any comparison starts (the command exits 2).
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
    training = TrainingChoice.check(gradients, train_steps, optimizer, lr, mask)
    paths = [Path(p) for p in torch_weights] if torch_weights else None
    sides = build_sides(Path(weights), choice, variant, paths, candidate, layer_map)
    backward = None if training is None else gradient_sides(sides)

    run = new_run(weights, choice, sides, tolerance, modes)
    notify = progress or (lambda event: None)
    notify(ParityEvent(START, run, len(inputs)))
    comparison = ImageComparison(sides, modes, policy, run, len(inputs), notify)
    with torch_thread_count(torch_threads()):
        for index, image in enumerate(inputs, start=1):
            run.images.append(comparison(image, index, events=True))
            if backward is not None:
                run.images[-1].gradients = training.compare(backward, image, mask, mask_seed, train_mode)
        if shrink is not None and not run.passed:
            command = _command_line(weights, choice, torch_weights, candidate, layer_map, variant, modes, atol, rtol)
            deadline = time.monotonic() + shrink_budget
            for image, result in zip(inputs, run.images, strict=True):
                if not result.passed and time.monotonic() < deadline:
                    found = _shrink_one(image, result, comparison, Path(shrink), command, deadline - time.monotonic())
                    run.shrunk.append(found)
    return run


@dataclass(frozen=True)
class TrainingChoice:
    """What ``--gradients`` / ``--train-steps`` compare, checked before any work."""

    steps: int
    optimizer: str
    lr: float | None

    @classmethod
    def check(cls, gradients: bool, steps: int, optimizer: str, lr: float | None, mask: Any) -> TrainingChoice | None:
        if not gradients and not steps:
            return None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ParityInputError(f"--train-steps {steps}: must be a whole number >= 0")
        if optimizer not in OPTIMIZERS:
            raise ParityInputError(f"--optimizer {optimizer}: expected one of {', '.join(OPTIMIZERS)}")
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ParityInputError(f"--lr {lr}: must be a finite number > 0")
        if isinstance(mask, (str, Path)) and not Path(mask).is_file():
            raise ParityInputError(f"--mask {mask}: no such file")
        return cls(steps, optimizer, lr)

    def compare(self, backward: tuple, image: InputImage, mask: Any, seed: int, train_mode: bool) -> GradientReport:
        reference, exact, compared, compared64 = backward
        x = scale_pixels(torch.from_numpy(image.pixels)).numpy()[None]
        target = read_mask(mask, image, seed)
        return compare_gradients(
            reference,
            compared,
            x,
            target,
            exact=exact,
            candidate_exact=compared64,
            training=train_mode,
            steps=self.steps,
            optimizer=self.optimizer,
            lr=self.lr,
        )


def read_mask(mask: str | Path | np.ndarray | None, image: InputImage, seed: int) -> np.ndarray:
    """The 1 x H x W x 1 float32 target for ``image``: ``mask``'s nonzero pixels (a file or an array, of the image's
    size), or a random mask seeded by ``seed``.

    Raises:
        ParityInputError: the mask cannot be read or its size is not the image's.
    """
    height, width = image.pixels.shape[:2]
    if mask is None:
        return random_mask((1, height, width, 1), seed)
    if isinstance(mask, (str, Path)):
        try:
            with Image.open(mask) as opened:
                values = np.asarray(opened.convert("L"))
        except (OSError, ValueError) as e:
            raise ParityInputError(f"--mask {mask}: cannot read it as an image ({e})") from None
    else:
        values = np.asarray(mask)
    values = values.reshape(values.shape[:2]) if values.ndim == 3 and values.shape[2] == 1 else values
    if values.shape != (height, width):
        raise ParityInputError(
            f"--mask {mask if isinstance(mask, (str, Path)) else 'array'}: {values.shape[1::-1]} pixels, but "
            f"{image.name} is compared at {width} x {height} (give the mask of the same crop)"
        )
    return (values != 0).astype(np.float32)[None, :, :, None]


def new_run(
    weights: str | Path, choice: ReferenceChoice, sides: Sides, tolerance: dict[str, Any], modes: list[str]
) -> ParityRun:
    """An empty ``ParityRun`` describing both sides, the weight file as identified, the tolerances and versions."""
    conversion, about = sides.conversion, sides.about
    ident = conversion.identification
    release = ident.release.file if ident.release else f"release {ident.index}"
    if choice.kind == OURS:
        what = "the project's TensorFlow reference"
    else:
        code = "" if about["code_verified"] else " (NOT the official file: its git blob SHA-1 differs)"
        what = f"the official code {about['code']}{code}, under tf_keras"
    compared = sides.compared
    return ParityRun(
        reference={
            **about,
            "description": f"{weights}: {release} (identified by {ident.by}), {what}",
            "path": str(weights),
            "release": release,
            "variant": ident.index,
            "identified_by": ident.by,
            "config": conversion.config.to_dict(),
        },
        torch={"description": compared.description, "paths": compared.paths, "notes": compared.notes},
        tolerance=tolerance,
        modes=list(modes),
        versions=versions(),
    )


class ImageComparison:
    """One image compared layer by layer (``runner.compare_layers``) with the float64 attribution, as a callable:
    the run calls it on each input with progress events, the shrinker on each smaller variant without."""

    def __init__(
        self,
        sides: Sides,
        modes: list[str],
        policy: TolerancePolicy,
        run: ParityRun,
        count: int,
        notify: ProgressCallback,
    ) -> None:
        self.sides, self.modes, self.policy = sides, modes, policy
        self.run, self.count, self.notify = run, count, notify

    def __call__(self, image: InputImage, index: int = 0, events: bool = False) -> ImageParity:
        def event(kind: str, mode: str | None = None, layer: str | None = None) -> None:
            if events:
                self.notify(ParityEvent(kind, self.run, self.count, index, image, mode, layer))

        height, width = image.pixels.shape[:2]
        oracle_layers, attributed = attribution_for(height * width, self.modes)
        x = scale_pixels(torch.from_numpy(image.pixels)).numpy()[None]
        event(IMAGE)
        started = time.perf_counter()
        report = compare_layers(
            _TracingReference(self.sides.reference, lambda: event(TRACED)),
            self.sides.compared.model,
            x,
            oracle=self.sides.exact,
            oracle_layers=oracle_layers,
            modes=self.modes,
            policy=self.policy,
            progress=lambda mode, name: event(LAYER, mode, name),
            cumulative_from_reference=True,
        )
        seconds = time.perf_counter() - started
        result = ImageParity(
            image.name, image.source, height, width, image.notes, attributed, report, seconds, pixels=image.pixels
        )
        event(DONE)
        return result


class _TracingReference:
    """The reference as ``compare_layers`` sees it, reporting when its trace is done."""

    def __init__(self, reference: Reference, done: Callable[[], None]) -> None:
        self.reference, self.done = reference, done
        self.arrays = reference.arrays

    def trace(self, x: np.ndarray) -> dict[str, np.ndarray]:
        out = self.reference.trace(x)
        self.done()
        return out


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
