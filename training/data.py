"""Training data as PyTorch sees it: random native-resolution crops, masks in {0, 1}, a sampler that shards and
resumes, and a tally of what had to be skipped.

    from torch.utils.data import DataLoader
    from training.data import EpochSampler, Skips, collate, open_training_data

    data = open_training_data(manifest="train.csv", crop=256, seed=0)       # or synthetic="photos/"
    sampler = EpochSampler(data, batch_size=8, seed=0, rank=0, world_size=1, epoch=0, position=0)
    loader = DataLoader(data, batch_size=8, sampler=sampler, collate_fn=collate, num_workers=2)
    skips = Skips.of(data)
    for batch in loader:   # batch["image"]: float32 B x 3 x C x C in [-1, 1]; batch["mask"]: float32 B x 1 x C x C
        skips.update(batch["meta"])

The API:

- ``CropDataset`` (a manifest or benchmark folder that ``evaluation.load_dataset`` reads) and ``SyntheticDataset``
  (forgeries made on the fly, ``training.synthetic``): map-style datasets. ``dataset[key]``, ``key`` an index or
  an ``(epoch, index)`` pair (what ``EpochSampler`` yields), returns a dict: ``image`` float32 3 x C x C scaled as
  the model wants (``mantranet_torch.scale_pixels``: x / 255 * 2 - 1), ``mask`` float32 1 x C x C in {0, 1},
  ``meta`` (a dict: ``name``, ``kind``, ``epoch``, ``index``, the crop's ``top``/``left``, ``flip_h``/``flip_v``,
  ``skipped``: [name, why] pairs met while making this sample).
- ``EpochSampler``: the order of an epoch (shuffled per (seed, epoch) for ``CropDataset``; in order for
  ``SyntheticDataset``, whose kinds then come balanced in every batch), split among ``world_size`` ranks in
  blocks of ``batch_size``, starting at ``position``: the samples of the epoch already consumed by all ranks
  together, a multiple of ``batch_size * world_size``. Store ``epoch`` and ``position`` in a checkpoint to resume
  bit for bit.
- ``collate``: a batch of samples as stacked tensors and a list of metas.
- ``Skips``: files left out (at construction: unreadable headers, images smaller than the crop, forged images
  without a mask, masks of another size) and skipped mid-run (a file that fails to decode, a mask of another size):
  each named once with why, counted; ``Skips.to_dict()`` for the run's report.

The seed contract: sample ``index`` of ``epoch`` is a pure function of (seed, epoch, index) and the files: which
crop, which flips, which replacement for a file that cannot be read. Any worker, any order, the same tensors.

Crops: ``crop`` x ``crop`` at the image's native resolution, anywhere in the image, flipped horizontally and
vertically with probability 1/2 each (image and mask together); nothing is resized unless ``resize`` asks
(longer side to ``resize`` pixels, bilinear, the mask by nearest neighbour). An image smaller than the crop on
either side is left out and counted (never padded: padding is a flat border whose missing noise the model would
learn to flag). Errors (``DataError``): no usable image at all, a crop larger than every image (naming the
largest).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from evaluation.datasets import Dataset as EvalDataset
from evaluation.datasets import DatasetError, Entry, load_dataset
from evaluation.masks import MaskError, MaskRule, decode_mask, fit_mask
from evaluation.perturb import resize_long_side
from mantranet_torch import scale_pixels
from mantranet_torch.image_files import DEFAULT_MAX_PIXELS, ImageReadError, read_image

from .synthetic import DataError, Recipe, SyntheticForgeries, image_size

__all__ = [
    "CropDataset",
    "DataError",
    "EpochSampler",
    "Skips",
    "SyntheticDataset",
    "collate",
    "open_training_data",
]

CROP_STREAM = 0xC809  # separates the crop draws from the synthetic and sampler streams of the same seed
ORDER_STREAM = 0x0D3E
DEFAULT_CROP = 256
SYNTHETIC_EPOCH = 10_000  # samples in an epoch of synthetic forgeries (the epoch only sets the sampler's period)
MAX_REPLACEMENTS = 16  # unreadable entries in a row before a sample gives up


def _key(key: int | tuple[int, int], default_epoch: int) -> tuple[int, int]:
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return default_epoch, int(key)


def _sample(pixels: np.ndarray, mask: np.ndarray, meta: dict) -> dict:
    image = scale_pixels(torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))))
    return {"image": image, "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None], "meta": meta}


def _flip(rng: np.random.Generator, pixels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    flip_h, flip_v = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    if flip_h:
        pixels, mask = pixels[:, ::-1], mask[:, ::-1]
    if flip_v:
        pixels, mask = pixels[::-1], mask[::-1]
    return pixels, mask, {"flip_h": flip_h, "flip_v": flip_v}


class CropDataset(Dataset):
    """Random ``crop`` x ``crop`` crops of a dataset ``evaluate`` reads (manifest or benchmark folder).

    Args:
        source: a manifest (.csv/.jsonl), a benchmark folder, or an ``evaluation.Dataset`` already loaded.
        crop: the side of every crop in pixels.
        seed: the seed of the crops and flips.
        flips: draw horizontal and vertical flips.
        resize: when given, images are first scaled so that their longer side is this many pixels.
        resize_masks: masks of another size are resized by nearest neighbour instead of skipped.
        layout, mask_rule: as ``evaluation.load_dataset`` takes them.

    Raises:
        DataError: the dataset cannot be read, has no usable entry, or every image is smaller than the crop.
    """

    shuffle = True

    def __init__(
        self,
        source: str | Path | EvalDataset,
        crop: int = DEFAULT_CROP,
        seed: int = 0,
        flips: bool = True,
        resize: int | None = None,
        resize_masks: bool = False,
        layout: str | None = None,
        mask_rule: MaskRule | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if crop < 1:
            raise DataError(f"crop {crop}: must be at least 1 pixel")
        if resize is not None and resize < crop:
            raise DataError(f"resize {resize}: the longer side would be smaller than the crop {crop}")
        try:
            dataset = source if isinstance(source, EvalDataset) else load_dataset(source, layout, mask_rule)
        except DatasetError as e:
            raise DataError(str(e)) from None
        self.source, self.crop, self.seed, self.flips = dataset.source, crop, seed, flips
        self.resize, self.resize_masks, self.max_pixels = resize, resize_masks, max_pixels
        self.mask_rule = mask_rule or dataset.mask_rule
        self.epoch = 0
        self.problems: list[tuple[str, str]] = list(dataset.problems)
        self.entries: list[Entry] = []
        largest: tuple[int, int, str] | None = None
        for entry in dataset.entries:
            why, size = self._check(entry)
            why = why and why.removeprefix(f"{entry.image}: ")  # the entry's name says which image
            if size is not None and (largest is None or min(size) > min(largest[:2])):
                largest = (*size, entry.name)
            if why:
                self.problems.append((entry.name, why))
            else:
                self.entries.append(entry)
        if not self.entries:
            if largest is not None and min(largest[:2]) < crop:
                raise DataError(f"crop {crop} x {crop} is larger than every image of {self.source}; the largest is "
                                f"{largest[0]} x {largest[1]} ({largest[2]})")  # fmt: skip
            first = f" ({self.problems[0][0]}: {self.problems[0][1]})" if self.problems else ""
            raise DataError(f"{self.source}: no usable image{first}")
        self._bad: dict[str, str] = {}  # entries that failed in this process: not decoded again

    def _size(self, width: int, height: int) -> tuple[int, int]:
        if self.resize is None:
            return width, height
        factor = self.resize / max(width, height)
        return max(1, round(width * factor)), max(1, round(height * factor))

    def _check(self, entry: Entry) -> tuple[str | None, tuple[int, int] | None]:
        """Why ``entry`` cannot give a crop (None when it can), and its size once read and resized."""
        if entry.forged and entry.mask is None:
            return "a forged image without a mask", None
        try:
            width, height = image_size(entry.image)
        except DataError as e:
            return str(e), None
        if width * height > self.max_pixels:
            return f"{entry.image}: {width} x {height} exceeds the pixel limit {self.max_pixels:,}", None
        if entry.mask is not None and not self.resize_masks:
            try:
                mask_size = image_size(entry.mask, exif=False)  # evaluate reads masks as stored
            except DataError as e:
                return str(e), None
            if mask_size != (width, height):
                return _wrong_size(entry.mask, mask_size, width, height), None
        size = self._size(width, height)
        if min(size) < self.crop:
            return f"{size[0]} x {size[1]} is smaller than the crop {self.crop} x {self.crop}", size
        return None, size

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """The epoch used for plain integer keys (``EpochSampler`` passes (epoch, index) pairs instead)."""
        self.epoch = epoch

    def read(self, entry: Entry) -> tuple[np.ndarray, np.ndarray]:
        """The whole image (uint8 H x W x 3) and its bool mask, resized when asked. Raises DataError."""
        try:
            pixels = read_image(entry.image, self.max_pixels).pixels
            if entry.mask is None:
                mask = np.zeros(pixels.shape[:2], bool)
            else:
                mask = decode_mask(entry.mask.read_bytes(), str(entry.mask), self.mask_rule)
                mask = fit_mask(mask, pixels.shape[0], pixels.shape[1], self.resize_masks, str(entry.mask))
        except (ImageReadError, MaskError) as e:
            raise DataError(str(e)) from None
        except OSError as e:
            raise DataError(f"{entry.mask}: cannot read the mask ({e.strerror or e})") from None
        if self.resize is not None:
            pixels, mask = resize_long_side(pixels, mask, self.resize)
        if min(pixels.shape[:2]) < self.crop:
            raise DataError(
                f"{entry.image}: {pixels.shape[1]} x {pixels.shape[0]} is smaller than the crop {self.crop}"
            )
        return pixels, mask

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = _key(key, self.epoch)
        rng = np.random.default_rng([CROP_STREAM, self.seed, epoch, index])
        skipped: list[list[str]] = []
        chosen = index
        for _ in range(MAX_REPLACEMENTS):
            entry = self.entries[chosen]
            replacement = int(rng.integers(len(self.entries)))  # drawn whether needed or not: same stream either way
            if entry.name not in self._bad:
                try:
                    pixels, mask = self.read(entry)
                    break
                except DataError as e:
                    self._bad[entry.name] = str(e).removeprefix(f"{entry.image}: ")
            skipped.append([entry.name, self._bad[entry.name]])
            chosen = replacement
        else:
            raise DataError(f"{MAX_REPLACEMENTS} entries in a row could not be read (last: {skipped[-1][1]})")
        height, width = mask.shape
        top, left = int(rng.integers(0, height - self.crop + 1)), int(rng.integers(0, width - self.crop + 1))
        pixels = pixels[top : top + self.crop, left : left + self.crop]
        mask = mask[top : top + self.crop, left : left + self.crop]
        flips = {"flip_h": False, "flip_v": False}
        if self.flips:
            pixels, mask, flips = _flip(rng, pixels, mask)
        meta = {"name": entry.name, "kind": "forged" if entry.forged else "authentic", "epoch": epoch,
                "index": index, "entry": chosen, "top": top, "left": left, **flips, "skipped": skipped}  # fmt: skip
        return _sample(pixels, mask, meta)


def _wrong_size(mask: Path, size: tuple[int, int], width: int, height: int) -> str:
    return (f"{mask}: the mask is {size[0]} x {size[1]} but its image is {width} x {height} (width x height); "
            "resize_masks (--resize-masks) resizes masks by nearest neighbour")  # fmt: skip


class SyntheticDataset(Dataset):
    """Forgeries made on the fly from a folder of authentic photographs (``training.synthetic``), ``crop`` square.

    Sample ``index`` of an epoch is ``SyntheticForgeries.sample(index, epoch)``: its kind is
    ``recipe.kinds[index % len(kinds)]``, so a batch of consecutive indices (what ``EpochSampler`` gives it)
    holds every kind equally (exactly when the global batch is a multiple of ``len(kinds)``). No flips: each
    crop is new already. ``length``: samples per epoch.
    """

    shuffle = False

    def __init__(
        self,
        photos: str | Path | Sequence[Path],
        crop: int = DEFAULT_CROP,
        seed: int = 0,
        recipe: Recipe | None = None,
        length: int = SYNTHETIC_EPOCH,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if length < 1:
            raise DataError(f"length {length}: an epoch needs at least one sample")
        self.forgeries = SyntheticForgeries(photos, crop, seed, recipe, max_pixels)
        self.crop, self.seed, self.length, self.epoch = crop, seed, length, 0
        photos = self.forgeries.photos
        self.problems: list[tuple[str, str]] = photos.problems + photos.small

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = _key(key, self.epoch)
        forgery = self.forgeries.sample(index, epoch)
        host = forgery.meta["host"]
        meta = {"name": f"{host['photo']}@{host['top']},{host['left']}", "kind": forgery.kind, "epoch": epoch,
                "index": index, "entry": index, "top": host["top"], "left": host["left"], "flip_h": False,
                "flip_v": False, "skipped": [list(s) for s in forgery.skipped]}  # fmt: skip
        return _sample(forgery.image, forgery.mask, meta)


def open_training_data(
    manifest: str | Path | None = None,
    synthetic: str | Path | None = None,
    crop: int = DEFAULT_CROP,
    seed: int = 0,
    **options: object,
) -> CropDataset | SyntheticDataset:
    """``--data MANIFEST`` (a ``CropDataset``) or ``--synthetic PHOTOS_DIR`` (a ``SyntheticDataset``); ``options``
    go to that class. Raises DataError."""
    if (manifest is None) == (synthetic is None):
        raise DataError("give either a dataset (--data) or a folder of photographs (--synthetic), not both")
    if manifest is not None:
        return CropDataset(manifest, crop, seed, **options)
    return SyntheticDataset(synthetic, crop, seed, **options)


def collate(samples: list[dict]) -> dict:
    """Samples as one batch: ``image`` B x 3 x C x C, ``mask`` B x 1 x C x C, ``meta`` a list of B dicts."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "mask": torch.stack([s["mask"] for s in samples]),
        "meta": [s["meta"] for s in samples],
    }


