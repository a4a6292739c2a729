"""examples/quickstart.ipynb: committed without outputs, and run end to end on the stand-in weights (nbclient), its
printed map range checked against the same computation done here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from converter import load_weights
from converter.synthetic import write_standin
from mantranet_torch.image_files import read_image
from tests.helpers import SAMPLES

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
SAMPLE = SAMPLES / "forged" / "I45_cpo0jq1_0.png"
RELEASE = 4
KERNEL_TIMEOUT_S = 600  # a cell's limit: the parity cell imports TensorFlow, slow on two busy cores


def test_the_notebook_is_committed_without_outputs() -> None:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert len(code) >= 5
    stale = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count") is not None]
    assert stale == [], f"{NOTEBOOK}: code cells {stale} carry outputs; clear them before committing"


@pytest.mark.skipif(not SAMPLE.is_file(), reason=f"{SAMPLE} not found (test data beside a checkout, not shipped)")
def test_the_notebook_runs_on_the_stand_in_weights(tmp_path, monkeypatch) -> None:
    nbclient = pytest.importorskip("nbclient", reason="the notebook extra: pip install 'mantranet-torch[notebook]'")
    import nbformat

    monkeypatch.setenv("MANTRANET_HOME", str(tmp_path / "home"))  # an empty cache: the stand-in path, no network
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=KERNEL_TIMEOUT_S, kernel_name="python3")
    client.execute(cwd=str(NOTEBOOK.parent))
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert not [o for o in outputs if o.output_type == "error"]
    assert "stand-in weights" in text and "passed: True, first divergent layer: None" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the three panels, the error plot

    # The map the notebook computed, against the same steps here (its range is printed to 3 decimals).
    found = re.search(r"(\d+) x (\d+), map in \[([\d.]+), ([\d.]+)\]", text)
    assert found is not None, text
    pixels = read_image(SAMPLE).pixels
    half = Image.fromarray(pixels).resize((pixels.shape[1] // 2, pixels.shape[0] // 2), Image.BILINEAR)
    model = load_weights(write_standin(tmp_path / "standin.h5", RELEASE), variant=RELEASE)
    heat = model.predict(np.asarray(half))
    assert (int(found[1]), int(found[2])) == (half.width, half.height)
    assert (found[3], found[4]) == (f"{heat.min():.3f}", f"{heat.max():.3f}")  # the notebook's own format
