"""Inference speed and memory of ManTraNet on this machine, every contender measured in one run on the same image.

    .venv/bin/python benchmarks/bench_inference.py [--sizes 0.25,1,4] [--quick] [--budget-minutes 8] [--json PATH]
                                                   [--only fp32,bf16,...] [--repeats 3] [--weights FILE]

Contenders: our eager float32 path (``fp32``) and bfloat16 path (``bf16``), measured at every size of the sweep so
that scaling shows; ONNX Runtime on the graph ``mantranet export-onnx`` writes, with default session options
(``onnxruntime``) and with its memory arena and memory pattern off, sequential (``onnxruntime-lean``);
``torch.compile`` with Inductor's freezing, static shapes (``compile``); and, on request, the TensorFlow reference
(``tensorflow``) and a naive PyTorch port (``naive``). The contenders other than fp32 and bf16 run at the smallest
size of the sweep. Each (contender, size) runs in a fresh worker process (its peak RSS is its own):

- set-up (export, compilation) first, not timed, then one warm-up run at the measured size, under the profiler:
  the share of the run's wall time spent in convolutions (torch's profiler; ONNX Runtime's own for it);
- then ``--repeats`` timed runs (default 3): median, min and max; eager runs time the feature extractor and the
  detector separately (the phase split);
- peak RSS (VmHWM), then the roofline: a lone 3x3 256 -> 256 convolution (most of the arithmetic is that layer),
  channels-last, at the same size (at most ``PROBE_MAX_MP``), in fp32 and, for bf16, in bfloat16.

The sweep runs every contender at the smallest size first, then fp32 and bf16 at the larger ones, and skips a
(contender, size) whose time, estimated from its smaller sizes, would overrun ``--budget-minutes`` (default 12:
on 2 idle cores that is everything at 0.25 and 1 MP, and the 4 MP rows are skipped; a faster machine gets further).
``--quick`` is a smoke run (0.05 and 0.1 MP, fp32 and bf16, about a minute on 2 idle cores).

bf16 is fast only where the CPU computes bfloat16 natively (``mantranet_torch.precision.bf16_support``): the run
prints whether the CPU has AMX and AVX-512 BF16, labels the bf16 rows "emulated" where bf16 is not native, and
judges bf16's speed-up against what this CPU's bf16 probe gains over its fp32 probe. Speed does not depend on
weight values, so seeded synthetic Ptrain4 weights are used unless ``--weights``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
CONTENDERS = ("fp32", "bf16", "onnxruntime", "onnxruntime-lean", "compile", "tensorflow", "naive")
DEFAULT_CONTENDERS = ("fp32", "bf16", "onnxruntime", "onnxruntime-lean", "compile")
SWEPT = ("fp32", "bf16")  # measured at every size; the rest at the smallest
DEFAULT_SIZES = (0.25, 1.0, 4.0)
QUICK_SIZES = (0.05, 0.1)
ORT_LEAN = {"enable_mem_pattern": False, "enable_cpu_mem_arena": False}  # and ORT_SEQUENTIAL, set in the worker
CONV_CHANNELS = 256
PROBE_MAX_MP = 1.0  # the roofline probe's largest size (its tensors are 256 channels wide)
# Goals of the speed issue; bf16's speed-up is judged against the hardware (see bf16_goal)
BF16_GOAL_AMX = 3.5  # bf16 / fp32 end to end at 1 MP on CPUs with AMX
BF16_GOAL_OF_PROBE = 0.8  # elsewhere: this fraction of the bf16 probe's speed-up over the fp32 probe
SCALING_GOAL = 1.15  # s/MP at any size over the smallest size's
FP32_NON_CONV_GOAL = 0.08
FP32_ROOFLINE_GOAL = 0.90
COMPILE_GOAL = 1.15
ORT_MEMORY_GOAL = 1.5
BF16_ERROR_AIM = 1e-2
DEFAULT_BUDGET_MINUTES = 12.0  # 2 idle cores: everything at 0.25 and 1 MP; 4 MP where a faster machine gets there


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


# ---------------------------------------------------------------- workers (one contender and size per process)


def _memory_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


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
    result: dict = {"contender": args.worker, "threads": torch.get_num_threads()}
    if args.worker == "bf16-error":
        result.update(_bf16_errors(args))
        Path(args.result).write_text(json.dumps(result))
        return
    image = np.load(args.image)
    start = time.perf_counter()
    run = _contender(args.worker, args)
    result["setup_seconds"] = time.perf_counter() - start
    result["rss_before"] = _memory_status()["VmRSS"]
    result["conv_share"], result["profile_top"] = _profiled(args.worker, run, image)
    phases, outputs = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out, split = run(image)
        total = time.perf_counter() - start
        phases.append({"total": total, **split})
        outputs.append(out)
    result["runs"] = phases
    result["peak_rss"] = _memory_status()["VmHWM"]
    np.save(args.output_map, outputs[-1].astype(np.float32))
    del run, outputs
    height, width = image.shape[:2]
    dtypes = ("bfloat16",) if args.worker == "bf16" else ("float32",)
    result["probe"] = {dtype: _roofline(height, width, dtype, args.repeats) for dtype in dtypes}
    Path(args.result).write_text(json.dumps(result))


def _contender(name: str, args: argparse.Namespace):
    """A function mapping a uint8 H x W x 3 image to (float32 H x W map, {phase: seconds}), after its set-up."""
    import torch

    if name == "tensorflow":
        return _tensorflow(args)
    model = _torch_model(args.weights)
    from mantranet_torch import to_model_input

    if name == "naive":
        sys.path.insert(0, str(Path(__file__).parent))
        from naive_port import NaivePort

        naive = NaivePort(model).eval()

        def run(img: np.ndarray):
            with torch.inference_mode():
                return naive(to_model_input(img))[0, 0].numpy(), {}

        return run
    if name.startswith("onnxruntime"):
        import onnxruntime as ort

        from converter.onnx_export import OnnxModel, export_graph

        options = {"enable_profiling": True, "profile_file_prefix": str(Path(args.result).with_suffix(""))}
        if name == "onnxruntime-lean":
            options.update(ORT_LEAN, execution_mode=ort.ExecutionMode.ORT_SEQUENTIAL)
        session = OnnxModel(export_graph(model).SerializeToString(), threads=args.threads, options=options)
        del model

        def run(img: np.ndarray):
            return session(to_model_input(img).numpy())[0, 0], {}

        run.session = session.session
        return run
    if name == "compile":
        import torch._inductor.config as inductor

        inductor.freezing = True  # weights folded in as constants, Inductor's oneDNN weight prepacking
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        first = np.zeros((*np.load(args.image).shape[:2], 3), dtype=np.uint8)
        with torch.no_grad():
            compiled(to_model_input(first))  # compiles for this size (not timed)

        def run(img: np.ndarray):
            with torch.no_grad():
                return compiled(to_model_input(img))[0, 0].numpy(), {}

        return run
    from mantranet_torch.precision import float32_precision
    from mantranet_torch.tiling import extract_features

    precision = name

    def run(img: np.ndarray):
        # predict's whole-image path (model.predict(img, precision=...)), with the two phases timed apart
        with torch.inference_mode(), float32_precision(precision):
            start = time.perf_counter()
            features = extract_features(model, to_model_input(img), precision)
            middle = time.perf_counter()
            out = model.detector(features)[0, 0].float().numpy()
            return out, {"featex": middle - start, "detector": time.perf_counter() - middle}

    return run


def _tensorflow(args: argparse.Namespace):
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

    def run(img: np.ndarray):
        x = (img.astype(np.float32) / 255.0 * 2.0 - 1.0)[None]
        return ref.predict(x)[0, :, :, 0], {}

    return run


def _profiled(name: str, run, image: np.ndarray) -> tuple[float | None, list]:
    """The warm-up run, profiled: (share of its wall time in convolutions, its five costliest operators)."""
    session = getattr(run, "session", None)
    if session is not None:  # ONNX Runtime profiles itself (enabled when the session was made)
        start = time.perf_counter()
        run(image)
        wall = time.perf_counter() - start
        events = json.loads(Path(session.end_profiling()).read_text())
        nodes = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                nodes[op] = nodes.get(op, 0.0) + e["dur"] / 1e6
        conv = sum(v for k, v in nodes.items() if "conv" in k.lower())
        return conv / wall, sorted(([k, v / wall] for k, v in nodes.items()), key=lambda kv: -kv[1])[:5]
    if name == "tensorflow":
        run(image)
        return None, []
    import torch

    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(image)
    wall = time.perf_counter() - start
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    conv = sum(v for k, v in ops.items() if "conv" in k.lower())  # oneDNN's, fused or not, and their wrappers
    return conv / wall, sorted(([k, v / wall] for k, v in ops.items()), key=lambda kv: -kv[1])[:5]


def _roofline(height: int, width: int, dtype: str, repeats: int) -> dict:
    """GFLOP/s of a lone 3x3, 256 -> 256 convolution, channels-last as our layers run it: median of ``repeats``
    after a warm-up at the same size (at most PROBE_MAX_MP, keeping the aspect ratio)."""
    import torch
    import torch.nn.functional as F

    scale = min(1.0, math.sqrt(PROBE_MAX_MP * 1e6 / (height * width)))
    height, width = max(8, round(height * scale)), max(8, round(width * scale))
    gen = torch.Generator().manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    x = torch.randn(1, CONV_CHANNELS, height, width, generator=gen).to(torch_dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(CONV_CHANNELS, CONV_CHANNELS, 3, 3, generator=gen) * 0.02).to(torch_dtype)
    b = torch.zeros(CONV_CHANNELS, dtype=torch_dtype)
    flop = 2 * CONV_CHANNELS * CONV_CHANNELS * 9 * height * width
    seconds = []
    with torch.inference_mode():
        F.conv2d(x, w, b, padding=1)
        for _ in range(repeats):
            start = time.perf_counter()
            F.conv2d(x, w, b, padding=1)
            seconds.append(time.perf_counter() - start)
    return {"megapixels": height * width / 1e6, "seconds": seconds, "gflops": flop / statistics.median(seconds) / 1e9}


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


def spawn(name: str, args: argparse.Namespace, image_path: Path | None, tmp: Path, tag: str) -> dict:
    result, output_map = tmp / f"{name}-{tag}.json", tmp / f"{name}-{tag}.npy"
    command = [sys.executable, __file__, "--worker", name, "--image", str(image_path)]
    command += ["--result", str(result), "--output-map", str(output_map), "--repeats", str(args.repeats)]
    command += ["--error-megapixels", str(args.error_megapixels)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.weights:
        command += ["--weights", args.weights]
    print(f"  running {name} at {tag} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"contender": name, "error": last, "wall": time.perf_counter() - start}
    out = json.loads(result.read_text())
    out["wall"] = time.perf_counter() - start
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
        "amx": bool(features.get("amx_bf16")),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
        "bf16": vars(bf16_support("cpu")),
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_before": os.getloadavg(),
    }


def _row(r: dict, pixels: int, flop_px: int) -> dict:
    """One (contender, size) measurement, summarised."""
    if "error" in r:
        return {"error": r["error"]}
    totals = [run["total"] for run in r["runs"]]
    median = statistics.median(totals)
    row = {
        "megapixels": pixels / 1e6,
        "seconds_median": median,
        "seconds_min": min(totals),
        "seconds_max": max(totals),
        "s_per_mp": median / (pixels / 1e6),
        "gflops": flop_px * pixels / median / 1e9,
        "conv_share": r["conv_share"],
        "profile_top": r["profile_top"],
        "peak_rss_gb": r["peak_rss"] / 2**30,
        "run_rss_gb": (r["peak_rss"] - r["rss_before"]) / 2**30,
        "setup_seconds": r["setup_seconds"],
        "probe": r["probe"],
        "worker_seconds": r["wall"],
    }
    if "featex" in r["runs"][0]:
        for phase in ("featex", "detector"):
            row[f"{phase}_s_per_mp"] = statistics.median(run[phase] for run in r["runs"]) / (pixels / 1e6)
        row["detector_share"] = row["detector_s_per_mp"] / (row["featex_s_per_mp"] + row["detector_s_per_mp"])
    probe = r["probe"].get("bfloat16") or r["probe"].get("float32")
    row["roofline_fraction"] = row["gflops"] / probe["gflops"]
    return row


def _estimate(rows: dict, name: str, megapixels: float, repeats: int) -> float | None:
    """Seconds a worker of ``name`` at ``megapixels`` should take, from its largest smaller size (None: unknown)."""
    known = [(mp, row) for (n, mp), row in rows.items() if n == name and "s_per_mp" in row and mp < megapixels]
    if not known:
        return None
    _, row = max(known, key=lambda kv: kv[0])
    runs = (repeats + 1) * row["s_per_mp"] * megapixels
    return runs * 1.2 + row["setup_seconds"] + 10  # the probe, the process and the model


def bf16_goal(info: dict, probe_ratio: float | None) -> tuple[float | None, str]:
    """The bf16 / fp32 speed-up to reach at 1 MP on this CPU, and why that one."""
    if not info["bf16"]["native"]:
        return None, "bf16 is emulated here: no speed goal"
    if info["amx"]:
        return BF16_GOAL_AMX, "AMX: the issue's 3.5x"
    if probe_ratio is None:
        return None, "no probe ratio measured"
    goal = BF16_GOAL_OF_PROBE * probe_ratio
    return goal, f"no AMX: {BF16_GOAL_OF_PROBE:.0%} of the bf16 probe's {probe_ratio:.2f}x over the fp32 probe"


def report(args: argparse.Namespace) -> dict:
    from mantranet_torch.cost import flops_per_pixel, multiply_adds_per_pixel

    info = machine()
    model = _torch_model(args.weights)
    flop_px, macs = flops_per_pixel(model), multiply_adds_per_pixel(model)
    del model
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, torch {info['torch']}")
    flags = ", ".join(f"{key} {'yes' if on else 'no'}" for key, on in info["bf16_flags"].items())
    isa = f"; ONEDNN_MAX_CPU_ISA={info['onednn_max_cpu_isa']}" if info["onednn_max_cpu_isa"] else ""
    print(f"CPU capability {info['cpu_capability']}; AMX {'yes' if info['amx'] else 'no'}; bf16 flags: {flags}{isa}")
    bf16 = info["bf16"]
    print(f"bf16 {'native' if bf16['native'] else 'EMULATED'}: {bf16['reason']}")
    print(f"arithmetic: {sum(macs.values()):,} multiply-adds per pixel = {flop_px / 1e6:.4f} TFLOP per MP")
    print(f"load average before: {info['load_average_before'][0]:.2f} (timings are only meaningful on an idle machine)")
    contenders = [name for name in CONTENDERS if name in args.only.split(",")]
    # the smallest size for every contender, then the larger sizes for the swept ones
    plan = [(name, args.sizes[0]) for name in contenders]
    plan += [(name, mp) for mp in args.sizes[1:] for name in contenders if name in SWEPT]
    deadline = time.perf_counter() + args.budget_minutes * 60
    results, rows, images, skipped = {}, {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for mp in args.sizes:
            image, described = benchmark_image(mp)
            images[mp] = (image, described)
            np.save(Path(tmp) / f"image-{mp}.npy", image)
        for name, mp in plan:
            left = deadline - time.perf_counter()
            estimate = _estimate(rows, name, mp, args.repeats)
            if estimate is not None and estimate > left:
                skipped.append((name, mp, estimate))
                note = f"about {estimate:.0f} s, {max(left, 0):.0f} s left"
                print(f"  skipping {name} at {mp} MP: {note}", file=sys.stderr)
                continue
            image = images[mp][0]
            results[name, mp] = spawn(name, args, Path(tmp) / f"image-{mp}.npy", Path(tmp), f"{mp}MP")
            rows[name, mp] = _row(results[name, mp], image.shape[0] * image.shape[1], flop_px)
        errors = {}
        if "bf16" in contenders and bf16["native"] and args.error_megapixels > 0:  # emulated bf16 is not worth it
            errors = spawn("bf16-error", args, None, Path(tmp), f"{args.error_megapixels}MP").get("images", {})
    info["load_average_after"] = os.getloadavg()
    return summarise(args, info, flop_px, macs, images, results, rows, skipped, errors)


def summarise(args, info, flop_px, macs, images, results, rows, skipped, errors) -> dict:
    """Print the tables and the goals; return everything as one JSON-able dict."""
    bf16 = info["bf16"]
    print()
    for mp, (image, described) in images.items():
        print(f"{mp} MP: {described} ({image.shape[0] * image.shape[1] / 1e6:.3f} MP)")
    print("\nroofline: a lone 3x3 256->256 convolution, channels-last, at each size (GFLOP/s, median)")
    probes = {}
    for mp in args.sizes:
        fp32 = rows.get(("fp32", mp), {}).get("probe", {}).get("float32", {}).get("gflops")
        b16 = rows.get(("bf16", mp), {}).get("probe", {}).get("bfloat16", {}).get("gflops")
        probes[mp] = {"float32": fp32, "bfloat16": b16, "ratio": b16 / fp32 if fp32 and b16 else None}
        if fp32 or b16:
            ratio = f"  bf16/fp32 {b16 / fp32:.2f}x" if fp32 and b16 else ""
            print(f"  {mp:>5} MP: fp32 {fp32 or float('nan'):7.1f}  bf16 {b16 or float('nan'):7.1f}{ratio}")
    header = f"{'contender':<18}{'MP':>5}{'s/MP':>8}{'min-max':>14}{'roofline':>9}{'featex':>8}{'detect':>8}"
    print("\n" + header + f"{'det %':>7}{'conv %':>7}{'peak':>8}{'set-up':>8}")
    for (name, mp), row in rows.items():
        label = f"{name} (emulated)" if name == "bf16" and not bf16["native"] else name
        if "error" in row:
            print(f"{label:<18}{mp:>5} unavailable: {row['error']}")
            continue
        spread = f"{row['seconds_min'] / row['megapixels']:.1f}-{row['seconds_max'] / row['megapixels']:.1f}"
        phases = (
            f"{row['featex_s_per_mp']:>8.2f}{row['detector_s_per_mp']:>8.2f}{row['detector_share']:>7.0%}"
            if "featex_s_per_mp" in row
            else f"{'':>8}{'':>8}{'':>7}"
        )
        conv = f"{row['conv_share']:>7.0%}" if row["conv_share"] is not None else f"{'':>7}"
        print(
            f"{label:<18}{mp:>5}{row['s_per_mp']:>8.2f}{spread:>14}{row['roofline_fraction']:>9.0%}{phases}{conv}"
            f"{row['peak_rss_gb']:>7.2f}G{row['setup_seconds']:>7.0f}s"
        )
    for name, mp, estimate in skipped:
        print(f"{name:<18}{mp:>5} skipped: about {estimate:.0f} s would overrun --budget-minutes {args.budget_minutes}")
    print("(s/MP: median of the timed runs; roofline: the model's GFLOP/s over the probe's of its precision and size;")
    print(" featex/detect: the two phases' s/MP; conv %: profiler time in convolutions over the run's wall time)")

    ratios, agreement = {}, {}
    for (name, mp), row in rows.items():
        fp32 = rows.get(("fp32", mp), {})
        if name != "fp32" and "seconds_median" in row and "seconds_median" in fp32:
            ratios[f"{name} vs fp32 at {mp} MP"] = fp32["seconds_median"] / row["seconds_median"]
            ratios[f"{name} peak over fp32 peak at {mp} MP"] = row["peak_rss_gb"] / fp32["peak_rss_gb"]
        reference = results.get(("fp32", mp), {}).get("map")
        other = results.get((name, mp), {}).get("map")
        if name != "fp32" and reference is not None and other is not None:
            agreement[f"{name} at {mp} MP"] = float(np.abs(other.astype(np.float64) - reference).max())
    scaling = {}
    for name in SWEPT:
        measured = {mp: rows[name, mp]["s_per_mp"] for mp in args.sizes if "s_per_mp" in rows.get((name, mp), {})}
        if len(measured) > 1:
            base = measured[min(measured)]
            scaling[name] = {mp: value / base for mp, value in measured.items()}
    print("\nspeed ratios (how many times faster than eager fp32 at the same size) and peak memory over fp32's:")
    for key, value in ratios.items():
        print(f"  {key:<46}{value:>6.2f}x")
    print(
        "scaling (s/MP over the smallest size's): "
        + "; ".join(f"{name} " + ", ".join(f"{mp} MP {v:.2f}" for mp, v in s.items()) for name, s in scaling.items())
    )
    print("max |map - fp32 map|: " + ", ".join(f"{k} {v:.2e}" for k, v in agreement.items()))
    if errors:
        worst = max(e["max"] for e in errors.values())
        mean = float(np.mean([e["mean"] for e in errors.values()]))
        print(
            f"bf16 vs fp32 on {len(errors)} sample images (<= {args.error_megapixels} MP each): max {worst:.4f}, "
            f"mean {mean:.5f} (aim <= {BF16_ERROR_AIM}; 0.059 and 0.0052 before this benchmark's issue)"
        )
    elif not bf16["native"]:
        print("bf16 vs fp32 on the sample images: not measured, bf16 is emulated here (slower than fp32)")

    goals = _goals(args, info, rows, probes, scaling)
    print("\ngoals:")
    for goal in goals:
        need = "" if goal["needed"] is None else f"{'<=' if goal['at_most'] else '>='} {goal['needed']:.2f}"
        got = "" if goal["achieved"] is None else f"{goal['achieved']:.3f}"
        print(f"  {goal['goal']:<58}{need:>9}{got:>8}  {goal['verdict']}")
    print(f"load average after: {info['load_average_after'][0]:.2f}")
    return {
        "machine": info,
        "images": {str(mp): {"source": d, "height": i.shape[0], "width": i.shape[1]} for mp, (i, d) in images.items()},
        "multiply_adds_per_pixel": macs,
        "tflop_per_megapixel": flop_px / 1e6,
        "roofline": {str(mp): p for mp, p in probes.items()},
        "rows": [{"contender": n, "size_mp": mp, **row} for (n, mp), row in rows.items()],
        "skipped": [{"contender": n, "size_mp": mp, "estimated_seconds": e} for n, mp, e in skipped],
        "ratios": ratios,
        "scaling": {name: {str(mp): v for mp, v in s.items()} for name, s in scaling.items()},
        "max_abs_difference_to_fp32": agreement,
        "bf16_error_on_samples": errors,
        "goals": goals,
    }


def _goals(args, info, rows, probes, scaling) -> list[dict]:
    """Each goal of the speed issue: what it needs, what this run reached, met or missed (or why not judged)."""
    native = info["bf16"]["native"]
    # the goals are at 1 MP: there, or at the largest size where both fp32 and bf16 were measured
    both = [
        mp for mp in args.sizes if "s_per_mp" in rows.get(("fp32", mp), {}) and "s_per_mp" in rows.get(("bf16", mp), {})
    ]
    at = 1.0 if 1.0 in both else max(both, default=args.sizes[0])
    fp32, b16 = rows.get(("fp32", at), {}), rows.get(("bf16", at), {})
    smallest = args.sizes[0]
    goal, why = bf16_goal(info, probes.get(at, {}).get("ratio"))
    both = "seconds_median" in fp32 and "seconds_median" in b16
    speedup = fp32["seconds_median"] / b16["seconds_median"] if both else None
    out = []

    def add(text: str, needed: float | None, achieved: float | None, at_most: bool = False, note: str = "") -> None:
        if achieved is None or needed is None:
            verdict = f"n/a{': ' + note if note else ''}"
        else:
            met = achieved <= needed if at_most else achieved >= needed
            verdict = ("met" if met else "MISSED") + (f" ({note})" if note else "")
        out.append({"goal": text, "needed": needed, "achieved": achieved, "at_most": at_most, "verdict": verdict})

    worst_scaling = max(scaling["bf16"].values()) if "bf16" in scaling else None
    add(
        f"bf16 s/MP at every size <= {SCALING_GOAL}x the smallest's",
        SCALING_GOAL,
        worst_scaling,
        True,
        "" if native else "bf16 emulated",
    )
    add(f"bf16 speed-up over fp32 at {at} MP", goal, speedup, note=why)
    fp32_conv = fp32.get("conv_share")
    add(
        f"fp32 non-convolution time <= {FP32_NON_CONV_GOAL:.0%} at {at} MP",
        FP32_NON_CONV_GOAL,
        None if fp32_conv is None else 1 - fp32_conv,
        True,
    )
    add(
        f"fp32 >= {FP32_ROOFLINE_GOAL:.0%} of the fp32 roofline at {at} MP",
        FP32_ROOFLINE_GOAL,
        fp32.get("roofline_fraction"),
    )
    add(f"detector < half of bf16 time at {at} MP", 0.5, b16.get("detector_share"), True)
    base = rows.get(("fp32", smallest), {})
    for name, text, needed, key, at_most in (
        ("compile", f"torch.compile (freezing) >= {COMPILE_GOAL}x eager fp32", COMPILE_GOAL, "speed", False),
        ("onnxruntime", "ONNX Runtime >= eager fp32 speed", 1.0, "speed", False),
        ("onnxruntime", f"ONNX Runtime peak <= {ORT_MEMORY_GOAL}x eager fp32's", ORT_MEMORY_GOAL, "memory", True),
        ("onnxruntime-lean", "ONNX Runtime (lean options) >= eager fp32 speed", 1.0, "speed", False),
        (
            "onnxruntime-lean",
            f"ONNX Runtime (lean) peak <= {ORT_MEMORY_GOAL}x eager's",
            ORT_MEMORY_GOAL,
            "memory",
            True,
        ),
    ):
        row = rows.get((name, smallest), {})
        if "seconds_median" not in row or "seconds_median" not in base:
            continue
        speed, memory = base["seconds_median"] / row["seconds_median"], row["peak_rss_gb"] / base["peak_rss_gb"]
        achieved = speed if key == "speed" else memory
        add(f"{text} ({smallest} MP)", needed, achieved, at_most)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="image sizes in MP, ascending")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: sizes {QUICK_SIZES}, fp32 and bf16")
    parser.add_argument(
        "--budget-minutes", type=float, default=DEFAULT_BUDGET_MINUTES, help="skip what would overrun this"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender and size (median, min, max)")
    parser.add_argument("--threads", type=int, help="threads for every contender (default: torch's default)")
    parser.add_argument("--weights", help="weights to use instead of synthetic ones (.safetensors, .pt or .h5)")
    parser.add_argument("--error-megapixels", type=float, default=0.1, help="size of each sample for the bf16 error")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_CONTENDERS),
        help=f"comma-separated contenders of {','.join(CONTENDERS)} (default: {','.join(DEFAULT_CONTENDERS)})",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    for hidden in ("--image", "--result", "--output-map"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.repeats < 3:
        parser.error("--repeats must be at least 3 (a median, a min and a max)")
    if args.quick:
        args.sizes = ",".join(map(str, QUICK_SIZES))
        args.error_megapixels = min(args.error_megapixels, 0.02)
        if args.only == ",".join(DEFAULT_CONTENDERS):
            args.only = "fp32,bf16"
    try:
        args.sizes = sorted(float(s) for s in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes must be numbers of megapixels separated by commas, got {args.sizes!r}")
    unknown = set(args.only.split(",")) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {','.join(CONTENDERS)}")
    out = report(args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
