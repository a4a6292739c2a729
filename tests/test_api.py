"""The Python API under the commands: one loader for every weight file, predict's memory budget, folder
detection as a generator, the user cache folder, the packaged release table and the memory probe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

import mantranet_torch.model
from converter import ConversionError, load_weights, output_paths, save_conversion
from converter import convert_h5 as convert
from converter.cache import HOME_ENV, cache_dir, weights_dir
from converter.releases import official_releases, release_table_file
from mantranet_torch import RELEASES, WeightFileError, memory
from mantranet_torch.detection import detect
from mantranet_torch.weights import HDF5, PYTORCH, SAFETENSORS, sniff
from parity_tests.earlier_port import write_port_files
from tests.helpers import converted_model, official_file

pytestmark = pytest.mark.usefixtures("one_thread")

RELEASE = 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One model's weights in every format the loader reads, with the model they hold."""
    folder = tmp_path_factory.mktemp("weights")
    h5 = folder / "ManTraNet_Ptrain4.h5"
    official_file(h5, RELEASE, seed=3)
    conversion = convert(h5)
    out = {"h5": h5}
    for fmt in ("safetensors", "pt"):
        target, manifest = output_paths(h5, folder, fmt)
        save_conversion(conversion, target, manifest)
        out[fmt] = target
    renamed = folder / "weights.bin"  # a name that says nothing: read by content
    shutil.copy(out["safetensors"], renamed)
    out["bin"] = renamed
    out.update(write_port_files(folder, conversion.state_dict))
    return out


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def test_every_weight_file_loads_to_the_same_model(files) -> None:
    expected = state(converted_model(files["h5"]))  # the converter's own path, independent of load_weights
    for name in ("h5", "safetensors", "pt", "bin"):
        model = load_weights(files[name])
        assert not model.training and model.config == RELEASES[RELEASE], name
        got = state(model)
        assert got.keys() == expected.keys(), name
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"{name}: {key}"


def test_the_earlier_ports_checkpoints_load_whole_or_as_a_pair(files) -> None:
    expected = state(converted_model(files["h5"]))
    for paths in (files["MantraNetv4.pt"], [files["IMTFEv4.pt"], files["AnomalyDetectorv4.pt"]]):
        with pytest.warns(UserWarning, match="bnorm"):
            got = state(load_weights(paths))
        # the import sets bnorm as the port normalises (see converter/legacy.py); every other tensor is the same
        for key, value in expected.items():
            if not key.startswith("detector.bnorm."):
                assert torch.equal(got[key], value), key
    with pytest.raises(WeightFileError, match="hold only the earlier port's detector"):
        load_weights(files["AnomalyDetectorv4.pt"], quiet=True)


def test_formats_are_told_by_content(files, tmp_path) -> None:
    assert [sniff(files[n]) for n in ("h5", "safetensors", "pt", "bin")] == [HDF5, SAFETENSORS, PYTORCH, SAFETENSORS]
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not weights at all")
    assert sniff(junk) is None
    with pytest.raises(WeightFileError, match="junk.h5: not a weight file this project reads: by its first bytes"):
        load_weights(junk)
    with pytest.raises(WeightFileError, match="absent.pt: no such file"):
        load_weights(tmp_path / "absent.pt")
    with pytest.raises(ConversionError, match="variant 7: no such release"):
        load_weights(files["h5"], variant=7)


def test_predict_with_a_memory_budget_uses_the_largest_tile_that_fits(files, monkeypatch) -> None:
    model, side = load_weights(files["safetensors"]), 160
    budget = memory.tiled_bytes(model, side, side, 64) + 1  # below the whole image's modelled peak
    tiles = []  # the tiled computation itself is checked in tests/test_tiling.py; here only the choice
    monkeypatch.setattr(mantranet_torch.model, "predict_tiled", lambda m, x, tile, *a: tiles.append(tile) or x)
    model.predict(np.zeros((side, side, 3), np.uint8), max_memory=budget / memory.GB)
    assert memory.full_image_bytes(model, side, side) > budget
    assert tiles == [memory.tile_for_budget(model, side, side, budget)] and 64 <= tiles[0] < side
    assert (
        memory.tiled_bytes(model, side, side, tiles[0]) <= budget < memory.tiled_bytes(model, side, side, tiles[0] + 1)
    )
    image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    assert model.predict(image, max_memory=64.0).shape == (40, 40) and len(tiles) == 1  # fits: no tiles
    with pytest.raises(ValueError, match="tile or max_memory, not both"):
        model.predict(image, tile=48, max_memory=1.0)
    with pytest.raises(ValueError, match="needs at least"):
        model.predict(image, max_memory=1e-6)


def test_folder_detection_yields_one_result_per_image(files, tmp_path) -> None:
    model = load_weights(files["safetensors"])
    rng = np.random.default_rng(1)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    a = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (36, 32, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "in" / "a.png")
    Image.fromarray(b).convert("L").save(tmp_path / "in" / "sub" / "b.png")
    (tmp_path / "in" / "sub" / "c.png").write_bytes(b"not a png")
    results = detect(model, [tmp_path / "in"], tile=32)
    assert not isinstance(results, list)  # a generator: each image is computed when asked for
    first = next(results)
    assert first.relative == Path("a.png") and first.ok and first.size == (48, 40) and first.tiles == 4
    np.testing.assert_allclose(first.likelihood, model.predict(a), rtol=0, atol=1e-5)
    second, third = list(results)
    grey = np.repeat(np.asarray(Image.fromarray(b).convert("L"))[..., None], 3, axis=2)
    assert second.relative == Path("sub/b.png") and "greyscale (L) expanded to RGB" in second.notes
    np.testing.assert_array_equal(second.pixels, grey)
    assert not third.ok and third.likelihood is None and "c.png: cannot decode" in third.error


def test_the_cache_folder_is_per_user_and_moves_with_mantranet_home(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(HOME_ENV, raising=False)
    default = cache_dir()
    assert default.is_absolute() and "mantranet-torch" in default.parts[-2:] and not default.is_relative_to(REPO)
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" and weights_dir() == tmp_path / "home" / "weights"


def test_the_release_table_is_the_repositorys_file() -> None:
    # run from the repository, the table is weights/releases.json itself; the wheel's copy is checked by .ci/smoke
    assert Path(str(release_table_file())) == REPO / "weights" / "releases.json"
    table = json.loads((REPO / "weights" / "releases.json").read_text())
    assert [r.git_blob_sha1 for r in official_releases()] == [r["git_blob_sha1"] for r in table["official"]]


def test_available_memory_is_the_hosts_within_a_cgroup_limit(tmp_path) -> None:
    host = psutil.virtual_memory().available
    assert 0 < memory.available_memory() <= host
    assert memory.available_memory(torch.device("cpu")) <= host
    # a cgroup v2 limit of 3 GiB with 1 GiB used, of which 256 MiB is reclaimable page cache
    (tmp_path / "memory.max").write_text(f"{3 * 2**30}\n")
    (tmp_path / "memory.current").write_text(f"{2**30}\n")
    (tmp_path / "memory.stat").write_text(f"anon 1\ninactive_file {2**28}\nactive_file 5\n")
    assert memory.cgroup_available(tmp_path) == 3 * 2**30 - (2**30 - 2**28)
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.cgroup_available(tmp_path) is None
    # cgroup v1: no limit is a huge number
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("123\n")
    assert memory.cgroup_available(v1) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2**31}\n")
    assert memory.cgroup_available(v1) == 2**31 - 123
