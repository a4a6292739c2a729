"""``mantranet demo``: the main job end to end on a built-in default (release 4), each step a real command.

1. the official ``ManTraNet_Ptrain4.h5``: taken from the weights folder, else downloaded and verified;
   where that fails (no network), a stand-in file of seeded weights in the official layout is written,
   and every output says so;
2. ``mantranet convert``: the file to PyTorch weights with a provenance manifest;
3. ``mantranet parity``: the TensorFlow reference against the PyTorch model, layer by layer, on the
   built-in images, with a JSON report and an HTML page;
4. ``mantranet detect``: a forgery map of a built-in copy-move image.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image

from converter.cache import weights_dir
from converter.releases import official_release
from converter.synthetic import write_standin
from mantranet_torch.files import make_folder, write_bytes_atomic
from parity_tests.builtin_images import copy_move

DEMO_RELEASE = 4  # the release the official demo uses
DEFAULT_OUTPUT = Path("demo-out")
DETECT_IMAGE_SIZE = 192
STANDIN_SEED = 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="convert release 4, check it against TensorFlow, and detect forgery on a built-in image",
        description="The main job end to end: fetch (or reuse) the official ManTraNet_Ptrain4.h5, convert it, "
        "verify the conversion layer by layer against the TensorFlow reference, and run detection on a "
        "built-in copy-move forgery. Without network access a stand-in file of seeded weights is used.",
    )
    p.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, metavar="DIR", help="default: demo-out")
    t = p.add_argument_group("training demo (--train)")
    t.add_argument("--train", action="store_true", help="instead: train release 4's detector on synthetic forgeries "
                   "of photographs and report held-out pixel AUC before and after (training.demo)")  # fmt: skip
    t.add_argument("--photos", type=Path, metavar="DIR", help="authentic photographs (default: the samples)")
    t.add_argument("--minutes", type=float, default=30.0, help="training time budget (default 30)")
    t.add_argument("--steps", type=int, default=2000, help="at most this many steps (default 2000)")
    t.add_argument("--crop", type=int, default=128, help="training crop side (default 128)")
    p.set_defaults(run=run)


def run_train_demo(args: argparse.Namespace) -> int:
    """``--train``: ``training.demo.train_demo``, printed."""
    from training import TrainError
    from training.demo import train_demo

    from .errors import CommandError
    from .train_cmd import StepBar

    bar = StepBar()
    try:
        demo = train_demo(args.output / "train", args.photos, args.minutes, args.steps, args.crop, progress=bar)
    except TrainError as e:
        raise CommandError(str(e)) from None
    finally:
        bar.close()
    run = demo.run
    if demo.standin:
        print(f"started from {demo.init}: seeded stand-in weights in release 4's layout (the official file is not in "
              f"{weights_dir()}); its frozen feature extractor is untrained, so the detector learns on random "
              "features")  # fmt: skip
    else:
        print(f"started from {demo.init} (the official weights), feature extractor frozen")
    print(f"trained on forgeries of {', '.join(demo.train_photos)}; held out {', '.join(demo.held_out_photos)}")
    before, after = (run.before or {}).get("pixel_auc"), (run.after or {}).get("pixel_auc")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    print(
        f"held-out pixel AUC: {fmt(before)} before, {fmt(after)} after {run.steps} steps ({run.seconds / 60:.1f} min)"
    )
    print(f"curves and maps: {run.output / 'report.html'}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.train:
        return run_train_demo(args)
    out: Path = args.output
    make_folder(out)

    def step(*argv: str) -> int:
        print(f"\n$ mantranet {' '.join(argv)}", flush=True)
        return args.dispatch(list(argv))  # the very commands a user would type (main() set ``dispatch``)

    release = official_release(DEMO_RELEASE)
    h5 = weights_dir() / release.file
    variant: list[str] = []
    if not h5.exists() and step("weights", "fetch", str(DEMO_RELEASE), "--no-convert") != 0:
        h5 = write_standin(out / f"standin-Ptrain{DEMO_RELEASE}.h5", DEMO_RELEASE, STANDIN_SEED)  # replaced whole
        variant = ["--variant", str(DEMO_RELEASE)]
        print(
            f"\nThe official {release.file} is not in {weights_dir()} and could not be downloaded: the demo goes on "
            f"with {h5}, seeded weights in the official layout. Conversion and parity are shown for real; the "
            f"forgery map means nothing. Put the official file in {weights_dir()} to run on the trained model."
        )
    weights = out / (h5.stem + ".safetensors")
    report = ["--json", str(out / "parity.json"), "--force", "--report", str(out / "parity-report")]
    codes = {
        "convert": step("convert", str(h5), "-o", str(weights), "--force", *variant),
        "parity": step("parity", str(h5), *variant, "--torch-weights", str(weights), *report),
    }
    image = out / "copy-move.png"
    png = io.BytesIO()
    Image.fromarray(copy_move(DETECT_IMAGE_SIZE)).save(png, format="PNG")
    write_bytes_atomic(image, png.getvalue(), force=True)
    codes["detect"] = step("detect", str(image), "-w", str(weights), "-o", str(out / "detect"), "--overlay", "--force")
    print("\n" + ", ".join(f"{name}: {'ok' if code == 0 else f'exit {code}'}" for name, code in codes.items()))
    # what each step wrote; parity writes its report also when layers differ (exit 1), not on bad input (exit 2)
    wrote = {
        weights.name + " (+ manifest)": codes["convert"] == 0,
        "parity.json, parity-report/index.html": codes["parity"] in (0, 1) and (out / "parity.json").exists(),
        "detect/": codes["detect"] == 0,
    }
    print(f"outputs in {out}/: {', '.join(name for name, done in wrote.items() if done) or 'none'}")
    return max(codes.values())
