"""The training demo (``mantranet demo --train``, ``make train-demo``): train release 4's detector on forgeries
made from a folder of photographs, and report held-out pixel AUC before and after.

The photographs are split: the last ``held_out`` (by name) make the validation set (``write_synthetic``, a fixed
dataset), the others the forgeries trained on (made on the fly). The run starts from the official release 4 when
it is in the weights folder, else from a stand-in of seeded weights in its layout (``write_standin``), and trains
the detector alone (``freeze="featex"``), as the paper's second stage did, within a time budget.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from converter.cache import weights_dir
from converter.releases import official_release
from converter.synthetic import write_standin
from mantranet_torch.files import make_folder

from .config import TrainConfig, TrainError
from .engine import TrainingRun, train
from .synthetic import write_synthetic

DEMO_RELEASE = 4
VAL_EVERY = 50  # steps between validations (and checkpoints): the curve's points
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass
class TrainDemo:
    """What the demo did: where it started from, and the run."""

    init: str
    standin: bool
    train_photos: list[str]
    held_out_photos: list[str]
    run: TrainingRun


def default_photos() -> Path:
    """The sample photographs beside a checkout (``MANTRANET_SHARED``), where there are some."""
    from parity_tests.shared_data import SAMPLES

    return SAMPLES / "original"


def train_demo(
    output: Path,
    photos: Path | None = None,
    minutes: float = 30.0,
    steps: int = 2000,
    crop: int = 128,
    batch: int = 4,
    held_out: int = 2,
    val_images: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
) -> TrainDemo:
    """Run the demo into ``output`` (a new run each time: an earlier one there is replaced).

    Args:
        output: the demo's folder: train-photos/ (links), val/ (the held-out dataset), run/ (the training run).
        photos: a folder of authentic photographs (default: ``default_photos()``).
        minutes: the time budget of the training run (validations included).
        steps: the most steps (when the run is faster than the budget).
        crop: the training crops' side (the validation images are twice as large).
        batch: crops per step.
        held_out: photographs kept out of training for validation.
        val_images: forgeries made of the held-out photographs.
        lr: the (constant) learning rate.
        seed: the run's seed (the validation set's is seed + 1).
        progress: as ``train``'s.

    Raises:
        TrainError: too few photographs, or the run failed.
    """
    photos = Path(photos) if photos is not None else default_photos()
    files = sorted(p for p in photos.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if photos.is_dir() else []
    if len(files) <= held_out:
        raise TrainError(f"{photos}: {len(files)} photographs; the demo needs more than {held_out} (--photos DIR)")
    output = Path(output)
    make_folder(output)
    for name in ("train-photos", "val-photos", "val", "run"):
        shutil.rmtree(output / name, ignore_errors=True)
    folders = {"train-photos": files[:-held_out], "val-photos": files[-held_out:]}
    for name, chosen in folders.items():
        (output / name).mkdir()
        for f in chosen:
            os.symlink(f.resolve(), output / name / f.name)
    write_synthetic(output / "val-photos", output / "val", val_images, size=2 * crop, seed=seed + 1)
    release = official_release(DEMO_RELEASE)
    standin = not (weights_dir() / release.file).exists()
    if standin:
        init = str(write_standin(output / f"standin-Ptrain{DEMO_RELEASE}.h5", DEMO_RELEASE, seed))
    else:
        init = f"release:{DEMO_RELEASE}"
    config = TrainConfig(
        output=output / "run", synthetic=output / "train-photos", val=output / "val" / "manifest.csv", init=init,
        variant=DEMO_RELEASE, freeze="featex", steps=steps, batch=batch, crop=crop, seed=seed, lr=lr,
        schedule="constant", checkpoint_every=VAL_EVERY, time_limit=minutes * 60, keep_examples=4,
    )  # fmt: skip
    run = train(config, progress)
    return TrainDemo(init, standin, [f.name for f in folders["train-photos"]],
                     [f.name for f in folders["val-photos"]], run)  # fmt: skip
