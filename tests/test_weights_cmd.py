"""``mantranet weights list|identify|fetch`` as a user runs them, against a local HTTP server."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mantranet_torch
from converter import convert_h5
from mantranet_cli.main import main
from mantranet_torch import RELEASES, ManTraNet
from tests.helpers import SEED_PORT, official_file
from tests.weights_server import CHUNKED_CUT, TRICKLE, TRUNCATE, release_table, serve

RELEASE = 4


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory):
    """Official-layout files: the stand-in for release 4, and another file of the same shapes."""
    folder = tmp_path_factory.mktemp("fixtures")
    official_file(folder / "release.h5", RELEASE, seed=0)
    official_file(folder / "other.h5", RELEASE, seed=1)
    return folder


@pytest.fixture
def site(tmp_path, fixture_files, monkeypatch):
    """A server holding the stand-in as release 4's official URL, a release table that trusts it, a weights folder."""
    body = (fixture_files / "release.h5").read_bytes()
    monkeypatch.setenv("MANTRANET_HOME", str(tmp_path))  # weights go to tmp_path / "weights"
    with serve() as server:
        url = server.add("/pretrained_weights/ManTraNet_Ptrain4.h5", body)
        with release_table(tmp_path, RELEASE, git_blob_sha1(body), url):
            yield server, body


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_fetch_downloads_verifies_converts_and_lists(site, tmp_path, capsys) -> None:
    _, body = site
    weights = tmp_path / "weights"
    code, out, err = run(capsys, "weights", "fetch", "4")
    assert code == 0, err
    assert f"downloaded {weights / 'ManTraNet_Ptrain4.h5'} ({len(body)} bytes): verified, release 4" in out
    assert "converted as release 4 (identified by content hash)" in out
    assert err == ""  # stderr is not a terminal here: no progress bar (tests/test_progress.py draws one)
    assert sorted(p.name for p in weights.iterdir()) == [
        "ManTraNet_Ptrain4.h5",
        "ManTraNet_Ptrain4.safetensors",
        "ManTraNet_Ptrain4.safetensors.json",
    ]
    assert (weights / "ManTraNet_Ptrain4.h5").read_bytes() == body
    model = mantranet_torch.load(weights / "ManTraNet_Ptrain4.safetensors")
    expected = convert_h5(weights / "ManTraNet_Ptrain4.h5").state_dict
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    manifest = json.loads((weights / "ManTraNet_Ptrain4.safetensors.json").read_text())
    assert manifest["source"]["git_blob_sha1"] == git_blob_sha1(body) and manifest["release"]["index"] == 4
    # Again: nothing to do.
    code, out, _ = run(capsys, "weights", "fetch", "4")
    assert code == 0 and "already present, verified" in out and "already converted from this file" in out
    code, out, _ = run(capsys, "weights", "list")
    assert code == 0 and f"weights folder: {weights}" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].isdigit()}
    assert rows["4"] == ["4", "ManTraNet_Ptrain4.h5", "16", "linear", "7,15,31", "verified", "safetensors"]
    assert rows["0"] == ["0", "ManTraNet_Ptrain0.h5", "32", "tanh", "7,15,31,63", "-", "-"]


def test_fetch_refuses_content_that_is_not_the_release(site, fixture_files, tmp_path, capsys) -> None:
    server, _ = site
    mirror = server.add("/mirror/ManTraNet_Ptrain4.h5", (fixture_files / "other.h5").read_bytes())
    out_dir = tmp_path / "elsewhere"
    code, _, err = run(capsys, "weights", "fetch", "4", "--url", mirror, "-o", str(out_dir))
    assert code == 1
    message = err.splitlines()[-1]  # after the progress bar's lines
    assert message.startswith(f"mantranet weights: error: {mirror}: the downloaded file is not the expected one")
    assert "deleted it. Pass --allow-unknown" in message
    assert not out_dir.exists()  # nothing left behind but the message
    code, out, _ = run(capsys, "weights", "fetch", "4", "--url", mirror, "-o", str(out_dir), "--allow-unknown")
    assert code == 0 and "NOT release 4's content" in out and "kept, as --allow-unknown asks" in out
    assert "converted as release 4 (identified by file name)" in out


