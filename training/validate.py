"""Validation during training: the ``evaluation`` package's metrics on a held-out dataset ``evaluate`` reads.

Each image is read and its mask decoded as ``evaluate`` reads them (``evaluation.masks``), predicted whole by
the model in eval mode, and scored with ``evaluation.metrics``: per forged image pixel AUC and F1 (best and at
0.5) averaged over the images, the pooled pixel AUC over all pixels, and the image-level AUC of the maps' maxima.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evaluation.datasets import Dataset, DatasetError, load_dataset
from evaluation.masks import MaskError, decode_mask, fit_mask
from evaluation.metrics import (
    ScoreDistribution,
    image_level,
    image_score,
    mean_or_none,
    merge_distributions,
    pixel_scores,
)
from mantranet_torch import ManTraNet
from mantranet_torch.image_files import ImageReadError, read_image

from .config import TrainError


@dataclass
class Example:
    """One validation image as the report draws it."""

    name: str
    pixels: np.ndarray
    mask: np.ndarray | None
    likelihood: np.ndarray


@dataclass
class Validation:
    metrics: dict
    examples: list[Example] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load_validation_set(path: str | Path) -> Dataset:
    """The dataset ``--val`` names. Raises TrainError when it cannot be read or holds no usable image."""
    try:
        dataset = load_dataset(path)
    except DatasetError as e:
        raise TrainError(f"--val {e}") from None
    missing = [e for e in dataset.entries if not e.image.is_file() or (e.mask is not None and not e.mask.is_file())]
    if missing:
        entry = missing[0]
        absent = entry.image if not entry.image.is_file() else entry.mask
        raise TrainError(f"--val {path}: {absent} (entry {entry.name}) does not exist ({len(missing)} missing in all)")
    if not dataset.entries:
        raise TrainError(f"--val {path}: no usable image")
    return dataset


@torch.no_grad()
def validate(model: ManTraNet, dataset: Dataset, precision: str = "fp32", examples: int = 0) -> Validation:
    """Score ``model`` (put in eval mode; the caller restores its mode) on every image of ``dataset``.

    Returns:
        ``Validation``: metrics pixel_auc, pixel_f1_best, pixel_f1_fixed (means over forged images with a mask),
        pooled_auc, image_auc (None when not defined), images; the first ``examples`` images' maps.
    """
    model.eval()
    per_image, distributions, labels, scores, kept, skipped = [], [], [], [], [], []
    for entry in dataset.entries:
        try:
            pixels = read_image(entry.image).pixels
            mask = None
            if entry.mask is not None:
                mask = decode_mask(entry.mask.read_bytes(), str(entry.mask), dataset.mask_rule)
                mask = fit_mask(mask, pixels.shape[0], pixels.shape[1], False, str(entry.mask))
        except (ImageReadError, MaskError, OSError) as e:
            skipped.append((entry.name, str(e)))
            continue
        likelihood = model.predict(pixels, precision=precision)
        labels.append(entry.label)
        scores.append(image_score(likelihood, "max"))
        truth = mask if mask is not None else np.zeros(likelihood.shape, dtype=bool)
        distributions.append(ScoreDistribution.of(likelihood, truth))
        if entry.forged and mask is not None:
            per_image.append(pixel_scores(likelihood, mask))
        if len(kept) < examples:
            kept.append(Example(entry.name, pixels, mask, likelihood))
    if not labels:
        raise TrainError(f"--val {dataset.source}: no image could be read ({skipped[0][0]}: {skipped[0][1]})")
    pooled = merge_distributions(distributions)
    metrics = {
        "pixel_auc": mean_or_none([s.auc for s in per_image if s.auc is not None]),
        "pixel_f1_best": mean_or_none([s.f1_best for s in per_image]),
        "pixel_f1_fixed": mean_or_none([s.f1_fixed for s in per_image]),
        "pooled_auc": pooled.auc(),
        "image_auc": image_level(labels, scores)["image_auc"],
        "images": len(labels),
    }
    return Validation(metrics, kept, skipped)
