"""``pretrained()``, ``fetch()`` and ``hubconf.py``: the whole path against an HTTP server on 127.0.0.1, with a
release table in which a fixture file counts as release 4's official file."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

import mantranet_torch
from converter import PretrainedError, fetch, pretrained
from converter.releases import file_digests
from tests.helpers import converted_model, official_file
from tests.weights_server import release_table, serve

RELEASE = 4
REPO = Path(__file__).resolve().parents[1]
ROUTE = "/pretrained_weights/ManTraNet_Ptrain4.h5"


@pytest.fixture(scope="module")
def fixture_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fixture") / "ManTraNet_Ptrain4.h5"
    official_file(path, RELEASE, seed=5)
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MANTRANET_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "weights"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{ROUTE}"  # nothing listens there any more: connection refused


def test_pretrained_downloads_verifies_converts_caches_then_loads_offline(fixture_file, home, tmp_path) -> None:
    body = fixture_file.read_bytes()
    expected = converted_model(fixture_file)
    with serve() as server:
        url = server.add(ROUTE, body)
        with release_table(tmp_path, RELEASE, file_digests(fixture_file).git_blob_sha1, url):
            model = pretrained(RELEASE)
            assert not model.training and same_weights(model, expected)
            assert sorted(p.name for p in home.iterdir()) == [
                "ManTraNet_Ptrain4.h5", "ManTraNet_Ptrain4.safetensors", "ManTraNet_Ptrain4.safetensors.json"
            ]  # fmt: skip
            assert [path for path, _ in server.requests] == [ROUTE]
    with release_table(tmp_path, RELEASE, file_digests(fixture_file).git_blob_sha1, closed_port_url()):
        again = pretrained(RELEASE)  # offline now: from the cache
        assert same_weights(again, expected)
        # a damaged conversion is noticed by its manifest's SHA-256 and redone from the cached official file
        converted = home / "ManTraNet_Ptrain4.safetensors"
        converted.write_bytes(converted.read_bytes()[:-8] + bytes(8))
        assert same_weights(pretrained(RELEASE), expected)


def test_offline_without_a_cache_is_one_clear_error(fixture_file, home, tmp_path) -> None:
    url = closed_port_url()
    sha1 = file_digests(fixture_file).git_blob_sha1
    with release_table(tmp_path, RELEASE, sha1, url), pytest.raises(PretrainedError) as error:
        pretrained(RELEASE)
    message = str(error.value)
    assert "\n" not in message and url in message and "connection refused" in message
    assert f"put it at {home / 'ManTraNet_Ptrain4.h5'}" in message
    # putting the official file there by hand is all it takes
    home.mkdir(parents=True, exist_ok=True)
    (home / "ManTraNet_Ptrain4.h5").write_bytes(fixture_file.read_bytes())
    with release_table(tmp_path, RELEASE, file_digests(fixture_file).git_blob_sha1, url):
        assert same_weights(pretrained(RELEASE), converted_model(fixture_file))


def test_wrong_content_is_refused_and_nothing_is_cached(fixture_file, home, tmp_path) -> None:
    other = tmp_path / "other.h5"
    official_file(other, RELEASE, seed=6)
    with serve() as server:
        url = server.add(ROUTE, other.read_bytes())
        sha1 = file_digests(fixture_file).git_blob_sha1
        with release_table(tmp_path, RELEASE, sha1, url), pytest.raises(PretrainedError, match="not the expected"):
            pretrained(RELEASE)
    assert not home.exists() or not any(home.iterdir())


def test_fetch_returns_the_paths_it_left(fixture_file, home, tmp_path) -> None:
    with serve() as server:
        url = server.add(ROUTE, fixture_file.read_bytes())
        with release_table(tmp_path, RELEASE, file_digests(fixture_file).git_blob_sha1, url):
            first = fetch(RELEASE)
            second = fetch(RELEASE)
    assert first.h5 == home / "ManTraNet_Ptrain4.h5" and first.weights == home / "ManTraNet_Ptrain4.safetensors"
    assert first.manifest == home / "ManTraNet_Ptrain4.safetensors.json"
    assert first.downloaded and first.verified and first.converted
    assert not second.downloaded and not second.converted and second.weights == first.weights
    assert first.git_blob_sha1 == file_digests(fixture_file).git_blob_sha1


def test_hubconf_gives_an_untrained_or_a_trained_model(fixture_file, home, tmp_path) -> None:
    untrained = torch.hub.load(str(REPO), "mantranet", source="local", release=0, pretrained=False)
    assert untrained.config == mantranet_torch.RELEASES[0] and not untrained.training
    assert not home.exists()  # nothing downloaded for an untrained model
    with serve() as server:
        url = server.add(ROUTE, fixture_file.read_bytes())
        with release_table(tmp_path, RELEASE, file_digests(fixture_file).git_blob_sha1, url):
            trained = torch.hub.load(str(REPO), "mantranet", source="local", release=RELEASE)
    assert same_weights(trained, converted_model(fixture_file))


def test_the_model_package_points_to_where_pretrained_went() -> None:
    """``mantranet_torch.pretrained`` imported the converter from the ground floor; it is ``converter``'s now."""
    with pytest.raises(AttributeError, match=r"mantranet_torch.pretrained moved to converter.pretrained"):
        mantranet_torch.pretrained  # noqa: B018
    assert not hasattr(mantranet_torch, "pretrained") and "pretrained" not in mantranet_torch.__all__
