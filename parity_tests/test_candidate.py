"""``mantranet parity --candidate``: other PyTorch implementations compared layer by layer through a layer map.

Two ports written here (``port_candidates.py``), loaded as a user's are, from the official ``.h5`` path: a faithful
one structured unlike ours (channels-last modules, a fused ConvLSTM gate convolution, its own names, [0, 1] NHWC
input) must pass, with the map ``--suggest-map`` proposes; one written the earlier port's way (per-image batch
statistics in bnorm, the Bayar constraint re-applied in forward) must be caught at those layers, on the images
where they show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mantranet_cli.main import main
from mantranet_torch import LAYERS
from parity_tests import ParityInputError, run_parity
from parity_tests.builtin_images import builtin_images
from parity_tests.candidate import LayerMap, from_keras, to_keras
from parity_tests.official_files import WeightStore
from parity_tests.port_candidates import EARLIER_STYLE_MAP, FAITHFUL_MAP

PORTS = Path(__file__).resolve().parent / "port_candidates.py"
FAITHFUL, EARLIER = f"{PORTS}:faithful_port", f"{PORTS}:earlier_style_port"
SIZE = 24


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("candidate-images")
    paths = {}
    for image in builtin_images(SIZE):
        paths[image.name] = folder / f"{image.name}.png"
        Image.fromarray(image.pixels).save(paths[image.name])
    return paths


def run(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    code = main(["parity", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_layouts_round_trip() -> None:
    rng = np.random.default_rng(0)
    keras5 = rng.normal(size=(2, 4, 3, 5, 6))  # N, T, H, W, C
    for layout in ("NTCHW", "NHWTC", "NCTHW", "NTHWC"):
        assert np.array_equal(to_keras(from_keras(keras5, layout, "divStd"), layout, "divStd"), keras5)
    assert from_keras(keras5, "NTCHW", "divStd").shape == (2, 4, 6, 3, 5)
    sigma = rng.normal(size=(2, 1, 1, 6))
    assert from_keras(sigma, "NC", "glbStd").shape == (2, 6)
    assert np.array_equal(to_keras(sigma.reshape(2, 6), "NC", "glbStd"), sigma)


def test_suggested_map_is_the_right_one_and_the_faithful_port_passes(weights, images, tmp_path, capsys) -> None:
    h5 = weights.get(4).path
    suggested = tmp_path / "map.json"
    argv = [h5, images["noise"], "--candidate", FAITHFUL, "--candidate-input", "NHWC:0..1"]
    code, out, _ = run(capsys, *argv, "--suggest-map", suggested)
    assert code == 0, out
    proposed = LayerMap.read(suggested)
    expected = LayerMap.parse(FAITHFUL_MAP)
    for name in LAYERS:  # every layer, to the module written for it (pred: or the Sigmoid ending it, same output)
        assert proposed.layers[name].module in (expected.layers[name].module, "head.score.1"), name
    assert proposed.input_layout == "NHWC" and proposed.input_range == "0..1"
    # Its modules compute their layer from the layer's input alone, so local mode stays on; pred's module takes
    # NCHW where cLSTM's output is NHWC, which only a hand-written input_layout says.
    assert [name for name in LAYERS if not proposed.layers[name].local] == ["pred"]

    # The hand-checked map (layouts fixed where a square image cannot tell H from W) passes.
    layer_map = tmp_path / "faithful.json"
    layer_map.write_text(json.dumps(FAITHFUL_MAP))
    chosen = [images[name] for name in ("noise", "near-flat", "checkerboard")]  # textured, clamped, full amplitude
    argv = [h5, *chosen, "--candidate", FAITHFUL, "--layer-map", layer_map, "--json", tmp_path / "r.json"]
    code, out, _ = run(capsys, *argv)
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] and all(not layer["unmapped"] for layer in report["layers"])
    assert all(layer["local"] is not None for layer in report["layers"])  # every module ran alone in local mode
    assert "candidate" in report["torch"]["description"] and "FaithfulPort" in report["torch"]["description"]


def test_the_earlier_style_port_diverges_at_bnorm_and_downstream_on_near_flat_images(weights, images) -> None:
    # Trained-like weights (the synthetic Bayar kernel satisfies its constraint, so re-applying it in forward
    # changes nothing): every image diverges at bnorm, whose statistics are the image's own instead of the stored
    # moving ones. That is a per-channel affine map, which cancels in divStd's deviation over std wherever the
    # glbStd clamp is inactive: past the window means, only the near-flat image (clamp active) still differs.
    # divStd is computed inline in that port (no module): unmapped, reported, not failed.
    run = run_parity(weights.get(4).path, list(images.values()), candidate=EARLIER, layer_map=EARLIER_STYLE_MAP)
    assert not run.passed and run.first_divergent_layer == "bnorm"
    past_windows = LAYERS[LAYERS.index("divStd") :]
    for image in run.images:
        report = image.report
        assert report.first_divergent("cumulative") == report.first_divergent("local") == "bnorm", image.name
        assert [layer.name for layer in report.layers if layer.local and not layer.local.passed] == ["bnorm"]
        assert report.unmapped() == ["divStd"]
        late = [n for n in past_windows if report.layer(n).cumulative and not report.layer(n).cumulative.passed]
        assert bool(late) == (image.name == "near-flat.png"), (image.name, late)
    assert run.to_dict()["images"][0]["unmapped"] == ["divStd"]


def test_the_bayar_constraint_in_forward_shows_at_b1c1_where_the_kernel_breaks_it(weights: WeightStore, images):
    # A kernel that does not satisfy the constraint (a checkpoint saved before it was applied): re-applying it in
    # forward changes b1c1, first of all layers, on every image with texture.
    h5 = weights.get(4, 0, "unconstrained_bayar").path
    run = run_parity(h5, [images["noise"], images["gradient"]], candidate=EARLIER, layer_map=EARLIER_STYLE_MAP)
    for image in run.images:
        assert image.report.first_divergent("local") == image.report.first_divergent("cumulative") == "b1c1"


def test_bad_candidate_input_exits_2(weights, images, tmp_path, capsys) -> None:
    h5, image = weights.get(4).path, images["noise"]
    broken = tmp_path / "broken.py"
    broken.write_text("def make(path):\n    raise RuntimeError('no GPU here')\n")
    not_module = tmp_path / "plain.py"
    not_module.write_text("def make():\n    return 42\n")
    bad_map = tmp_path / "bad.json"
    bad_map.write_text(json.dumps({"layers": {"b1c1": "no.such.module"}}))
    wrong_layer = tmp_path / "wrong.json"
    wrong_layer.write_text(json.dumps({"layers": {"conv1": "features.0"}}))
    bad_layout = tmp_path / "layout.json"
    bad_layout.write_text(json.dumps({"layers": {"b1c1": {"module": "features.0", "layout": "NCXW"}}}))
    cases = [
        (["--candidate", EARLIER], "--candidate needs --layer-map"),
        (["--candidate", f"{broken}:make", "--layer-map", bad_map], "RuntimeError: no GPU here"),
        (["--candidate", f"{not_module}:make", "--layer-map", bad_map], "returned int, not an nn.Module"),
        (["--candidate", f"{PORTS}:nothing", "--layer-map", bad_map], "defines no function nothing"),
        (["--candidate", "missing.py:make", "--layer-map", bad_map], "missing.py: no such file"),
        (["--candidate", EARLIER, "--layer-map", bad_map], "no such module in the candidate: b1c1 -> 'no.such.module'"),
        (["--candidate", EARLIER, "--layer-map", wrong_layer], "unknown Keras layers ['conv1']"),
        (["--candidate", EARLIER, "--layer-map", bad_layout], "layout 'NCXW' for b1c1"),
        (["--suggest-map", tmp_path / "m.json"], "--suggest-map needs --candidate"),
    ]
    for argv, expected in cases:
        code, _, err = run(capsys, h5, image, *argv)
        assert code == 2 and expected in err, (argv, err)
    with pytest.raises(ParityInputError, match="give one of them"):
        run_parity(h5, [image], candidate=EARLIER, layer_map=EARLIER_STYLE_MAP, torch_weights=[h5])


# --- the report page of a foreign port: gaps, not zeros; local mode off; one line for inherited failures --------

UNMAPPED = ("bnorm", "glbStd", "nestedAvgFeatex", "divStd")  # as a port that computes its head inline would leave
LOCAL_OFF = ("L2", "cLSTM")  # mapped, but their modules are not fed the reference's input alone
TAMPERED_STAGE = 3  # backbone.stages.3 is b3c1


def tampered_report(weights: WeightStore, images: dict[str, Path], folder: Path) -> Path:
    """The faithful port with one kernel changed by 0.05 (b3c1), compared through a map that leaves the head's
    statistics unmapped and two layers' local mode off; its --report page."""
    port = folder / "tampered_port.py"
    port.write_text(
        "import torch\n"
        "from parity_tests.port_candidates import faithful_port\n\n\n"
        "def tampered(path):\n"
        "    model = faithful_port(path)\n"
        "    with torch.no_grad():\n"
        f"        next(model.backbone.stages[{TAMPERED_STAGE}].parameters()).add_(0.05)\n"
        "    return model\n"
    )
    layers = {k: v for k, v in FAITHFUL_MAP["layers"].items() if k not in UNMAPPED}
    layers |= {name: {**layers[name], "local": False} for name in LOCAL_OFF}
    layer_map = folder / "map.json"
    layer_map.write_text(json.dumps({**FAITHFUL_MAP, "layers": layers}))
    report = folder / "report"
    code = main(["parity", str(weights.get(4).path), str(images["noise"]), "--candidate", f"{port}:tampered",
                 "--layer-map", str(layer_map), "--report", str(report)])  # fmt: skip
    assert code == 1
    return report


