"""evaluation without a model: metrics against scikit-learn and float64 NumPy, manifests and every folder
layout on a small fake tree, mask rules, perturbations."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score, matthews_corrcoef, roc_auc_score, roc_curve

from evaluation import LAYOUTS, DatasetError, MaskError, MaskRule, Perturbation, PerturbationError, load_dataset
from evaluation.masks import decode_mask, fit_mask
from evaluation.metrics import (
    Confusion,
    ScoreDistribution,
    image_level,
    merge_distributions,
    pixel_scores,
)
from evaluation.store import Record

EXACT = 1e-12  # the same counts reach both sides; only float64 rounding of a few divisions differs


def _maps(seed: int, shape=(23, 31)):
    rng = np.random.default_rng(seed)
    likelihood = rng.random(shape, dtype=np.float32)
    likelihood[rng.random(shape) < 0.2] = 0.5  # ties, and values exactly at the threshold
    mask = rng.random(shape) < 0.3
    likelihood[mask] = np.clip(likelihood[mask] + 0.2, 0, 1)  # a map with some signal
    return likelihood, mask


def _auc_float64(scores: np.ndarray, truth: np.ndarray) -> float:
    """Mann-Whitney: P(forged score > authentic score) + P(tie) / 2, over all pairs, in float64."""
    pos, neg = scores[truth].astype(np.float64), scores[~truth].astype(np.float64)
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (pos.size * neg.size)


def _best_f1_float64(scores: np.ndarray, truth: np.ndarray) -> float:
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & truth)
        best = max(best, 2 * tp / (predicted.sum() + truth.sum()))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_pixel_scores_match_sklearn_and_float64(seed):
    likelihood, mask = _maps(seed)
    s = pixel_scores(likelihood, mask)
    truth, predicted = mask.ravel(), likelihood.ravel() > 0.5
    assert s.auc == pytest.approx(roc_auc_score(truth, likelihood.ravel()), abs=EXACT)
    assert s.auc == pytest.approx(_auc_float64(likelihood.ravel(), truth), abs=EXACT)
    assert s.f1_fixed == pytest.approx(f1_score(truth, predicted), abs=EXACT)
    assert s.iou_fixed == pytest.approx(jaccard_score(truth, predicted), abs=EXACT)
    assert s.mcc_fixed == pytest.approx(matthews_corrcoef(truth, predicted), abs=EXACT)
    assert s.f1_best == pytest.approx(_best_f1_float64(likelihood.ravel(), truth), abs=EXACT)
    assert s.f1_best >= s.f1_fixed


def test_one_class_masks():
    likelihood, _ = _maps(7)
    empty = pixel_scores(likelihood, np.zeros(likelihood.shape, bool))
    full = pixel_scores(likelihood, np.ones(likelihood.shape, bool))
    assert empty.auc is None and full.auc is None
    predicted = likelihood.ravel() > 0.5
    for s, truth in ((empty, np.zeros(predicted.size, bool)), (full, np.ones(predicted.size, bool))):
        assert s.f1_fixed == pytest.approx(f1_score(truth, predicted, zero_division=0.0), abs=EXACT)
        assert s.mcc_fixed == pytest.approx(matthews_corrcoef(truth, predicted), abs=EXACT)
    assert full.f1_best == 1.0 and empty.f1_best == 0.0


def _shared_value_maps() -> list[tuple[np.ndarray, np.ndarray]]:
    """Maps whose values repeat within and across images (ties across images), two of them one class only."""
    rng = np.random.default_rng(11)
    palette = rng.random(40, dtype=np.float32)  # every map draws from these 40 values (and 0.5)
    maps = []
    for i, (shape, forged_share) in enumerate([((17, 20), 0.3), ((9, 30), 0.0), ((21, 19), 0.5), ((8, 8), 1.0)]):
        likelihood = palette[rng.integers(0, 40 if i % 2 else 25, shape)]  # some values in only some images
        likelihood[rng.random(shape) < 0.1] = 0.5
        mask = rng.random(shape) < forged_share
        likelihood[mask] = palette[np.minimum(rng.integers(0, 40, int(mask.sum())) + 5, 39)]  # a little signal
        maps.append((likelihood, mask))
    maps += [_maps(s, shape=(13 + s, 20)) for s in range(2)]  # and continuous values with their own ties
    return maps


def same(a: ScoreDistribution, b: ScoreDistribution) -> bool:
    pairs = ((a.values, b.values), (a.forged, b.forged), (a.authentic, b.authentic))
    return all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in pairs)


def test_pooled_auc_of_merged_distributions_equals_sklearn_on_all_pixels():
    maps = _shared_value_maps()
    truth = np.concatenate([k.ravel() for _, k in maps])
    raw = np.concatenate([m.ravel() for m, _ in maps])
    distributions = [ScoreDistribution.of(m, k) for m, k in maps]
    assert distributions[1].auc() is None and distributions[3].auc() is None  # one class only
    for d in distributions:  # through the store's compact form and back, unchanged
        back = ScoreDistribution.from_arrays(Record.decode(Record({}, d.to_arrays()).encode()).arrays)
        assert same(d, back)
    pooled = merge_distributions(iter(distributions))  # streamed: the merge never sees all pixels at once
    assert len(pooled) < sum(len(d) for d in distributions) - 100  # many values tie across images
    assert pooled.forged.sum() == truth.sum() and pooled.authentic.sum() == (~truth).sum()
    assert np.array_equal(pooled.values, np.unique(raw))
    # the same integer counts reach both sides: only float64 rounding of sums and a division differs
    assert pooled.auc() == pytest.approx(roc_auc_score(truth, raw), abs=EXACT)
    assert pooled.auc() == pytest.approx(_auc_float64(raw, truth), abs=EXACT)
    # any order of images gives the same distribution
    reordered = merge_distributions(distributions[::-1])
    assert same(pooled, reordered)
    # the ROC curve's vertices are scikit-learn's (every threshold kept)
    fpr, tpr, _ = pooled.roc()
    sk_fpr, sk_tpr, _ = roc_curve(truth, raw, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=0, atol=EXACT)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=0, atol=EXACT)
    confusion = sum((Confusion.of(m.ravel(), k.ravel()) for m, k in maps), Confusion(0, 0, 0, 0))
    assert confusion.f1() == pytest.approx(f1_score(truth, raw > 0.5), abs=EXACT)


def test_stored_distribution_keeps_every_float32_bit_pattern():
    special = [-np.inf, -3.4e38, -1.0, -1e-45, 0.0, 1e-45, 1e-38, 0.5, np.nextafter(np.float32(0.5), 1), 1.0, np.inf]
    likelihood = np.array(special, np.float32).reshape(1, -1)
    d = ScoreDistribution.of(likelihood, np.arange(likelihood.size).reshape(1, -1) % 2 == 0)
    back = ScoreDistribution.from_arrays(d.to_arrays())
    assert same(d, back) and np.array_equal(back.values.view(np.uint32), likelihood.ravel().view(np.uint32))


def test_pooled_auc_of_one_class_only_and_of_nothing():
    forged_only = [_shared_value_maps()[3]]
    assert merge_distributions(ScoreDistribution.of(m, k) for m, k in forged_only).auc() is None
    assert merge_distributions([]).auc() is None and len(merge_distributions([])) == 0


def test_image_level():
    labels = [1, 1, 0, 0, 1, 0]
    scores = [0.9, 0.4, 0.45, 0.1, 0.7, 0.8]
    got = image_level(labels, scores)
    assert got["image_auc"] == pytest.approx(_auc_float64(np.array(scores), np.array(labels, bool)), abs=EXACT)
    tpr = np.mean([s > 0.5 for s, y in zip(scores, labels, strict=True) if y])
    tnr = np.mean([s <= 0.5 for s, y in zip(scores, labels, strict=True) if not y])
    assert got["image_balanced_accuracy"] == pytest.approx((tpr + tnr) / 2, abs=EXACT)
    assert image_level([1, 1], [0.2, 0.9]) == {"image_auc": None, "image_balanced_accuracy": None}


# ---------------------------------------------------------------- masks


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_mask_rules(tmp_path):
    grey = np.array([[0, 127, 128, 255]], np.uint8)
    data = _png(tmp_path / "m.png", grey).read_bytes()
    assert decode_mask(data, "m", MaskRule()).tolist() == [[False, False, True, True]]
    assert decode_mask(data, "m", MaskRule(inverted=True)).tolist() == [[True, True, False, False]]
    data = _png(tmp_path / "01.png", np.array([[0, 1, 1, 0]], np.uint8)).read_bytes()  # 0/1, not 0/255
    assert decode_mask(data, "01", MaskRule()).tolist() == [[False, True, True, False]]
    assert decode_mask(data, "01", MaskRule(inverted=True)).tolist() == [[True, False, False, True]]
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [255, 255, 255]]], np.uint8)  # Columbia: green marks the splice
    data = _png(tmp_path / "c.png", rgb).read_bytes()
    assert decode_mask(data, "c", MaskRule(channel="green")).tolist() == [[False, True, True]]
    with pytest.raises(MaskError, match=r"^broken.png: the mask is not an image of a format this tool reads \(PNG, "):
        decode_mask(b"not an image", "broken.png", MaskRule())
    wide = tmp_path / "wide.tif"  # wider masks by the images' rule: 0/1 floats and int32 0/255 are masks too
    Image.fromarray(np.array([[0.0, 1.0, 0.4, 0.6]], np.float32)).save(wide)
    assert decode_mask(wide.read_bytes(), "w", MaskRule()).tolist() == [[False, True, False, True]]
    Image.fromarray(np.array([[0, 255, 127, 128]], np.int32)).save(wide)
    assert decode_mask(wide.read_bytes(), "w", MaskRule()).tolist() == [[False, True, False, True]]
    Image.fromarray(np.array([[0, -1]], np.int32)).save(wide)
    with pytest.raises(MaskError, match="^w: 32-bit integer samples go down to -1"):
        decode_mask(wide.read_bytes(), "w", MaskRule())
    with pytest.raises(MaskError, match=r"m.png: the mask is 4 x 1 but its image is 8 x 2"):
        fit_mask(np.zeros((1, 4), bool), 2, 8, False, "m.png")
    assert fit_mask(np.array([[True, False]]), 2, 4, True, "m").tolist() == [[True] * 2 + [False] * 2] * 2


# ---------------------------------------------------------------- manifests and layouts


def test_csv_and_jsonl_manifests(tmp_path):
    (tmp_path / "a.png").touch()
    (tmp_path / "csv.csv").write_text("image,mask,label\na.png,m.png,\nb.png,,\nc.png,,1\nd.png,,7\n")
    rows = [{"image": "a.png", "mask": "m.png"}, {"image": "b.png", "mask": ""}, {"image": "c.png", "label": 1},
            {"image": "d.png", "label": 7}]  # fmt: skip
    (tmp_path / "j.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("csv.csv", "j.jsonl"):
        ds = load_dataset(tmp_path / name)
        assert [(e.name, e.mask, e.label) for e in ds.entries] == [
            ("a.png", tmp_path / "m.png", 1),
            ("b.png", None, 0),
            ("c.png", None, 1),
        ]
        assert len(ds.problems) == 1 and "d.png" in ds.problems[0][0] and "label '7'" in ds.problems[0][1]
    (tmp_path / "bad.csv").write_text("img,gt\n")
    with pytest.raises(DatasetError, match="header must be image,mask"):
        load_dataset(tmp_path / "bad.csv")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match="line 1: not JSON"):
        load_dataset(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifests_that_list_an_image_twice_or_are_not_utf8(tmp_path, suffix):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.png").touch()
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")  # another name for the same file
    rows = ["a.png", "sub/../b.png"]
    manifest = tmp_path / f"twice{suffix}"
    if suffix == ".csv":
        manifest.write_text("image,mask\n" + "".join(f"{r},\n" for r in rows))
    else:
        manifest.write_text("".join(json.dumps({"image": r}) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=rf"^{manifest}: lines \d and \d list the same image \(sub/../b.png\)"):
        load_dataset(manifest)
    csv_text, jsonl_text = "image,mask\na.png,\nR\u00e9sum\u00e9.png,\n", '{"image": "a.png"}\n{"image": "\u00e9"}\n'
    latin1 = csv_text if suffix == ".csv" else jsonl_text
    manifest.write_bytes(latin1.encode("latin-1"))  # a name in Latin-1: byte 0xe9 where UTF-8 wants a sequence
    line = 3 if suffix == ".csv" else 2
    with pytest.raises(DatasetError, match=rf"^{manifest}, line {line} \(byte 0xe9\): not UTF-8 text; a manifest is "):
        load_dataset(manifest)


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()


FAKE_TREES = {  # layout -> (files, expected (name, mask relative path or None, label))
    "casia": (
        ["Tp/Tp_D_1.jpg", "Tp/Sp/Sp_S_2.tif", "Au/Au_1.jpg", "Gt/Tp_D_1_gt.png", "Gt/Sp/Sp_S_2_gt.png"],
        [("Tp/Sp/Sp_S_2.tif", "Gt/Sp/Sp_S_2_gt.png", 1), ("Tp/Tp_D_1.jpg", "Gt/Tp_D_1_gt.png", 1),
         ("Au/Au_1.jpg", None, 0)],
    ),
    "columbia": (
        ["4cam_splc/a_b_sub_01.tif", "4cam_splc/edgemask/a_b_sub_01_edgemask.jpg", "4cam_auth/a_sub_01.tif",
         "README.txt"],
        [("4cam_splc/a_b_sub_01.tif", "4cam_splc/edgemask/a_b_sub_01_edgemask.jpg", 1),
         ("4cam_auth/a_sub_01.tif", None, 0)],
    ),
    "coverage": (
        ["image/1.tif", "image/1t.tif", "mask/1forged.tif", "mask/1copy.tif", "mask/1paste.tif"],
        [("image/1.tif", None, 0), ("image/1t.tif", "mask/1forged.tif", 1)],
    ),
    "dso1": (
        ["DSO-1/normal-01.png", "DSO-1/splicing-01.png", "DSO-1-Fake-Images-Masks/splicing-01.png"],
        [("DSO-1/normal-01.png", None, 0), ("DSO-1/splicing-01.png", "DSO-1-Fake-Images-Masks/splicing-01.png", 1)],
    ),
    "cocoglide": (
        ["fake/glide_1.png", "mask/glide_1.png", "real/coco_1.jpg"],
        [("fake/glide_1.png", "mask/glide_1.png", 1), ("real/coco_1.jpg", None, 0)],
    ),
    "imd2020": (
        ["1a0b_x/1a0b_orig.jpg", "1a0b_x/1a0b_0.jpg", "1a0b_x/1a0b_0_mask.png"],
        [("1a0b_x/1a0b_0.jpg", "1a0b_x/1a0b_0_mask.png", 1), ("1a0b_x/1a0b_orig.jpg", None, 0)],
    ),
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(FAKE_TREES))
def test_folder_layouts(tmp_path, layout):
    files, expected = FAKE_TREES[layout]
    _touch(tmp_path, *files)
    for chosen in (layout, None):  # named, and recognised (IMD2020 has no fixed sub-folders: named only)
        if chosen is None and not LAYOUTS[layout].signature:
            continue
        ds = load_dataset(tmp_path, chosen)
        assert ds.layout == layout and ds.mask_rule == LAYOUTS[layout].mask_rule
        got = [(e.name, e.mask.relative_to(tmp_path).as_posix() if e.mask else None, e.label) for e in ds.entries]
        assert got == expected


def test_nist16_layout(tmp_path):
    table = tmp_path / "reference/manipulation/NC2016-manipulation-ref.csv"
    table.parent.mkdir(parents=True)
    table.write_text(
        "TaskID|ProbeFileID|ProbeFileName|ProbeMaskFileName|DonorFileName|IsTarget\n"
        "manipulation|a|probe/a.jpg|reference/manipulation/mask/a.png||Y\n"
        "manipulation|b|probe/b.jpg|||N\n"
    )
    (tmp_path / "probe").mkdir()
    ds = load_dataset(tmp_path)
    assert ds.layout == "nist16" and ds.mask_rule.inverted  # NIST draws the manipulated region black
    assert [(e.name, e.mask, e.label) for e in ds.entries] == [
        ("probe/a.jpg", tmp_path / "reference/manipulation/mask/a.png", 1),
        ("probe/b.jpg", None, 0),
    ]


def test_unknown_folder(tmp_path):
    with pytest.raises(DatasetError, match="not a layout this tool knows"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="--layout nope: unknown layout"):
        load_dataset(tmp_path, "nope")


# ---------------------------------------------------------------- perturbations


def test_perturbations_are_deterministic_and_move_masks():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[10:20, 30:50] = True
    content = "ab" * 32
    for spec in ("jpeg:50", "blur:1.5", "noise:15", "resize:0.5+jpeg:70"):
        p = Perturbation.parse(spec)
        a, ma = p.apply(pixels, mask, 0, content)
        b, mb = p.apply(pixels, mask, 0, content)
        assert np.array_equal(a, b) and np.array_equal(ma, mb) and a.dtype == np.uint8
        assert not np.array_equal(a[: pixels.shape[0], : pixels.shape[1]], pixels[: a.shape[0], : a.shape[1]])
    small, small_mask = Perturbation.parse("resize:0.5").apply(pixels, mask, 0, content)
    assert small.shape == (20, 30, 3) and small_mask.shape == (20, 30)
    assert small_mask.sum() == 50 and small_mask[5:10, 15:25].all()  # the region moved with the geometry
    noise = Perturbation.parse("noise:15")
    assert not np.array_equal(noise.apply(pixels, mask, 0, content)[0], noise.apply(pixels, mask, 1, content)[0])
    residual = noise.apply(pixels, mask, 0, content)[0].astype(float) - pixels
    assert 13 < residual[(pixels > 60) & (pixels < 190)].std() < 17  # sigma 15 in 8-bit levels
    for bad in ("jpeg:0", "jpeg:50.5", "resize:-1", "sharpen:1", "blur"):
        with pytest.raises(PerturbationError):
            Perturbation.parse(bad)


def test_ray_requests_the_cluster_cannot_place_are_errors_not_waits():
    from evaluation.engines import EngineError, _ray_shape

    assert _ray_shape([1, 1], 1, None) == (1, 2)
    assert _ray_shape([16, 8], None, None) == (4, 6)  # 4 threads per actor by default
    assert _ray_shape([2, 2], None, 1) == (2, 1)  # capped by the largest node
    with pytest.raises(EngineError, match="--workers 3 with --threads 1: .* at most 2"):
        _ray_shape([1, 1], 1, 3)
    with pytest.raises(EngineError, match="--threads 4: the largest Ray node has 2 CPUs"):
        _ray_shape([2, 2], 4, None)


def test_resize_to_a_long_side_keeps_the_aspect_and_moves_the_mask():
    from evaluation.perturb import resize_long_side

    pixels = np.zeros((60, 120, 3), np.uint8)
    mask = np.zeros((60, 120), bool)
    mask[:, 60:] = True
    small, small_mask = resize_long_side(pixels, mask, 40)
    assert small.shape == (20, 40, 3) and small_mask.shape == (20, 40)
    assert small_mask[:, 20:].all() and not small_mask[:, :20].any()


def test_store_refuses_records_of_another_format(tmp_path, monkeypatch):
    from evaluation import store as store_module
    from evaluation.store import ResultStore, record_key

    store = ResultStore(tmp_path)
    key = record_key(image="a")
    store.put(key, Record({"pixel": None}, {"preview_map": np.zeros((2, 2), np.uint8)}))
    assert store.get(key).fields == {"pixel": None}
    path = store.path(key)
    old = io.BytesIO()  # format 1: 16-bit level histograms, no format entry in the file
    np.savez_compressed(old, __record__=np.array(json.dumps({"pixel": None})), forged_levels=np.zeros(1, np.uint16))
    path.write_bytes(old.getvalue())
    assert store.get(key) is None  # computed again, never mixed in
    with pytest.raises(ValueError, match="store format 1; this version reads format 2"):
        Record.decode(old.getvalue())
    monkeypatch.setattr(store_module, "STORE_FORMAT", 1)
    assert record_key(image="a") != key  # the format is part of every key: old records are not even looked up
