"""``mantranet weights fetch --code``: the official ``modelCore.py`` from its URL (here a server on 127.0.0.1 serving
the shared copy), verified by its git blob SHA-1, kept in the cache, and used by ``parity --reference official``."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from converter import synthetic_keras_weights, write_official_h5
from mantranet_cli.main import main
from mantranet_torch import RELEASES
from parity_tests.official_files import OFFICIAL_CODE, official_code_missing
from tests.weights_server import edited_release_table, serve

pytestmark = pytest.mark.skipif(not OFFICIAL_CODE.is_file(), reason=f"official code not found at {OFFICIAL_CODE}")
OFFICIAL_PATH = "/ISICV/ManTraNet/raw/master/src/modelCore.py"


def code_url(tmp_dir: Path, url: str) -> contextlib.AbstractContextManager[Path]:
    """The release table with the official code's URL pointing at the test server (its hash stays the official)."""
    return edited_release_table(tmp_dir, lambda table: table["official_code"].update(url=url))


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.setenv("MANTRANET_HOME", str(tmp_path / "cache"))
    with serve() as server, code_url(tmp_path, server.add(OFFICIAL_PATH, OFFICIAL_CODE.read_bytes())):
        yield server


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_fetch_code_downloads_verifies_and_keeps(site, tmp_path, capsys) -> None:
    cached = tmp_path / "cache" / "official" / "modelCore.py"
    code, out, err = run(capsys, "weights", "fetch", "--code")
    assert code == 0, err
    assert f"downloaded {cached} ({OFFICIAL_CODE.stat().st_size} bytes): verified, the official code" in out
    assert cached.read_bytes() == OFFICIAL_CODE.read_bytes()
    code, out, _ = run(capsys, "weights", "fetch", "--code")
    assert code == 0 and f"{cached}: already present, verified" in out
    assert [path for path, _ in site.requests] == [OFFICIAL_PATH]  # the second call did not download


def test_fetch_code_refuses_other_content(site, tmp_path, capsys) -> None:
    edited = site.add("/mirror/modelCore.py", OFFICIAL_CODE.read_bytes() + b"\n# edited\n")
    code, _, err = run(capsys, "weights", "fetch", "--code", "--url", edited)
    assert code == 1 and "the downloaded file is not the expected one" in err and "deleted it" in err
    assert not (tmp_path / "cache" / "official" / "modelCore.py").exists()
    for argv, expected in [(["4", "--code"], "either a release N or --code"), ([], "which release?")]:
        code, _, err = run(capsys, "weights", "fetch", *argv)
        assert code == 1 and expected in err, err


@pytest.mark.skipif(official_code_missing() is not None, reason=str(official_code_missing()))
def test_parity_reference_official_uses_the_cached_code(site, tmp_path, capsys) -> None:
    assert run(capsys, "weights", "fetch", "--code")[0] == 0
    h5 = tmp_path / "ManTraNet_Ptrain4.h5"
    write_official_h5(h5, synthetic_keras_weights(RELEASES[4], 0), RELEASES[4])
    image = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(image)
    code, out, err = run(capsys, "parity", str(h5), str(image), "--reference", "official", "--local")
    assert code == 0, out + err
    assert f"the official code {tmp_path / 'cache' / 'official' / 'modelCore.py'}, under tf_keras" in out
