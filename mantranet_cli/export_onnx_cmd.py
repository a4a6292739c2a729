"""``mantranet export-onnx``: a weight file to an ONNX model for any image size, checked in ONNX Runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from converter.onnx_export import DEFAULT_OPSET, PROBE_ATOL, export_onnx


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export weights to an ONNX model with dynamic batch, height and width",
        description="Export an official .h5 file or our .safetensors/.pt weights to ONNX: input 'image' (float32 "
        "N x 3 x H x W scaled to [-1, 1]), output 'likelihood' (N x 1 x H x W), any batch and size from 1 x 1 up; "
        "the config and the source's hashes in the ONNX metadata. Before the file is written, ONNX Runtime runs "
        f"probe inputs of several sizes and its maps must match the PyTorch model's within {PROBE_ATOL:g}. "
        "Needs the optional extra: pip install 'mantranet-torch[onnx]'.",
    )
    p.add_argument("weights", type=Path, metavar="WEIGHTS", help="an official .h5 file, or our .safetensors/.pt")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="MODEL.onnx")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N", help="ONNX opset (default %(default)s)")
    p.add_argument(
        "--layers",
        action="store_true",
        help="also output the 20 other named layers (layer.b1c1 .. layer.cLSTM), for `mantranet parity`",
    )
    p.add_argument(
        "--variant", type=int, metavar="N", help="the release 0-4 of an .h5 file, when hash and name do not tell"
    )
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    export = export_onnx(
        args.weights, args.output, opset=args.opset, layers=args.layers, force=args.force, variant=args.variant
    )
    print(f"{args.weights}: config {export.config.to_dict()}")
    for probe in export.probes:
        shape = " x ".join(map(str, probe.shape))
        print(f"  ONNX Runtime vs PyTorch on a {shape} probe: max |difference| {probe.max_abs_difference:.2e}")
    extra = f", {len(export.outputs) - 1} layer outputs" if len(export.outputs) > 1 else ""
    print(f"wrote {export.target}: opset {export.opset}, {export.size / 2**20:.1f} MiB{extra}")
    return 0
