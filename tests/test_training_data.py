"""Training data: synthetic forgeries checked pixel by pixel against the photographs they were cut from (read
here with Pillow alone), the seed contract (same seed, same bytes; any order, any worker), native-resolution
crops and flips against the files' pixels, skips named, the sampler's shards and resume, and ``mantranet synth``.

Photographs: crops of the real samples in ../shared when present (else seeded textures), a few hundred pixels
a side, so that every test takes a fraction of a second.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from evaluation import MaskRule, load_dataset
from evaluation.masks import decode_mask
from mantranet_cli.main import main
from tests.helpers import SAMPLES
from training.data import CropDataset, EpochSampler, Skips, SyntheticDataset, collate, open_training_data
from training.synthetic import (
    ENHANCEMENTS,
    KINDS,
    MASK_FAMILIES,
    DataError,
    Recipe,
    SyntheticForgeries,
    make_forgeries,
    random_mask,
    write_synthetic,
)

SIZE = 48  # the crop side of the synthetic tests: masks of 46..691 pixels, every kind and operation possible
PHOTO_SIZES = ((160, 120), (120, 150), (200, 140), (96, 96))  # width x height, all different: mixed-size runs


def textures(n: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded photographs stand-ins: smooth gradients plus fine noise, so that every operation changes pixels."""
    rng = np.random.default_rng(seed)
    images = []
    for width, height in PHOTO_SIZES[:n]:
        y, x = np.mgrid[0:height, 0:width]
        base = 128 + 60 * np.sin(x[..., None] / rng.uniform(5, 15) + rng.uniform(0, 6, 3)) * np.cos(y[..., None] / 9)
        images.append(np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8))
    return images


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Four photographs of different sizes: crops of the real samples (textures when ../shared is absent)."""
    folder = tmp_path_factory.mktemp("photos")
    sources = sorted(SAMPLES.glob("original/*")) if SAMPLES.is_dir() else []
    arrays = textures(len(PHOTO_SIZES))
    for i, (width, height) in enumerate(PHOTO_SIZES):
        if sources:
            with Image.open(sources[i]) as image:
                arrays[i] = np.array(image.convert("RGB"))[100 : 100 + height, 100 : 100 + width]
        Image.fromarray(arrays[i]).save(folder / f"photo{i}.png")
    return folder


@pytest.fixture(scope="module")
def textured(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("textures")
    for i, pixels in enumerate(textures(3, seed=1)):
        Image.fromarray(pixels).save(folder / f"texture{i}.png")
    return folder


def pixels_of(folder: Path, name: str) -> np.ndarray:
    with Image.open(folder / name) as image:
        return np.array(image.convert("RGB"))


def host_of(folder: Path, meta: dict, size: int = SIZE) -> np.ndarray:
    where = meta.get("host", meta)
    top, left = where["top"], where["left"]
    return pixels_of(folder, where["photo"])[top : top + size, left : left + size]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def needs_cv2() -> None:
    pytest.importorskip("cv2", reason="removal forgeries need OpenCV (the train extra)")


# ---------------------------------------------------------------- the seed contract


def test_same_seed_same_bytes_other_seed_other_bytes(photos, tmp_path):
    needs_cv2()
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_synthetic(photos, tmp_path / name, n=10, size=SIZE, seed=seed)
    a, b, c = (files_of(tmp_path / name) for name in "abc")
    assert len(a) == 10 + 8 + 3  # 10 images, 8 masks (2 of 10 are authentic), manifest, forgeries.jsonl, recipe
    assert a == b
    images = [k for k in a if k.startswith("images/")]
    assert sum(a[k] != c.get(k) for k in images) == len(images)  # every image differs under another seed


def test_a_sample_is_a_function_of_seed_epoch_index(photos):
    needs_cv2()
    first = SyntheticForgeries(photos, SIZE, seed=3)
    forward = [first.sample(i, epoch=2) for i in range(10)]
    second = SyntheticForgeries(photos, SIZE, seed=3)  # a fresh process's view: empty cache, reversed order
    for i in reversed(range(10)):
        again = second.sample(i, epoch=2)
        assert np.array_equal(again.image, forward[i].image) and np.array_equal(again.mask, forward[i].mask)
    other_epoch = first.sample(4, epoch=3)
    assert not np.array_equal(other_epoch.image, forward[4].image)


# ---------------------------------------------------------------- each kind, against the photographs


def samples_of(forgeries: SyntheticForgeries, kind: str, count: int) -> list:
    position = forgeries.recipe.kinds.index(kind)
    return [forgeries.sample(position + k * len(forgeries.recipe.kinds)) for k in range(count)]


def test_copy_move_pastes_a_region_of_the_same_crop(photos):
    forgeries = SyntheticForgeries(photos, SIZE, seed=1, recipe=Recipe(kinds=("copymove",)))
    for f in samples_of(forgeries, "copymove", 12):
        host = host_of(photos, f.meta)
        dy, dx = f.meta["shift"]
        ys, xs = np.nonzero(f.mask)
        assert f.mask.any() and (dy, dx) != (0, 0)
        assert np.array_equal(f.image[~f.mask], host[~f.mask])
        assert np.array_equal(f.image[ys, xs], host[ys - dy, xs - dx])
        assert not f.mask[ys - dy, xs - dx].any()  # the source lies outside the pasted region


def test_splice_pastes_the_same_region_of_another_photograph(photos):
    forgeries = SyntheticForgeries(photos, SIZE, seed=2, recipe=Recipe(kinds=("splice",)))
    for f in samples_of(forgeries, "splice", 12):
        host, donor = host_of(photos, f.meta), host_of(photos, f.meta["donor"])
        assert f.meta["donor"]["photo"] != f.meta["host"]["photo"]
        assert np.array_equal(f.image[~f.mask], host[~f.mask])
        assert np.array_equal(f.image[f.mask], donor[f.mask])


@pytest.mark.parametrize("operation", ENHANCEMENTS)
def test_enhancement_changes_the_masked_pixels_only(textured, operation):
    forgeries = SyntheticForgeries(textured, SIZE, seed=4, recipe=Recipe(kinds=("enhance",), enhancements=(operation,)))
    for f in samples_of(forgeries, "enhance", 4):
        host = host_of(textured, f.meta)
        assert f.meta["operation"] == operation
        assert np.array_equal(f.image[~f.mask], host[~f.mask])
        changed = (f.image != host).any(axis=2)
        # textures of +-20 levels of noise: every operation moves most pixels (measured: >= 0.7 of them)
        assert changed[f.mask].mean() > 0.5, operation
        inside = host[f.mask].astype(np.float64)
        if operation == "gamma":  # the formula in float64, rounded: exact
            expected = np.rint(255 * (inside / 255) ** f.meta["gamma"])
            assert np.array_equal(f.image[f.mask], expected.astype(np.uint8))
        if operation == "contrast":  # about the whole crop's mean
            expected = np.clip(
                np.rint((inside - host.astype(np.float64).mean()) * f.meta["factor"] + host.mean()), 0, 255
            )
            assert np.array_equal(f.image[f.mask], expected.astype(np.uint8))
        if operation == "noise":  # Gaussian of the drawn sigma: the residual's spread (clipping aside) within 25%
            residual = f.image[f.mask].astype(np.float64) - inside
            kept = (f.image[f.mask] > 0) & (f.image[f.mask] < 255)
            assert abs(residual[kept].std() / f.meta["sigma"] - 1) < 0.25


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_removal_inpaints_the_masked_pixels_only(textured, method):
    needs_cv2()
    forgeries = SyntheticForgeries(textured, SIZE, seed=5, recipe=Recipe(kinds=("removal",), inpaint_methods=(method,)))
    for f in samples_of(forgeries, "removal", 4):
        host = host_of(textured, f.meta)
        assert f.meta["method"] == method
        assert np.array_equal(f.image[~f.mask], host[~f.mask])  # OpenCV writes only under the mask
        filled = f.image[f.mask].astype(np.float64)
        assert (f.image != host).any(axis=2)[f.mask].mean() > 0.5
        # a fill from the border: smoother than the noisy texture it replaces (its pixel-to-pixel spread is lower)
        assert (
            np.abs(np.diff(f.image.astype(np.float64), axis=1))[f.mask[:, 1:] & f.mask[:, :-1]].mean()
            < np.abs(np.diff(host.astype(np.float64), axis=1))[f.mask[:, 1:] & f.mask[:, :-1]].mean()
        )
        known = host[~f.mask].reshape(-1, 3).astype(np.float64)
        assert (filled >= known.min(axis=0) - 1).all() and (filled <= known.max(axis=0) + 1).all()


def test_authentic_is_the_photograph_itself(photos):
    forgeries = SyntheticForgeries(photos, SIZE, seed=6)
    for f in samples_of(forgeries, "authentic", 5):
        assert not f.mask.any() and np.array_equal(f.image, host_of(photos, f.meta))


@pytest.mark.parametrize("family", MASK_FAMILIES)
@pytest.mark.parametrize("size", [48, 160])
def test_masks_cover_the_promised_range(family, size):
    rng = np.random.default_rng(7)
    areas = np.array([random_mask(rng, size, family, 0.02, 0.30).mean() for _ in range(60)])
    assert areas.min() >= 0.02 and areas.max() <= 0.30
    assert areas.min() < 0.05 and areas.max() > 0.15  # varied: log-uniform draws reach both ends of the range
    tight = np.array([random_mask(rng, size, family, 0.10, 0.12).mean() for _ in range(10)])
    assert ((tight >= 0.10) & (tight <= 0.12)).all()


def test_kinds_balanced_in_every_batch_and_every_rank(photos):
    needs_cv2()
    data = SyntheticDataset(photos, SIZE, seed=0, length=40)
    for world in (1, 2):
        for rank in range(world):
            sampler = EpochSampler(data, batch_size=5, seed=0, rank=rank, world_size=world)
            loader = DataLoader(data, batch_size=5, sampler=sampler, collate_fn=collate)
            for batch in loader:
                assert Counter(m["kind"] for m in batch["meta"]) == Counter(KINDS)
                assert batch["image"].shape == (5, 3, SIZE, SIZE) and batch["mask"].shape == (5, 1, SIZE, SIZE)
                authentic = [m["kind"] == "authentic" for m in batch["meta"]]
                assert (batch["mask"].flatten(1).amax(1) == 0).tolist() == authentic


# ---------------------------------------------------------------- crops of a dataset


@pytest.fixture
def dataset(photos, tmp_path) -> Path:
    """A manifest over the four photographs; the mask of each is its own red channel > 127 (so that a crop and
    a flip can be checked against the image they came with); one authentic row without a mask."""
    lines = ["image,mask,label"]
    for i in range(3):
        red = pixels_of(photos, f"photo{i}.png")[:, :, 0]
        Image.fromarray(((red > 127) * 255).astype(np.uint8)).save(tmp_path / f"mask{i}.png")
        lines.append(f"{photos / f'photo{i}.png'},mask{i}.png,1")
    lines.append(f"{photos / 'photo3.png'},,0")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.csv"


def unscale(image: torch.Tensor) -> np.ndarray:
    """The model input back to uint8 H x W x 3 (x / 255 * 2 - 1 in float32 is exact to invert by rounding)."""
    return np.rint((image.permute(1, 2, 0).double().numpy() + 1) / 2 * 255).astype(np.uint8)


def test_crops_are_native_pixels_flipped_with_their_masks(dataset, photos):
    data = CropDataset(dataset, crop=64, seed=0)
    names = [e.image.name for e in data.entries]
    flips = Counter()
    for index in range(len(data)):
        for epoch in range(4):
            sample = data[(epoch, index)]
            meta, image, mask = sample["meta"], sample["image"], sample["mask"]
            assert image.dtype == torch.float32 and image.shape == (3, 64, 64)
            assert mask.dtype == torch.float32 and mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0, 1}
            assert float(image.min()) >= -1 and float(image.max()) <= 1
            expected = pixels_of(photos, names[index])[meta["top"] : meta["top"] + 64, meta["left"] : meta["left"] + 64]
            if meta["flip_h"]:
                expected = expected[:, ::-1]
            if meta["flip_v"]:
                expected = expected[::-1]
            assert np.array_equal(unscale(image), expected)
            truth = expected[:, :, 0] > 127 if index < 3 else np.zeros((64, 64), bool)
            assert np.array_equal(mask[0].numpy() == 1, truth)  # the mask followed its image through the flips
            flips[meta["flip_h"], meta["flip_v"]] += 1
    assert len(flips) == 4  # all four flip combinations occurred in these 16 draws


def test_same_key_same_tensors_in_workers_and_fresh_datasets(dataset):
    keys = [(1, i) for i in range(4)] + [(2, 0)]
    one = [CropDataset(dataset, crop=32, seed=9)[k] for k in keys]
    other = CropDataset(dataset, crop=32, seed=9)
    for key, sample in zip(reversed(keys), reversed(one), strict=True):
        assert torch.equal(other[key]["image"], sample["image"]) and torch.equal(other[key]["mask"], sample["mask"])
    sampler = EpochSampler(other, batch_size=2, seed=9, epoch=1)
    loaded = list(DataLoader(other, batch_size=2, sampler=sampler, collate_fn=collate, num_workers=2))
    direct = [collate([other[k] for k in list(sampler)[i : i + 2]]) for i in range(0, 4, 2)]
    for a, b in zip(loaded, direct, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(CropDataset(dataset, crop=32, seed=10)[(1, 0)]["image"], one[0]["image"])


def test_crop_larger_than_every_image_names_the_largest(dataset):
    with pytest.raises(DataError, match=r"crop 150 x 150 is larger than every image .* the largest is 200 x 140"):
        CropDataset(dataset, crop=150)


def test_small_images_are_left_out_and_counted(dataset):
    data = CropDataset(dataset, crop=100)  # the 96 x 96 photograph is smaller
    assert len(data) == 3
    skips = Skips.of(data)
    assert skips.count == 1 and "96 x 96 is smaller than the crop 100 x 100" in skips.lines()[0]


def test_a_corrupt_image_and_a_wrong_size_mask_are_skipped_and_named(dataset, photos, tmp_path):
    broken = tmp_path / "broken.png"
    whole = (photos / "photo0.png").read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    Image.new("L", (50, 40)).save(tmp_path / "small_mask.png")
    again = tmp_path / "photo2_again.png"  # another file: a manifest lists each image once
    again.write_bytes((photos / "photo2.png").read_bytes())
    with dataset.open("a") as f:
        f.write(f"{broken},,0\n{again},small_mask.png,1\n")
    data = CropDataset(dataset, crop=32, seed=0)
    skips = Skips.of(data)  # the wrong size is seen from the headers when the dataset opens
    assert skips.lines() == [
        f"{again}: {tmp_path / 'small_mask.png'}: the mask is 50 x 40 but its image is 200 x 140 "
        "(width x height); resize_masks (--resize-masks) resizes masks by nearest neighbour"
    ]
    assert len(data) == 5
    Image.new("L", (10, 10)).save(tmp_path / "mask1.png")  # a mask replaced by one of another size mid-run
    loader = DataLoader(data, batch_size=5, sampler=EpochSampler(data, 5, seed=0), collate_fn=collate)
    for batch in loader:
        skips.update(batch["meta"])
        assert batch["image"].shape == (5, 3, 32, 32)  # replacements keep every batch whole
        used = {m["name"] for m in batch["meta"]}
        assert str(broken) not in used and str(photos / "photo1.png") not in used
    reasons = dict(skips.reasons)
    assert skips.count == 3
    assert "cannot decode as an image" in reasons[str(broken)]
    assert "the mask is 10 x 10 but its image is 120 x 150" in reasons[str(photos / "photo1.png")]
    assert skips.to_dict()["count"] == 3


# ---------------------------------------------------------------- the sampler


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_shards_cover_the_epoch_and_resume_where_stopped(world):
    data = list(range(23))
    ranks = [EpochSampler(data, batch_size=2, seed=1, rank=r, world_size=world, epoch=4) for r in range(world)]
    shares = [list(s) for s in ranks]
    order = ranks[0].order(4)
    assert len(order) % (2 * world) == 0 and sorted(set(order.tolist())) == data  # wraps to whole global batches
    assert Counter(order.tolist()) == Counter(data + order[: len(order) - 23].tolist())
    interleaved = [key for g in range(len(order) // (2 * world)) for s in shares for key in s[2 * g : 2 * g + 2]]
    assert [i for _, i in interleaved] == order.tolist() and {e for e, _ in interleaved} == {4}
    position = 2 * world * 3  # three global batches consumed: resume
    for r, full in enumerate(shares):
        resumed = EpochSampler(data, batch_size=2, seed=1, rank=r, world_size=world)
        resumed.load_state_dict({"epoch": 4, "position": position})
        assert list(resumed) == full[6:] and len(resumed) == len(full) - 6
    assert ranks[0].order(5).tolist() != order.tolist()  # another epoch, another order
    with pytest.raises(ValueError, match="multiple of the global batch"):
        EpochSampler(data, batch_size=2, world_size=world, position=2 * world + 1)


# ---------------------------------------------------------------- mantranet synth


def synth(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["synth", *map(str, argv)])
    return code, out.getvalue(), err.getvalue()


def test_synth_writes_a_dataset_that_evaluate_reads(photos, tmp_path):
    needs_cv2()
    code, stdout, stderr = synth(photos, "-o", tmp_path / "set", "--n", 7, "--seed", 1, "--size", SIZE)
    assert code == 0, stderr
    assert "7 images of 48 x 48 (2 authentic, 2 copymove, 1 splice, 1 removal, 1 enhance), seed 1" in stdout
    dataset = load_dataset(tmp_path / "set" / "manifest.csv")
    assert dataset.layout == "manifest" and not dataset.problems
    records = [json.loads(line) for line in (tmp_path / "set" / "forgeries.jsonl").read_text().splitlines()]
    for entry, record in zip(dataset.entries, records, strict=True):
        assert entry.forged == (record["kind"] != "authentic")
        with Image.open(entry.image) as image:
            assert image.size == (SIZE, SIZE)
        if entry.forged:
            mask = decode_mask(entry.mask.read_bytes(), str(entry.mask), MaskRule())
            assert mask.mean() == record["area"]
    data = open_training_data(manifest=tmp_path / "set" / "manifest.csv", crop=SIZE, flips=False)
    assert np.array_equal(unscale(data[(0, 3)]["image"]), pixels_of(tmp_path / "set", dataset.entries[3].name))


def test_synth_bad_input_is_one_line(photos, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "taken").mkdir()
    cases = [
        ((tmp_path / "empty", "-o", tmp_path / "o1", "--n", 3), "no images"),
        ((tmp_path / "junk", "-o", tmp_path / "o2", "--n", 3), "no readable photograph"),
        ((photos, "-o", tmp_path / "o3", "--n", 0), "--n 0: must be at least 1"),
        ((photos, "-o", tmp_path / "o4", "--n", 2, "--size", 400), "the largest is 200 x 140"),
        ((photos, "-o", tmp_path / "taken", "--n", 2), "already exists"),
        ((photos, "-o", tmp_path / "o5", "--n", 2, "--kinds", "splice,warp"), "kinds warp: choose from"),
    ]
    for argv, expected in cases:
        code, stdout, stderr = synth(*argv)
        assert code == 1 and stdout == "" and len(stderr.splitlines()) == 1, (argv, stderr)
        assert stderr.startswith("mantranet synth: error: ") and expected in stderr, stderr
    assert not (tmp_path / "o4").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "junk", "taken"]


def test_synth_failing_midway_leaves_nothing(photos, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    whole = (photos / "photo0.png").read_bytes()
    for i in range(2):
        (damaged / f"d{i}.png").write_bytes(whole[: len(whole) // 2])  # sizes read from the headers, pixels do not
    code, stdout, stderr = synth(damaged, "-o", tmp_path / "out", "--n", 3, "--size", SIZE)
    assert code == 1 and stdout == "" and len(stderr.splitlines()) == 1
    assert "photographs in a row could not be decoded" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged"]  # no dataset, no hidden staging folder


def test_synth_image_i_is_sample_i_of_epoch_0(photos, tmp_path):
    needs_cv2()
    write_synthetic(photos, tmp_path / "set", n=6, size=SIZE, seed=8)
    data = SyntheticDataset(photos, SIZE, seed=8)
    rows = load_dataset(tmp_path / "set" / "manifest.csv").entries
    for i, entry in enumerate(rows):
        sample = data[(0, i)]
        assert np.array_equal(unscale(sample["image"]), pixels_of(entry.image.parent, entry.image.name))
        mask = (
            np.zeros((SIZE, SIZE), bool)
            if entry.mask is None
            else pixels_of(entry.mask.parent, entry.mask.name)[..., 0] > 127
        )
        assert np.array_equal(sample["mask"][0].numpy() == 1, mask)


def test_make_forgeries_for_the_evaluation_tests(photos, tmp_path):
    manifest = make_forgeries(
        sorted(photos.glob("*.png")), tmp_path / "d", spliced=2, copy_moved=1, authentic=1, side=40
    )
    dataset = load_dataset(manifest)
    assert [e.name for e in dataset.entries] == [
        "images/spliced_000.png", "images/spliced_001.png", "images/copymove_000.png", "images/authentic_000.png"
    ]  # fmt: skip
    assert [e.label for e in dataset.entries] == [1, 1, 1, 0] and dataset.entries[3].mask is None
    for entry in dataset.entries:
        assert pixels_of(entry.image.parent, entry.image.name).shape == (40, 40, 3)
    again = make_forgeries(sorted(photos.glob("*.png")), tmp_path / "e", spliced=2, copy_moved=1, authentic=1, side=40)
    assert files_of(manifest.parent) == files_of(again.parent)  # seeded: the same files again
