"""Forgery-localisation metrics: per image, pooled over pixels, and over images.

ROC curves and areas come from scikit-learn. The fixed-threshold scores (F1, IoU, MCC) are computed from
one confusion count per image, so that they can be summed over a dataset (pooled F1) and kept in the result
store; tests check them against scikit-learn's ``f1_score``, ``jaccard_score`` and ``matthews_corrcoef``.
The pooled ROC merges each image's exact score distribution (``ScoreDistribution``): scikit-learn would need
every pixel of the dataset in memory at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from sklearn.metrics import auc, balanced_accuracy_score, roc_auc_score, roc_curve

THRESHOLD = 0.5  # a pixel (or image) is called forged when its likelihood is above this
IMAGE_SCORES = ("max", "mean", "p99")
ImageScore = Literal["max", "mean", "p99"]
PIXEL_METRICS = ("pixel_auc", "pixel_f1_fixed", "pixel_f1_best", "pixel_iou_fixed", "pixel_mcc_fixed")
POOLED_METRICS = ("pooled_auc", "pooled_f1_fixed")
IMAGE_METRICS = ("image_auc", "image_balanced_accuracy")
METRICS = PIXEL_METRICS + POOLED_METRICS + IMAGE_METRICS


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def of(cls, likelihood: np.ndarray, mask: np.ndarray) -> Confusion:
        predicted = likelihood > THRESHOLD
        tp = int(np.count_nonzero(predicted & mask))
        fp = int(np.count_nonzero(predicted)) - tp
        positives = int(np.count_nonzero(mask))
        return cls(tp, fp, positives - tp, mask.size - positives - fp)

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    def f1(self) -> float:
        """2TP / (2TP + FP + FN); 0 when there is nothing to find and nothing found (scikit-learn's zero_division=0)."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 0.0

    def iou(self) -> float:
        denominator = self.tp + self.fp + self.fn
        return self.tp / denominator if denominator else 0.0

    def mcc(self) -> float:
        """Matthews correlation; 0 when a row or column of the confusion matrix is empty, as scikit-learn."""
        tp, fp, fn, tn = (float(v) for v in (self.tp, self.fp, self.fn, self.tn))
        denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return (tp * tn - fp * fn) / denominator if denominator else 0.0


@dataclass(frozen=True)
class PixelScores:
    """One forged image's pixel-level scores. ``auc`` is None when the mask is all one class."""

    auc: float | None
    f1_fixed: float
    f1_best: float
    best_threshold: float | None
    iou_fixed: float
    mcc_fixed: float
    confusion: Confusion

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PixelScores:
        return cls(**{**d, "confusion": Confusion(**d["confusion"])})


def pixel_scores(likelihood: np.ndarray, mask: np.ndarray) -> PixelScores:
    """Per-image scores of a float map against a bool mask of the same shape."""
    scores, truth = likelihood.ravel(), mask.ravel()
    confusion = Confusion.of(scores, truth)
    positives = confusion.tp + confusion.fn
    area, f1_best, best_threshold = None, 0.0, None
    if 0 < positives < truth.size:
        fpr, tpr, thresholds = roc_curve(truth, scores, drop_intermediate=False)
        area = float(auc(fpr, tpr))
        tp = tpr * positives  # counts at each distinct threshold (predicted forged: score >= threshold)
        fp = fpr * (truth.size - positives)
        f1 = 2 * tp / np.maximum(tp + fp + positives, 1)
        best = int(np.argmax(f1))
        f1_best, best_threshold = float(f1[best]), float(thresholds[best])
    elif positives == truth.size:  # all forged: calling every pixel forged is perfect
        f1_best, best_threshold = 1.0, float(scores.min())
    return PixelScores(area, confusion.f1(), f1_best, best_threshold, confusion.iou(), confusion.mcc(), confusion)


@dataclass(frozen=True)
class ScoreDistribution:
    """Likelihoods exactly, as a sorted list of distinct float32 values with how many forged and how many
    authentic pixels have each: an image's pixels, or a dataset's merged. Its size is the number of distinct
    values, not of pixels, and it gives the pooled ROC curve and AUC exactly as over the pixels themselves."""

    values: np.ndarray  # float32, ascending, distinct
    forged: np.ndarray  # int64 counts
    authentic: np.ndarray  # int64 counts

    @classmethod
    def of(cls, likelihood: np.ndarray, mask: np.ndarray) -> ScoreDistribution:
        """The distribution of a map (as float32, the saved maps' type) against a bool mask of its shape."""
        values, inverse = np.unique(likelihood.astype(np.float32, copy=False).ravel(), return_inverse=True)
        inverse = inverse.ravel()
        total = np.bincount(inverse, minlength=values.size)
        forged = np.bincount(inverse[mask.ravel()], minlength=values.size)
        return cls(values, forged.astype(np.int64), (total - forged).astype(np.int64))

    @classmethod
    def empty(cls) -> ScoreDistribution:
        return cls(np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.values.size)

    def to_arrays(self, prefix: str = "scores") -> dict[str, np.ndarray]:
        """For the store, losslessly and compactly: the values as steps between consecutive values' order keys
        (small integers, which deflate better than the floats), the counts in the narrowest unsigned type that
        holds them (most are 1)."""

        def narrow(counts: np.ndarray) -> np.ndarray:
            return counts.astype(np.min_scalar_type(int(counts.max(initial=0))))

        steps = np.diff(_order_keys(self.values), prepend=np.uint32(0))
        return {f"{prefix}_steps": steps, f"{prefix}_forged": narrow(self.forged),
                f"{prefix}_authentic": narrow(self.authentic)}  # fmt: skip

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "scores") -> ScoreDistribution:
        steps = arrays[f"{prefix}_steps"]
        forged, authentic = arrays[f"{prefix}_forged"], arrays[f"{prefix}_authentic"]
        if not (steps.dtype == np.uint32 and steps.ndim == 1 and forged.shape == authentic.shape == steps.shape):
            raise ValueError(f"{prefix}: not a score distribution ({steps.dtype} {steps.shape}, {forged.shape}, "
                             f"{authentic.shape})")  # fmt: skip
        values = _from_order_keys(np.cumsum(steps, dtype=np.uint32))
        return cls(values, forged.astype(np.int64), authentic.astype(np.int64))

    def auc(self) -> float | None:
        """ROC AUC: P(forged > authentic) + P(tie) / 2 over all (forged, authentic) pixel pairs (Mann-Whitney,
        as ``roc_auc_score`` counts ties); None unless both classes are present. Counts are exact integers; the
        products and their (pairwise) sum are float64, off by a few units in the 16th digit."""
        positives, negatives = int(self.forged.sum()), int(self.authentic.sum())
        if not positives or not negatives:
            return None
        below = np.cumsum(self.authentic) - self.authentic  # authentic pixels with a lower value
        pairs = self.forged.astype(np.float64) * (below.astype(np.float64) + 0.5 * self.authentic)
        return float(np.sum(pairs) / (float(positives) * float(negatives)))

    def roc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(false positive rate, true positive rate, precision) with each distinct value as threshold (a pixel
        called forged when its value is >= it), highest first, after the point (0, 0) with precision 1."""
        tp = np.cumsum(self.forged[::-1]).astype(np.float64)
        fp = np.cumsum(self.authentic[::-1]).astype(np.float64)
        fpr = fp / max(fp[-1], 1.0) if fp.size else fp
        tpr = tp / max(tp[-1], 1.0) if tp.size else tp
        precision = tp / np.maximum(tp + fp, 1.0)
        return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr]), np.concatenate([[1.0], precision])


def _order_keys(values: np.ndarray) -> np.ndarray:
    """float32 bit patterns as uint32 in the floats' order (negatives' bits flipped, positives' sign bit set)."""
    bits = values.view(np.uint32)
    return np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)


