"""A minimal failing input: the smallest crop of a failing image, then the simplest pixel content, that still fails
with the same first divergent layer (as hypothesis shrinks a failing example, or Polygraphy's ``debug reduce``
a failing model).

The search is greedy and bounded by a time budget. Crops first: the largest cuts first (half of the image from any
side, then a quarter, ... down to one pixel), the first cut that still fails is taken and the search starts over
from it. Then content, simplest first: one flat colour, two levels per channel, eight levels, grey. Every candidate
is judged by a full comparison of it (``fails``), so the result reproduces with the command line saved beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIN_SIDE = 2  # below this, TensorFlow's symmetric padding of b1c1 (2 pixels) has nothing to mirror


@dataclass(frozen=True)
class Box:
    left: int
    top: int
    width: int
    height: int

    def cut(self, pixels: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(pixels[self.top : self.top + self.height, self.left : self.left + self.width])


def _cuts(box: Box) -> Iterator[Box]:
    """Smaller boxes inside ``box``, the largest cuts first: both sides halved (centred), then a fraction of one
    side (half, quarter, ... one pixel) from each of its ends."""
    if box.width // 2 >= MIN_SIDE and box.height // 2 >= MIN_SIDE:
        w, h = box.width // 2, box.height // 2
        yield Box(box.left + (box.width - w) // 2, box.top + (box.height - h) // 2, w, h)
    step = max(box.width, box.height) // 2
    while step >= 1:
        if box.width - step >= MIN_SIDE:
            yield Box(box.left + step, box.top, box.width - step, box.height)
            yield Box(box.left, box.top, box.width - step, box.height)
        if box.height - step >= MIN_SIDE:
            yield Box(box.left, box.top + step, box.width, box.height - step)
            yield Box(box.left, box.top, box.width, box.height - step)
        step //= 2


def _flat(p: np.ndarray) -> np.ndarray:
    return np.broadcast_to(p.reshape(-1, 3).mean(axis=0).round().astype(np.uint8), p.shape).copy()


def _two_levels(p: np.ndarray) -> np.ndarray:
    return np.where(p >= p.reshape(-1, 3).mean(axis=0), 255, 0).astype(np.uint8)


def _eight_levels(p: np.ndarray) -> np.ndarray:
    return (p // 32 * 32 + 16).astype(np.uint8)


def _grey(p: np.ndarray) -> np.ndarray:
    return np.repeat(p.mean(axis=2, keepdims=True).round().astype(np.uint8), 3, axis=2)


SIMPLIFICATIONS: tuple[tuple[str, Callable[[np.ndarray], np.ndarray]], ...] = (
    ("one flat colour", _flat),
    ("two levels per channel", _two_levels),
    ("eight levels per channel", _eight_levels),
    ("grey", _grey),
)


@dataclass
class ShrinkResult:
    """The smallest failing crop found (``box`` in the original image) and its simplified pixels."""

    pixels: np.ndarray
    box: Box
    simplified: list[str] = field(default_factory=list)
    checks: int = 0
    seconds: float = 0.0
    exhausted: bool = False  # the budget ran out before the search ended

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.box.width,
            "height": self.box.height,
            "left": self.box.left,
            "top": self.box.top,
            "simplified": self.simplified,
            "checks": self.checks,
            "seconds": round(self.seconds, 3),
            "budget_exhausted": self.exhausted,
        }


def shrink(
    pixels: np.ndarray,
    fails: Callable[[np.ndarray], bool],
    budget_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> ShrinkResult:
    """The smallest crop of ``pixels`` (H x W x 3 uint8) for which ``fails`` holds, then its simplest content;
    ``fails(pixels)`` is assumed to hold for the whole image. Stops when no smaller input fails or ``budget_s``
    seconds are spent (checks in flight finish)."""
    started = clock()
    height, width = pixels.shape[:2]
    result = ShrinkResult(pixels, Box(0, 0, width, height))
    tried: set[Box] = set()

    def out_of_time() -> bool:
        result.exhausted = clock() - started >= budget_s
        return result.exhausted

    def check(candidate: np.ndarray) -> bool:
        result.checks += 1
        return fails(candidate)

    improved = True
    while improved and not out_of_time():
        improved = False
        for box in _cuts(result.box):
            if box in tried:
                continue
            tried.add(box)
            if out_of_time():
                break
            if check(box.cut(pixels)):
                result.box, result.pixels, improved = box, box.cut(pixels), True
                break
    for name, simplify in SIMPLIFICATIONS:
        if out_of_time():
            break
        candidate = simplify(result.pixels)
        if not np.array_equal(candidate, result.pixels) and check(candidate):
            result.pixels = candidate
            result.simplified.append(name)
            if name == SIMPLIFICATIONS[0][0]:
                break  # nothing is simpler than one colour
    result.seconds = clock() - started
    return result
