"""Forgery-localisation metrics: per image, pooled over pixels, and over images.

ROC curves and areas come from scikit-learn. The fixed-threshold scores (F1, IoU, MCC) are computed from
one confusion count per image, so that they can be summed over a dataset (pooled F1) and kept in the result
store; tests check them against scikit-learn's ``f1_score``, ``jaccard_score`` and ``matthews_corrcoef``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from sklearn.metrics import auc, balanced_accuracy_score, roc_auc_score, roc_curve

THRESHOLD = 0.5  # a pixel (or image) is called forged when its likelihood is above this
HISTOGRAM_LEVELS = 65536  # pooled ROC: likelihoods at 16-bit resolution, round(p * 65535)
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


def levels(likelihood: np.ndarray) -> np.ndarray:
    """Likelihoods at the pooled ROC's 16-bit resolution: round(p * 65535), in float64."""
    return np.rint(np.clip(likelihood.astype(np.float64), 0.0, 1.0) * (HISTOGRAM_LEVELS - 1)).astype(np.int64)


def level_histograms(likelihood: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of each 16-bit level among forged and among authentic pixels (for the pooled ROC)."""
    q = levels(likelihood.ravel())
    truth = mask.ravel()
    forged = np.bincount(q[truth], minlength=HISTOGRAM_LEVELS)
    authentic = np.bincount(q[~truth], minlength=HISTOGRAM_LEVELS)
    return forged, authentic


def histogram_auc(forged: np.ndarray, authentic: np.ndarray) -> float | None:
    """ROC AUC of level counts: P(forged level > authentic level) + P(equal) / 2 (Mann-Whitney), in float64."""
    positives, negatives = float(forged.sum()), float(authentic.sum())
    if not positives or not negatives:
        return None
    below = np.cumsum(authentic, dtype=np.float64) - authentic
    return float(np.sum(forged * (below + 0.5 * authentic)) / (positives * negatives))


def histogram_roc(forged: np.ndarray, authentic: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, precision) at each level used, highest threshold first."""
    used = np.flatnonzero((forged + authentic) > 0)[::-1]
    tp = np.cumsum(forged[used], dtype=np.float64)
    fp = np.cumsum(authentic[used], dtype=np.float64)
    fpr = fp / max(fp[-1], 1.0)
    tpr = tp / max(tp[-1], 1.0)
    precision = tp / np.maximum(tp + fp, 1.0)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr]), np.concatenate([[1.0], precision])


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