def _from_order_keys(keys: np.ndarray) -> np.ndarray:
    bits = np.where(keys >> 31 == 1, keys & np.uint32(0x7FFFFFFF), ~keys).astype(np.uint32)
    return bits.view(np.float32)


def _union(parts: list[ScoreDistribution]) -> ScoreDistribution:
    values = np.concatenate([p.values for p in parts])
    order = np.argsort(values, kind="stable")  # Timsort: the parts are sorted runs, merged in linear time
    values = values[order]
    starts = np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))  # each distinct value's first

    def summed(counts: list[np.ndarray]) -> np.ndarray:
        return np.add.reduceat(np.concatenate(counts)[order], starts) if starts.size else np.zeros(0, np.int64)

    forged, authentic = summed([p.forged for p in parts]), summed([p.authentic for p in parts])
    return ScoreDistribution(values[starts], forged, authentic)


def merge_distributions(distributions: Iterable[ScoreDistribution]) -> ScoreDistribution:
    """One distribution of many, merged as they arrive. Partial merges are kept on a stack, each more than
    twice as long as the one above it (as the digits of a binary counter), so memory stays within a small
    multiple of the distinct values and each value is merged again only O(log n) times."""
    stack: list[ScoreDistribution] = []
    for distribution in distributions:
        stack.append(distribution)
        while len(stack) > 1 and len(stack[-2]) <= 2 * len(stack[-1]):
            top = stack.pop()
            stack.append(_union([stack.pop(), top]))
    return _union(stack) if stack else ScoreDistribution.empty()


def image_score(likelihood: np.ndarray, how: ImageScore) -> float:
    if how == "max":
        return float(likelihood.max())
    if how == "mean":
        return float(likelihood.astype(np.float64).mean())
    if how == "p99":
        return float(np.percentile(likelihood, 99))  # linear interpolation between order statistics
    raise ValueError(f"image score {how!r}: choose one of {', '.join(IMAGE_SCORES)}")


def image_level(labels: list[int], scores: list[float]) -> dict[str, float | None]:
    """image_auc and image_balanced_accuracy (forged when the score is above ``THRESHOLD``); None unless
    both classes are present."""
    if len(set(labels)) < 2:
        return {"image_auc": None, "image_balanced_accuracy": None}
    predicted = [int(s > THRESHOLD) for s in scores]
    return {
        "image_auc": float(roc_auc_score(labels, scores)),
        "image_balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
    }


def mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values, dtype=np.float64)) if values else None
