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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
