"""Inference speed of ManTraNet on this machine, every contender measured in one run on the same image.

    .venv/bin/python benchmarks/bench_inference.py [--megapixels 1] [--json PATH] [--weights FILE] [--only fp32,bf16]

Measures the machine's throughput for a 3x3 256 -> 256 convolution (the roofline: most of the
arithmetic is that layer; probed before and after every contender, since the load on a shared machine
drifts), then seconds per megapixel of: our float32 path, our bfloat16 path, the TensorFlow reference,
a naive PyTorch baseline written the way the earlier port works (naive_port.py), ONNX Runtime (CPU) on the
model as ``mantranet export-onnx`` writes it, and ``torch.compile`` (inductor, dynamic shapes); the export and
the compilation happen before the warm-up and are not timed. Prints each as
s/MP, as a fraction of the roofline, ratios to each other and peak memory, and checks the targets.
Each contender runs in a fresh worker process (its peak RSS is its own) with the same thread count;
timings are the best of ``--repeats`` runs after a warm-up. Speed does not depend on weight values,
so seeded synthetic Ptrain4 weights are used unless ``--weights``.

bf16 is fast only where the CPU computes bfloat16 natively (mantranet_torch.precision.bf16_support): the
run prints the CPU's capability and bf16 flags, labels the bf16 row "emulated" where it is not native,
and there skips measuring bf16's error (nobody should use it there). ONEDNN_MAX_CPU_ISA=AVX512_CORE in the
environment shows the emulated case on a CPU that has AVX-512 BF16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
CONTENDERS = ("fp32", "bf16", "tensorflow", "naive", "onnxruntime", "compile")
TARGETS = {  # (what, the ratio that must reach it)
    "fp32 >= 85% of the roofline": 0.85,
    "fp32 >= 2x the naive baseline": 2.0,
    "fp32 >= 1.15x the TensorFlow reference": 1.15,
    "bf16 >= 1.6x fp32": 1.6,
}
BF16_ERROR_AIM = 1e-2
WARMUP_SIZE = 64  # a small image run first, so one-time set-up is not timed
CONV_CHANNELS = 256


# ---------------------------------------------------------------- images


def benchmark_image(megapixels: float, seed: int = 0) -> tuple[np.ndarray, str]:
    """A uint8 H x W x 3 image of about ``megapixels``: a centre crop (or an upscale) of the largest sample."""
    target = megapixels * 1e6
    samples = sorted(SAMPLES.glob("*/*")) if SAMPLES.is_dir() else []
    if not samples:
        rng = np.random.default_rng(seed)
        side = round(math.sqrt(target))
        coarse = rng.integers(0, 256, (side // 8 + 1, side // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
        return np.asarray(image), f"synthetic {side} x {side} (no samples at {SAMPLES})"
    path = max(samples, key=lambda p: _area(Image.open(p)))
    image = Image.open(path).convert("RGB")
    w, h = image.size
    if w * h < target:
        scale = math.sqrt(target / (w * h))
        image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)
        w, h = image.size
    ch = min(h, round(math.sqrt(target * h / w)))
    cw = min(w, round(target / ch))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = image.crop((left, top, left + cw, top + ch))
    return np.asarray(crop), f"{path.relative_to(SAMPLES)}, centre {cw} x {ch}"


def sample_images(megapixels: float) -> list[tuple[str, np.ndarray]]:
    """Every sample image as 8-bit RGB, downscaled to at most ``megapixels`` each."""
    out = []
    for path in sorted(SAMPLES.glob("*/*")) if SAMPLES.is_dir() else []:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        scale = min(1.0, math.sqrt(megapixels * 1e6 / (w * h)))
        if scale < 1:
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        out.append((str(path.relative_to(SAMPLES)), np.asarray(image)))
    return out


def _area(image: Image.Image) -> int:
    return image.size[0] * image.size[1]


# ---------------------------------------------------------------- workers (one contender per process)


def _memory_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _timed(fn, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def _torch_model(weights: str | None):
    from converter import keras_to_torch, load_weights, synthetic_keras_weights
    from mantranet_torch import RELEASES, ManTraNet

    if weights is None:
        model = ManTraNet(RELEASES[4])
        model.load_state_dict(keras_to_torch(synthetic_keras_weights(RELEASES[4], 0), RELEASES[4], "synthetic"))
        return model.eval()
    return load_weights(weights)  # ours, an official .h5 (converted in memory) or the earlier port's


def run_worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    image = np.load(args.image)
    result: dict = {"contender": args.worker, "threads": torch.get_num_threads()}
    if args.worker == "roofline":
        result.update(_roofline(image.shape[0], image.shape[1], args.repeats))
    elif args.worker == "bf16-error":
        result.update(_bf16_errors(args))
    else:
        run, warm = _contender(args.worker, args)
        warm(image[:WARMUP_SIZE, :WARMUP_SIZE])
        result["rss_before"] = _memory_status()["VmRSS"]
        outputs = []
        result["seconds"] = _timed(lambda: outputs.append(run(image)), args.repeats)
        result.update(peak_rss=_memory_status()["VmHWM"])
        np.save(args.output_map, outputs[-1].astype(np.float32))
    Path(args.result).write_text(json.dumps(result))


def _contender(name: str, args: argparse.Namespace):
    """(run, warm-up): each maps a uint8 H x W x 3 image to a float32 H x W map."""
    import torch

    if name == "tensorflow":
        import tensorflow as tf

        if args.threads:
            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        import reference
        from converter import synthetic_keras_weights
        from mantranet_torch import RELEASES
        from mantranet_torch.weights import H5_SUFFIXES

        if args.weights and args.weights.lower().endswith(H5_SUFFIXES):
            ref = reference.load(args.weights)
        elif args.weights:
            raise SystemExit("the TensorFlow reference reads official .h5 weights only")
        else:
            ref = reference.from_keras_arrays(synthetic_keras_weights(RELEASES[4], 0), RELEASES[4])

        def run(img: np.ndarray) -> np.ndarray:
            x = (img.astype(np.float32) / 255.0 * 2.0 - 1.0)[None]
            return ref.predict(x)[0, :, :, 0]

        return run, run  # a graph is compiled per size: the warm-up only loads TensorFlow's kernels
    model = _torch_model(args.weights)
    if name == "naive":
        sys.path.insert(0, str(Path(__file__).parent))
        from naive_port import NaivePort

        from mantranet_torch import to_model_input

        naive = NaivePort(model).eval()

        def run(img: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return naive(to_model_input(img))[0, 0].numpy()

        return run, run
    if name in ("onnxruntime", "compile"):
        return _deployed(name, model, args)
    precision = name

    def run(img: np.ndarray) -> np.ndarray:
        return model.predict(img, tile=max(img.shape), precision=precision)  # the whole image, never tiled

    return run, run


def _deployed(name: str, model, args: argparse.Namespace):
    """The model run by ONNX Runtime from an exported file, or compiled by torch.compile: (run, warm-up)."""
    import torch

    from mantranet_torch import to_model_input

    if name == "onnxruntime":
        from converter.onnx_export import OnnxModel, export_graph

        session = OnnxModel(export_graph(model).SerializeToString(), threads=args.threads)

        def run(img: np.ndarray) -> np.ndarray:
            return session(to_model_input(img).numpy())[0, 0]

        return run, run
    compiled = torch.compile(model, fullgraph=True, dynamic=True)

    def run(img: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return compiled(to_model_input(img))[0, 0].numpy()

    return run, run


def _roofline(height: int, width: int, repeats: int) -> dict:
    """GFLOP/s of a 3x3, 256 -> 256 convolution at the benchmark's size, channels-last, as our layers run it."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, CONV_CHANNELS, height, width, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(CONV_CHANNELS, CONV_CHANNELS, 3, 3, generator=gen) * 0.02
    b = torch.zeros(CONV_CHANNELS)
    flop = 2 * CONV_CHANNELS * CONV_CHANNELS * 9 * height * width
    with torch.inference_mode():
        F.conv2d(x[..., :WARMUP_SIZE, :WARMUP_SIZE], w, b, padding=1)
        seconds = _timed(lambda: F.conv2d(x, w, b, padding=1), repeats)
    return {"seconds": seconds, "gflops": flop / min(seconds) / 1e9}