def test_the_report_page_of_a_foreign_port_with_a_tampered_kernel(weights, images, tmp_path, capsys) -> None:
    import html
    import re

    report = tampered_report(weights, images, tmp_path)
    capsys.readouterr()
    data = json.loads((report / "report.json").read_text())
    (image,) = data["images"]
    by_name = {layer["name"]: layer for layer in image["layers"]}
    assert image["first_divergent_layer"] == "b3c1" and image["unmapped"] == list(UNMAPPED)
    page = html.unescape((report / "index.html").read_text())
    # the local-mode cells: "unmapped" for the four unmapped layers, "off (...)" for the mapped ones with it off
    rows = {m[0]: m[1] for m in re.findall(r"<tr class='\w+'><td>(\w+)</td>(.*?)</tr>", page)}
    for name in UNMAPPED:
        assert rows[name].count("<td>unmapped</td>") >= 2, rows[name]  # both modes, in both tables
    for name in LOCAL_OFF:
        assert "<td>off (computed outside the module)</td>" in rows[name] and "unmapped" not in rows[name]
    # the failures: the first divergent layer named, then one line for the inherited ones, details collapsed
    inherited = [
        name
        for name, layer in by_name.items()
        if name != "b3c1" and layer["cumulative"] and not layer["cumulative"]["passed"]
        and (layer["local"] is None or layer["local"]["passed"])
    ]  # fmt: skip
    assert len(inherited) >= 5  # the error travels down the backbone and into the head
    assert f"and {len(inherited)} layers downstream, inherited" in page and ", ".join(inherited) in page
    failing = sum(1 for layer in by_name.values() for mode in ("cumulative", "local")
                  if layer[mode] and not layer[mode]["passed"])  # fmt: skip
    assert f"<details><summary>All {failing} failure messages</summary>" in page
    collapsed = page.split("<details>")[1].split("</details>")[0]
    assert collapsed.count("<li>") == failing  # every message, in the collapsed block
    # outside it: the first divergent layer's messages and those of layers wrong by themselves, no inherited one
    own = [(n, m) for n, layer in by_name.items() for m in ("cumulative", "local")
           if layer[m] and not layer[m]["passed"] and (n == "b3c1" or m == "local")]  # fmt: skip
    shown = page.split("First divergent layer:")[1].split("<details>")[0]
    assert shown.count("<li>") == len(own) and not any(f"{name}:" in shown.split("<p>and ")[0] for name in inherited)