def test_an_allowed_unknown_download_that_is_not_hdf5_says_so(site, tmp_path, capsys) -> None:
    server, _ = site
    page = b"<html><body>Sign in to download</body></html>"  # what a login wall serves in place of the file
    mirror = server.add("/wall/ManTraNet_Ptrain4.h5", page)
    out_dir = tmp_path / "kept"
    target = out_dir / "ManTraNet_Ptrain4.h5"
    code, _, err = run(capsys, "weights", "fetch", "4", "--url", mirror, "-o", str(out_dir), "--allow-unknown")
    assert code == 1
    assert err.splitlines()[-1] == (
        f"mantranet weights: error: {target}: downloaded and kept (allow_unknown, --allow-unknown), but it is not an "
        f"HDF5 file (it starts with {page[:16]!r}), so not a weight file: check the URL, and delete the file"
    )
    assert target.read_bytes() == page  # kept, as asked, and the message says where
    code, out, _ = run(capsys, "weights", "fetch", "4", "--url", mirror, "-o", str(out_dir), "--allow-unknown",
                       "--no-convert", "--force")  # fmt: skip
    assert code == 0 and f"kept, as --allow-unknown asks; it is not an HDF5 file (it starts with {page[:16]!r})" in out


def test_fetch_failures_are_one_line_messages(site, tmp_path, capsys) -> None:
    server, body = site
    code, _, err = run(capsys, "weights", "fetch", "4", "--url", server.base_url + "/nowhere.h5")
    assert code == 1 and err == f"mantranet weights: error: {server.base_url}/nowhere.h5: HTTP 404 Not Found\n"
    cut = server.add("/cut/ManTraNet_Ptrain4.h5", body, TRUNCATE)
    code, _, err = run(capsys, "weights", "fetch", "4", "--url", cut, "--no-convert")
    assert code == 1 and f"the transfer ended after {len(body) // 2} of {len(body)} bytes" in err
    code, _, err = run(capsys, "weights", "fetch", "9")
    assert code == 1 and "no official release 9" in err
    assert not (tmp_path / "weights" / "ManTraNet_Ptrain4.h5").exists()


def test_fetch_bounds_slow_and_cut_transfers(site, tmp_path, capsys) -> None:
    server, body = site
    slow = server.add("/slow/ManTraNet_Ptrain4.h5", body, TRICKLE, delay=0.1)
    code, _, err = run(capsys, "weights", "fetch", "4", "--url", slow, "--timeout", "1", "--no-convert")
    last = err.splitlines()[-1]  # after the progress bar's line
    assert code == 1 and last.startswith("mantranet weights: error: ") and "not done within the 1 s allowed" in last
    cut = server.add("/chunked/ManTraNet_Ptrain4.h5", body, CHUNKED_CUT)
    code, _, err = run(capsys, "weights", "fetch", "4", "--url", cut, "--allow-unknown", "--no-convert")
    assert code == 1 and f"the transfer ended after {len(body) // 2} bytes; run the same command again" in err
    assert not (tmp_path / "weights" / "ManTraNet_Ptrain4.h5").exists()
    assert (tmp_path / "weights" / "ManTraNet_Ptrain4.h5.part").stat().st_size == len(body) // 2
    code, _, err = run(capsys, "weights", "fetch", "4", "--timeout", "nan")
    assert code == 1 and "timeout nan: must be a number of seconds > 0" in err


def test_identify_official_fixture_and_shapes(site, fixture_files, tmp_path, capsys) -> None:
    shutil.copy(fixture_files / "release.h5", tmp_path / "renamed.bin")
    code, out, _ = run(capsys, "weights", "identify", str(tmp_path / "renamed.bin"))
    assert code == 0
    assert "content: official release 4 (ManTraNet_Ptrain4.h5), 16 first-block filters, transform linear" in out
    assert "format: Keras HDF5, weights-only layout, 35 arrays in 10 layers, attributes as bytes" in out
    assert "`mantranet convert` takes it as release 4 (by content hash)" in out
    # A four-window file of unknown content: its shapes fit three releases, its Featex order only two.
    official_file(tmp_path / "mine.h5", 2, seed=3, layout="full-model")
    code, out, _ = run(capsys, "weights", "identify", str(tmp_path / "mine.h5"))
    assert "content: unknown" in out and "full-model layout, 35 arrays" in out
    assert "shapes: fit releases 2, 3, 4" in out
    assert "first layers listed last (as Keras saves a Featex with them frozen), as the official loader reads " in out
    assert "releases 2, 3\n" in out and "needs --variant N" in out


