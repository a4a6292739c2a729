"""Robustness perturbations, applied deterministically to each image (and its mask where geometry changes).

Specs as in the robustness tables of the literature: ``jpeg:QUALITY``, ``resize:FACTOR``, ``blur:SIGMA``,
``noise:SIGMA`` (Gaussian, in 8-bit levels); chain several with ``+`` (``resize:0.5+jpeg:70``). Noise is
seeded by the run's seed and the image's content hash, so every engine and every rerun draws the same noise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .masks import resize_nearest

KINDS = ("jpeg", "resize", "blur", "noise")


class PerturbationError(ValueError):
    pass


@dataclass(frozen=True)
class Step:
    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


@dataclass(frozen=True)
class Perturbation:
    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, text: str) -> Perturbation:
        steps = []
        for part in text.split("+"):
            kind, sep, value = part.strip().partition(":")
            if kind not in KINDS or not sep:
                raise PerturbationError(f"--perturb {text}: expected KIND:VALUE with KIND one of {', '.join(KINDS)}")
            try:
                number = float(value)
            except ValueError:
                raise PerturbationError(f"--perturb {text}: {value!r} is not a number") from None
            _check(kind, number, text)
            steps.append(Step(kind, number))
        return cls(tuple(steps))

    def __str__(self) -> str:
        return "+".join(str(s) for s in self.steps)

    def apply(
        self, pixels: np.ndarray, mask: np.ndarray | None, seed: int, content: str
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The perturbed uint8 RGB image and its mask (resized with it; None stays None)."""
        for index, step in enumerate(self.steps):
            pixels, mask = apply_step(step, pixels, mask, _rng(seed, content, index))
        return pixels, mask


def _check(kind: str, value: float, text: str) -> None:
    ok = {
        "jpeg": 1 <= value <= 100 and value == int(value),
        "resize": 0 < value <= 8,
        "blur": value > 0,
        "noise": value > 0,
    }[kind]
    if not ok:
        want = {
            "jpeg": "an integer quality 1..100",
            "resize": "a factor in (0, 8]",
            "blur": "a sigma > 0",
            "noise": "a sigma > 0 (8-bit levels)",
        }[kind]
        raise PerturbationError(f"--perturb {text}: {kind} takes {want}")


def _rng(seed: int, content: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(content[:16], 16), index])


def apply_step(
    step: Step, pixels: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """One step on a uint8 RGB image (and its mask where geometry changes); noise is drawn from ``rng``."""
    image = Image.fromarray(pixels)
    if step.kind == "jpeg":  # Pillow's libjpeg, 4:2:0 chroma subsampling as most cameras and sites use
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(step.value))
        with Image.open(buffer) as decoded:
            return np.array(decoded.convert("RGB")), mask
    if step.kind == "resize":  # bilinear with Pillow's antialiasing on reduction; the mask by nearest neighbour
        height, width = pixels.shape[:2]
        size = (max(1, round(width * step.value)), max(1, round(height * step.value)))
        resized = np.array(image.resize(size, Image.Resampling.BILINEAR))
        return resized, None if mask is None else resize_nearest(mask, size[1], size[0])
    if step.kind == "blur":  # Pillow's Gaussian blur, whose radius is the standard deviation
        return np.array(image.filter(ImageFilter.GaussianBlur(step.value))), mask
    noisy = pixels.astype(np.float64) + rng.normal(0.0, step.value, pixels.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8), mask


def resize_long_side(
    pixels: np.ndarray, mask: np.ndarray | None, long_side: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """``--resize``: the image scaled so that its longer side is ``long_side`` (bilinear), the mask with it."""
    height, width = pixels.shape[:2]
    factor = long_side / max(height, width)
    return apply_step(Step("resize", factor), pixels, mask, np.random.default_rng(0))
