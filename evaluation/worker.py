"""Evaluating one image: read it and its mask, apply the row's perturbation, predict, score.

The same ``Evaluator`` runs in the local engine's worker processes and in the Ray actors, so both engines
compute identical records. A worker loads its model once and keeps it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .masks import MaskError, MaskRule, decode_mask, fit_mask
from .metrics import ScoreDistribution, pixel_scores
from .perturb import Perturbation, resize_long_side
from .store import Record

TORCH, TENSORFLOW = "torch", "tensorflow"
PREVIEW_SIDE = 192  # the map and mask kept in each record for the report's best/worst images


@dataclass(frozen=True)
class Options:
    """Options that change a result (they are part of each record's key)."""

    precision: str = "fp32"
    resize: int | None = None  # --resize LONG_SIDE
    resize_masks: bool = False
    seed: int = 0
    mask_rule: MaskRule = field(default_factory=MaskRule)
    max_pixels: int = 178_956_970

    def key_parts(self) -> dict:
        return {
            "precision": self.precision,
            "resize": self.resize,
            "resize_masks": self.resize_masks,
            "seed": self.seed,
            "mask_rule": self.mask_rule.describe(),
        }


@dataclass(frozen=True)
class Execution:
    """How to compute (not part of the key: tiles give the whole image's result)."""

    tile: int | None = None
    max_memory: float | None = None  # GB for this worker
    threads: int | None = None


@dataclass(frozen=True)
class Setup:
    """Everything a worker needs to build its Evaluator; ``weights_data`` when the file is not at hand (Ray)."""

    weights: str
    variant: int | None
    options: Options
    execution: Execution
    weights_data: bytes | None = None
    compare_reference: bool = False  # load the TensorFlow reference too


@dataclass(frozen=True)
class Task:
    key: str
    name: str
    label: int
    image: str  # path (read by the worker unless ``image_data`` is given)
    mask: str | None
    content: str  # SHA-256 of the image file
    mask_content: str | None
    perturbation: str | None
    backend: str
    want_map: bool
    image_data: bytes | None = None
    mask_data: bytes | None = None


@dataclass
class Outcome:
    task: Task
    record: Record | None = None
    likelihood: np.ndarray | None = None  # the map, when asked for
    error: str | None = None


class Evaluator:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self._model = None
        self._reference = None
        if setup.execution.threads:
            import torch

            torch.set_num_threads(setup.execution.threads)
        self.model  # noqa: B018 - load now: a bad weight file is an error of the run, not of an image
        if setup.compare_reference:
            self.reference  # noqa: B018 - and a missing TensorFlow

    # ------------------------------------------------------------ models

    @contextlib.contextmanager
    def _weights_file(self):
        if self.setup.weights_data is None:
            yield Path(self.setup.weights)
            return
        with tempfile.TemporaryDirectory(prefix="mantranet-eval-") as folder:
            path = Path(folder) / Path(self.setup.weights).name
            path.write_bytes(self.setup.weights_data)
            yield path

    @property
    def model(self):
        if self._model is None:
            from converter import load_weights

            with self._weights_file() as path:
                self._model = load_weights(path, self.setup.variant, map_location=device())
        return self._model

    @property
    def reference(self):
        if self._reference is None:
            self._reference = _reference_model(self._weights_file, self.setup.variant)
        return self._reference

    def predict(self, pixels: np.ndarray, backend: str) -> np.ndarray:
        if backend == TENSORFLOW:
            from mantranet_torch import to_model_input

            x = to_model_input(pixels).permute(0, 2, 3, 1).numpy()
            return self.reference.predict(x)[0, :, :, 0]
        execution = self.setup.execution
        return self.model.predict(
            pixels, tile=execution.tile, max_memory=execution.max_memory, precision=self.setup.options.precision
        )

    # ------------------------------------------------------------ one image

    def __call__(self, task: Task) -> Outcome:
        try:
            return self._evaluate(task)
        except MaskError as e:
            return Outcome(task, error=str(e))
        except Exception as e:  # an image the reader rejects, a damaged file, out of memory on one image
            from mantranet_torch.image_files import ImageReadError

            if isinstance(e, (ImageReadError, ValueError, MemoryError)) or "memory" in str(e).lower():
                return Outcome(task, error=str(e) or type(e).__name__)
            raise

    def _evaluate(self, task: Task) -> Outcome:
        start = time.perf_counter()
        pixels, notes = _read_pixels(task, self.setup.options.max_pixels)
        options = self.setup.options
        mask = None
        if task.mask is not None:
            data = task.mask_data if task.mask_data is not None else Path(task.mask).read_bytes()
            mask = decode_mask(data, task.mask, options.mask_rule)
            mask = fit_mask(mask, pixels.shape[0], pixels.shape[1], options.resize_masks, task.mask)
        if options.resize is not None:
            pixels, mask = resize_long_side(pixels, mask, options.resize)
        if task.perturbation:
            pixels, mask = Perturbation.parse(task.perturbation).apply(pixels, mask, options.seed, task.content)
        predict_start = time.perf_counter()
        likelihood = self.predict(pixels, task.backend)
        predict_seconds = time.perf_counter() - predict_start
        record = score(task, likelihood, mask)
        record.fields["notes"] = notes
        record.fields["predict_seconds"] = predict_seconds
        record.fields["seconds"] = time.perf_counter() - start
        return Outcome(task, record, likelihood if task.want_map else None)


def score(task: Task, likelihood: np.ndarray, mask: np.ndarray | None) -> Record:
    """A record of ``likelihood`` against ``mask`` (None: no mask; pixel scores need one).

    Raises:
        ValueError: the map holds a NaN or infinite value (named by its pixel).
    """
    finite = np.isfinite(likelihood)
    if not finite.all():
        y, x = np.argwhere(~finite)[0]
        raise ValueError(
            f"{task.image}: the map holds {np.count_nonzero(~finite):,} NaN or infinite value(s), the first at "
            f"pixel (x={x}, y={y}); the weights or the precision give no usable map for this image"
        )
    height, width = likelihood.shape
    fields = {
        "name": task.name,
        "label": task.label,
        "width": width,
        "height": height,
        "perturbation": task.perturbation,
        "backend": task.backend,
        "image_sha256": task.content,
        "mask_sha256": task.mask_content,
        "scores": {
            "max": float(likelihood.max()),
            "mean": float(likelihood.astype(np.float64).mean()),
            "p99": float(np.percentile(likelihood, 99)),
        },
        "pixel": None,
    }
    arrays = {"preview_map": _preview(likelihood)}
    if mask is not None:
        arrays["preview_mask"] = _preview(mask.astype(np.float32))
    if mask is not None and task.label == 1:
        fields["pixel"] = pixel_scores(likelihood, mask).to_dict()
        arrays |= ScoreDistribution.of(likelihood, mask).to_arrays()  # for the pooled ROC, exactly
    return Record(fields, arrays)


def _preview(values: np.ndarray) -> np.ndarray:
    """8-bit, longer side at most PREVIEW_SIDE (nearest neighbour keeps mask edges hard)."""
    height, width = values.shape
    factor = min(1.0, PREVIEW_SIDE / max(height, width))
    image = Image.fromarray(np.rint(np.clip(values, 0, 1) * 255).astype(np.uint8))
    if factor < 1:
        image = image.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.NEAREST)
    return np.asarray(image)