def test_identify_converted_files_and_the_rest(site, fixture_files, tmp_path, capsys) -> None:
    assert main(["convert", str(fixture_files / "release.h5"), "-o", str(tmp_path), "--format", "pt"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "weights", "identify", str(tmp_path / "release.pt"))
    assert code == 0
    assert "format: PyTorch checkpoint of ManTraNet weights of this project, 35 tensors, full model" in out
    source_sha1 = git_blob_sha1((fixture_files / "release.h5").read_bytes())
    assert f"converted from: release.h5 (git blob SHA-1 {source_sha1})" in out
    assert "release: 4 (ManTraNet_Ptrain4.h5), identified by content hash" in out
    (tmp_path / "noise").write_bytes(b"neither hdf5 nor anything else")
    code, out, _ = run(capsys, "weights", "identify", str(tmp_path / "noise"))
    assert code == 0 and "content: unknown" in out and "format: none known here" in out
    code, _, err = run(capsys, "weights", "identify", str(tmp_path / "absent.h5"))
    assert code == 1 and err == f"mantranet weights: error: {tmp_path / 'absent.h5'}: no such file\n"


def test_identify_reports_malformed_metadata_instead_of_failing(tmp_path, capsys) -> None:
    path = tmp_path / "edited.safetensors"
    state = ManTraNet(RELEASES[4]).state_dict()
    save_file(state, path, metadata={"mantranet.config": '{"window_sizes": [7]}', "mantranet.provenance": "[]"})
    code, out, err = run(capsys, "weights", "identify", str(path))
    assert code == 0 and "Traceback" not in err, err
    assert "config: unreadable: " in out and "malformed ManTraNet config" in out
    assert "provenance: malformed (AttributeError" in out
    assert set(load_file(path)) == set(state)


@pytest.mark.skipif(not SEED_PORT.is_file(), reason=f"{SEED_PORT} is absent")
def test_identify_names_the_real_earlier_port_checkpoint_by_content(tmp_path, capsys) -> None:
    shutil.copy(SEED_PORT, tmp_path / "weights.dat")  # the name says nothing
    code, out, _ = run(capsys, "weights", "identify", str(tmp_path / "weights.dat"))
    assert code == 0
    assert "git blob SHA-1 63c2da025914e73971c0e779fa305e01f607cfc0" in out
    assert "content: the earlier PyTorch port's AnomalyDetectorv4.pt (anomaly detector, no prefix)" in out
    assert "a checkpoint of the earlier PyTorch port by its keys (anomaly detector)" in out


def test_list_and_identify_as_json_and_quiet(site, fixture_files, tmp_path, capsys) -> None:
    weights = tmp_path / "weights"
    assert run(capsys, "weights", "fetch", "4")[0] == 0
    code, out, _ = run(capsys, "weights", "list", "--json")
    listing = json.loads(out)
    assert code == 0 and listing["folder"] == str(weights)
    four = next(r for r in listing["official"] if r["index"] == 4)
    assert four["local"] == "verified" and four["converted"] == ["safetensors"]
    assert four["git_blob_sha1"] == git_blob_sha1((fixture_files / "release.h5").read_bytes())
    assert four["config"] == RELEASES[4].to_dict()
    assert [c["file"] for c in listing["earlier_pytorch_port"]] == [
        "MantraNetv4.pt",
        "IMTFEv4.pt",
        "AnomalyDetectorv4.pt",
    ]
    assert run(capsys, "weights", "list", "--quiet")[1] == f"{weights}\n"

    h5 = weights / "ManTraNet_Ptrain4.h5"
    code, out, _ = run(capsys, "weights", "identify", str(h5), "--json")
    record = json.loads(out)
    assert code == 0 and record["content"] == "official release" and record["release"] == 4
    assert record["format"] == "HDF5" and record["size"] == h5.stat().st_size
    assert record["sha256"] == hashlib.sha256(h5.read_bytes()).hexdigest()
    assert record["details"]["converts_as"] == {"release": 4, "by": "content hash"}
    assert record["details"]["layout"] == "weights-only" and record["details"]["arrays"] == 35
    assert run(capsys, "weights", "identify", str(h5), "--quiet")[1] == f"{h5}: official release 4, HDF5 (Keras)\n"
    converted = weights / "ManTraNet_Ptrain4.safetensors"
    record = json.loads(run(capsys, "weights", "identify", str(converted), "--json")[1])
    assert record["content"] == "unknown" and record["details"]["kind"] == "ours"
    assert record["details"]["config"] == RELEASES[4].to_dict()
    assert record["details"]["provenance"]["source"]["git_blob_sha1"] == record_sha1(h5)
    assert run(capsys, "weights", "identify", str(converted), "--quiet")[1] == (
        f"{converted}: unknown content, safetensors (ours)\n"
    )


def record_sha1(path) -> str:
    return git_blob_sha1(path.read_bytes())