def _bf16_errors(args: argparse.Namespace) -> dict:
    """Max and mean |bf16 - fp32| of the maps of every sample image (downscaled)."""
    model = _torch_model(args.weights)
    per_image = {}
    for name, image in sample_images(args.error_megapixels):
        full = model.predict(image, tile=max(image.shape), precision="fp32")
        half = model.predict(image, tile=max(image.shape), precision="bf16")
        diff = np.abs(half.astype(np.float64) - full)
        per_image[name] = {
            "shape": list(image.shape[:2]),
            "max": float(diff.max()),
            "mean": float(diff.mean()),
            "p99": float(np.percentile(diff, 99)),
        }
    return {"images": per_image}


# ---------------------------------------------------------------- the run


def spawn(name: str, args: argparse.Namespace, image_path: Path, tmp: Path) -> dict:
    result, output_map = tmp / f"{name}.json", tmp / f"{name}.npy"
    command = [sys.executable, __file__, "--worker", name, "--image", str(image_path)]
    command += ["--result", str(result), "--output-map", str(output_map), "--repeats", str(args.repeats)]
    command += ["--error-megapixels", str(args.error_megapixels)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.weights:
        command += ["--weights", args.weights]
    print(f"  running {name} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"contender": name, "error": last}
    out = json.loads(result.read_text())
    if output_map.exists():
        out["map"] = np.load(output_map)
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    from mantranet_torch.precision import CPU_BF16_FEATURES, bf16_support

    features = torch.cpu.get_capabilities()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_flags": {key: bool(features.get(key)) for key in CPU_BF16_FEATURES},
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        "bf16": vars(bf16_support("cpu")),
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_before": os.getloadavg(),
    }


def report(args: argparse.Namespace) -> dict:
    from mantranet_torch.cost import flops_per_pixel, multiply_adds_per_pixel

    image, described = benchmark_image(args.megapixels)
    pixels = image.shape[0] * image.shape[1]
    info = machine()
    model = _torch_model(args.weights)
    flop_px, macs = flops_per_pixel(model), multiply_adds_per_pixel(model)
    del model
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, torch {info['torch']}")
    print(f"image: {described} ({pixels / 1e6:.3f} MP); load average {info['load_average_before'][0]:.2f}")
    bf16 = info["bf16"]
    flags = ", ".join(f"{key} {'yes' if on else 'no'}" for key, on in info["bf16_flags"].items())
    isa = f", ONEDNN_MAX_CPU_ISA={info['onednn_max_cpu_isa']}" if info["onednn_max_cpu_isa"] else ""
    capability = f"{info['cpu_capability']} (torch.backends.cpu.get_cpu_capability())"
    print(f"CPU capability: {capability}; bf16 flags: {flags}{isa}")
    print(f"bf16 {'native' if bf16['native'] else 'EMULATED'}: {bf16['reason']}")
    featex = sum(v for k, v in macs.items() if k not in ("outlierTrans", "cLSTM", "pred"))
    print(
        f"arithmetic: {sum(macs.values()):,} multiply-adds per pixel (Featex {featex:,}, cLSTM {macs['cLSTM']:,}) "
        f"= {flop_px / 1e6:.4f} TFLOP per MP"
    )
    results, probes = {}, []
    contenders = [name for name in CONTENDERS if name in args.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        image_path = Path(tmp) / "image.npy"
        np.save(image_path, image)
        # The roofline is probed before and after every contender: on a shared machine the load drifts,
        # and each contender is judged against the convolution speed of its own moment.
        probes.append(spawn("roofline", args, image_path, Path(tmp)).get("gflops"))
        for name in contenders:
            results[name] = spawn(name, args, image_path, Path(tmp))
            probes.append(spawn("roofline", args, image_path, Path(tmp)).get("gflops"))
        if "bf16" in contenders and bf16["native"]:  # emulated bf16 is not worth measuring
            results["bf16-error"] = spawn("bf16-error", args, image_path, Path(tmp))
    info["load_average_after"] = os.getloadavg()

    measured = [p for p in probes if p]
    roof = max(measured) if measured else None
    rows = {}
    for i, name in enumerate(contenders):
        r = results[name]
        if "error" in r:
            rows[name] = {"error": r["error"]}
            continue
        best = min(r["seconds"])
        rows[name] = {
            "seconds": best,
            "all_seconds": r["seconds"],
            "s_per_mp": best / (pixels / 1e6),
            "gflops": flop_px * pixels / best / 1e9,
            "peak_rss_gb": r["peak_rss"] / 2**30,
            "rss_before_gb": r["rss_before"] / 2**30,
        }
        around = [p for p in probes[i : i + 2] if p]
        if around:
            rows[name]["roofline_gflops"] = sum(around) / len(around)
            rows[name]["roofline_fraction"] = rows[name]["gflops"] / rows[name]["roofline_gflops"]
    spread = f"{min(measured):.1f} to {max(measured):.1f}" if measured else "n/a"
    print(f"\nroofline: 3x3 {CONV_CHANNELS}->{CONV_CHANNELS} convolution, {spread} GFLOP/s over {len(measured)} probes")
    print("(each contender's fraction is of the mean of the probes just before and after it)")
    print(f"{'contender':<16}{'s/MP':>8}{'GFLOP/s':>9}{'roofline':>10}{'peak RSS':>10}{'(model+run)':>13}")
    for name, row in rows.items():
        label = "bf16 (emulated)" if name == "bf16" and not bf16["native"] else name
        if "error" in row:
            print(f"{label:<16} unavailable: {row['error']}")
            continue
        print(
            f"{label:<16}{row['s_per_mp']:>8.2f}{row['gflops']:>9.1f}{row.get('roofline_fraction', 0):>10.1%}"
            f"{row['peak_rss_gb']:>9.2f}G{row['peak_rss_gb'] - row['rss_before_gb']:>12.2f}G"
        )
    ratios = {}
    for a in contenders:
        for b in contenders:
            if a != b and "seconds" in rows[a] and "seconds" in rows[b]:
                ratios[f"{a} vs {b}"] = rows[b]["seconds"] / rows[a]["seconds"]
    print("\nspeed ratios (how many times faster the first is):")
    for key, value in ratios.items():
        if key.split(" vs ")[0] in ("fp32", "bf16") or key in ("onnxruntime vs fp32", "compile vs fp32"):
            print(f"  {key:<24}{value:>6.2f}x")
    agreement = {}
    fp32_map = results.get("fp32", {}).get("map")
    for name in ("bf16", "tensorflow", "naive", "onnxruntime", "compile"):
        other = results.get(name, {}).get("map")
        if fp32_map is not None and other is not None:
            agreement[name] = float(np.abs(other.astype(np.float64) - fp32_map).max())
    print("\nmax |map - fp32 map| on the benchmark image: " + ", ".join(f"{k} {v:.2e}" for k, v in agreement.items()))
    errors = results.get("bf16-error", {}).get("images", {})
    if "bf16" in contenders and not bf16["native"]:
        print("bf16 vs fp32 on the sample images: not measured, bf16 is emulated here (slower than fp32)")
    if errors:
        worst = max(e["max"] for e in errors.values())
        mean = float(np.mean([e["mean"] for e in errors.values()]))
        print(
            f"bf16 vs fp32 on {len(errors)} sample images (<= {args.error_megapixels} MP each): max {worst:.4f}, "
            f"mean {mean:.5f} (aim <= {BF16_ERROR_AIM})"
        )
    achieved = {
        "fp32 >= 85% of the roofline": rows.get("fp32", {}).get("roofline_fraction"),
        "fp32 >= 2x the naive baseline": ratios.get("fp32 vs naive"),
        "fp32 >= 1.15x the TensorFlow reference": ratios.get("fp32 vs tensorflow"),
        "bf16 >= 1.6x fp32": ratios.get("bf16 vs fp32"),
    }
    print("\ntargets:")
    for target, needed in TARGETS.items():
        got = achieved[target]
        verdict = "n/a" if got is None else ("met" if got >= needed else f"MISSED by {needed - got:.3f}")
        if target.startswith("bf16") and not bf16["native"]:
            verdict = "n/a: bf16 is emulated here"  # the target is for CPUs with native bfloat16
        print(f"  {target:<42}{'' if got is None else f'{got:.3f}':>8}  {verdict}")
    print(f"load average after: {info['load_average_after'][0]:.2f}")
    return {
        "machine": info,
        "image": {"source": described, "height": image.shape[0], "width": image.shape[1]},
        "multiply_adds_per_pixel": macs,
        "tflop_per_megapixel": flop_px / 1e6,
        "roofline_gflops": roof,
        "roofline_probes_gflops": probes,
        "contenders": rows,
        "ratios": ratios,
        "max_abs_difference_to_fp32": agreement,
        "bf16_error_on_samples": errors,
        "targets": {t: {"needed": n, "achieved": achieved[t]} for t, n in TARGETS.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, default=1.0, help="size of the benchmark image (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per contender; the best counts")
    parser.add_argument("--threads", type=int, help="threads for every contender (default: torch's default)")
    parser.add_argument("--weights", help="weights to use instead of synthetic ones (.safetensors, .pt or .h5)")
    parser.add_argument("--error-megapixels", type=float, default=0.1, help="size of each sample for the bf16 error")
    parser.add_argument(
        "--only", default=",".join(CONTENDERS), help=f"comma-separated contenders (default: {','.join(CONTENDERS)})"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    for hidden in ("--image", "--result", "--output-map"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    out = report(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