def _read_pixels(task: Task, max_pixels: int) -> tuple[np.ndarray, list[str]]:
    from mantranet_torch.image_files import read_image

    if task.image_data is None:
        image = read_image(Path(task.image), max_pixels)
        return image.pixels, image.notes
    from mantranet_torch.image_files import ImageReadError

    fd, tmp = tempfile.mkstemp(prefix="mantranet-eval-", suffix=Path(task.image).suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(task.image_data)
        image = read_image(Path(tmp), max_pixels)
    except ImageReadError as e:  # name the dataset's file, not the copy
        raise ImageReadError(str(e).replace(tmp, task.image)) from None
    finally:
        os.unlink(tmp)
    return image.pixels, image.notes


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _reference_model(weights_file, variant: int | None):
    """The TensorFlow reference for the same weights (imported only when asked for)."""
    from converter.mapping import torch_to_keras
    from mantranet_torch.weights import H5_SUFFIXES, read_model_weights
    from parity_tests.environment import import_reference, native_stderr_silenced

    reference = import_reference()
    with weights_file() as path, native_stderr_silenced():  # TensorFlow's C++ start-up lines
        if path.suffix.lower() in H5_SUFFIXES:
            return reference.load(path, variant)
        tensors, config, _ = read_model_weights(path)
        return reference.from_keras_arrays(torch_to_keras(tensors), config)