def test_the_error_plot_leaves_a_gap_where_a_layer_was_not_compared() -> None:
    from parity_tests.plots import NOT_COMPARED_FILL, SERIES_COLOURS, Series, error_plot

    names = ["a", "b", "c", "d", "e"]
    series = [
        Series("cumulative", [1e-3, 2e-3, None, 3e-3, 4e-3], [False] * 5, SERIES_COLOURS["cumulative"]),
        Series("local", [1e-6, None, None, 2e-6, 3e-6], [False] * 5, SERIES_COLOURS["local"]),
    ]
    plot = np.asarray(error_plot(names, series, [1e-2, 1e-2, None, 1e-2, 1e-2], "t"))
    # the layout error_plot draws on: 720 pixels wide (at least), plot from x=72 to width - 20, inside y 36 to 310
    step = (plot.shape[1] - 72 - 20) / len(names)
    column = [plot[37:310, round(72 + step * (i + 0.5))] for i in range(len(names))]

    def shows(i: int, colour: tuple[int, int, int]) -> bool:
        return bool((column[i] == colour).all(axis=-1).any())

    assert (column[2] == NOT_COMPARED_FILL).all(axis=-1).mean() > 0.5  # shaded: no mode compared layer c
    assert not shows(2, SERIES_COLOURS["cumulative"]) and not shows(2, SERIES_COLOURS["local"])
    assert not (column[1] == NOT_COMPARED_FILL).all(axis=-1).any()  # b: compared in one mode, not shaded
    assert shows(1, SERIES_COLOURS["cumulative"]) and not shows(1, SERIES_COLOURS["local"])  # a gap, no zero
    assert shows(3, SERIES_COLOURS["local"]) and shows(0, SERIES_COLOURS["local"])


def test_a_heat_map_is_drawn_over_a_faint_grey_copy_of_the_input() -> None:
    from parity_tests.plots import COLOUR_SCALE, GREY_STRENGTH, MIN_HEAT_SIDE, heat_map

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    diff = np.zeros((8, 10), np.float32)
    diff[2, 3] = 1e-3  # the error sits at one pixel; elsewhere exactly zero, under the scale's floor
    picture = np.asarray(heat_map(diff, "t", backdrop=pixels))
    zoom = -(-MIN_HEAT_SIDE // 10)  # the map is enlarged by whole pixels
    left, top = 12, 26  # margin and header of the figure

    def at(row: int, col: int) -> np.ndarray:
        return picture[top + row * zoom + zoom // 2, left + col * zoom + zoom // 2].astype(int)

    luma = pixels.astype(np.float64) @ [0.299, 0.587, 0.114]  # ITU-R 601, computed here on its own
    for row, col in ((0, 0), (5, 7), (7, 9)):
        grey = round(255 - (255 - luma[row, col]) * GREY_STRENGTH)
        assert np.abs(at(row, col) - grey).max() <= 1, (row, col)  # the input, faint and grey
    np.testing.assert_array_equal(at(2, 3), COLOUR_SCALE[-1][1])  # the largest error: the scale's top, opaque