class EpochSampler(Sampler):
    """Keys ``(epoch, index)`` for ``dataset``: one rank's share of an epoch, from a resumable position.

    The epoch's order (a permutation drawn from (seed, epoch) when ``dataset.shuffle``, else 0..n-1) is
    extended by wrapping around to a whole number of global batches (``batch_size * world_size``). Global batch
    ``g`` covers order[g * B * W : (g + 1) * B * W]; rank ``r`` yields its ``r``-th block of ``batch_size``.

    Args:
        dataset: a ``CropDataset``/``SyntheticDataset`` (anything with ``len``; ``shuffle`` read when present).
        batch_size: samples per batch on each rank.
        seed: the seed of the shuffle.
        rank, world_size: this process among the data-parallel ones.
        epoch, position: where to start: ``position`` samples of ``epoch`` already consumed by all ranks.

    Raises:
        ValueError: a rank outside the world, or a position that is not a multiple of the global batch.
    """

    def __init__(
        self,
        dataset: Sequence | Dataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        position: int = 0,
        shuffle: bool | None = None,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch {batch_size}, rank {rank} of {world_size}: need batch >= 1 and 0 <= rank < world")
        self.length = len(dataset)
        self.shuffle = getattr(dataset, "shuffle", True) if shuffle is None else shuffle
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.set_epoch(epoch, position)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch_samples(self) -> int:
        """Samples in an epoch across all ranks: the dataset's length rounded up to whole global batches."""
        return -(-self.length // self.global_batch) * self.global_batch

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        if position % self.global_batch or not 0 <= position <= self.epoch_samples:
            raise ValueError(
                f"position {position}: must be a multiple of the global batch {self.global_batch} within the "
                f"epoch's {self.epoch_samples} samples"
            )
        self.epoch, self.position = epoch, position

    def order(self, epoch: int) -> np.ndarray:
        """The dataset indices of ``epoch`` across all ranks, in the order they are consumed."""
        if self.shuffle:
            base = np.random.default_rng([ORDER_STREAM, self.seed, epoch]).permutation(self.length)
        else:
            base = np.arange(self.length)
        return np.resize(base, self.epoch_samples)  # wraps around to whole global batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, epoch = self.order(self.epoch), self.epoch
        for start in range(self.position, len(order), self.global_batch):
            block = order[start + self.rank * self.batch_size : start + (self.rank + 1) * self.batch_size]
            for index in block:
                yield epoch, int(index)

    def __len__(self) -> int:
        return (self.epoch_samples - self.position) // self.world_size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), int(state["position"]))


@dataclass
class Skips:
    """Files left out or skipped, each named once with why; ``times``: how often each was met mid-run."""

    reasons: dict[str, str] = field(default_factory=dict)
    times: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, dataset: CropDataset | SyntheticDataset) -> Skips:
        """The tally a run starts with: what the dataset left out when it was opened."""
        skips = cls()
        for name, why in dataset.problems:
            skips.add(name, why)
        return skips

    def add(self, name: str, why: str) -> None:
        self.reasons.setdefault(name, why)
        self.times[name] += 1

    def update(self, metas: dict | list[dict]) -> None:
        """Count what a sample's (or a batch's) metas met."""
        for meta in [metas] if isinstance(metas, dict) else metas:
            for name, why in meta["skipped"]:
                self.add(name, why)

    @property
    def count(self) -> int:
        return len(self.reasons)

    def lines(self) -> list[str]:
        return [f"{name}: {why}" for name, why in self.reasons.items()]

    def to_dict(self) -> dict:
        return {
            "count": self.count,
            "files": [{"name": n, "why": w, "times": self.times[n]} for n, w in self.reasons.items()],
        }
