"""Training throughput: images/s and peak memory of one training step, ours against the earlier port's
computation and the original Keras model under tf_keras, on the same batch.

Each contender runs in a fresh process (so that its peak resident memory is its own): a warm-up step, then
``--repeats`` timed steps of ``--batch`` crops. Ours: ``training.engine.forward_logits`` + BCE on logits +
backward + ``KerasAdam`` + ``apply_constraints``, at fp32 and bf16, with and without activation checkpointing.
The earlier port (``benchmarks/naive_port.py``): its forward, BCE on its sigmoid output, backward, torch's Adam.
Keras: the official ``create_model`` (``../shared/official/modelCore.py``, under tf_keras) compiled with Adam and
binary cross-entropy, ``train_on_batch``, its constraints off (the original's Bayar constraint assigns to a
variable in place, as TensorFlow 1 allowed and TensorFlow 2 refuses; the constraints cost little). All start
from the same weights (a stand-in of release 4's layout, or ``--weights``). Ratios are printed from one run;
run on an idle machine.

    python benchmarks/bench_training.py            # 256 and 512 px, batch 4
    python benchmarks/bench_training.py --quick    # 128 px, batch 2, one timed step: a minute or two
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = ("ours-fp32", "ours-fp32-ckpt", "ours-bf16", "ours-bf16-ckpt", "earlier-port", "keras")


def batch_of(size: int, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
    y = np.zeros((batch, 1, size, size), np.float32)
    y[:, :, size // 4 : size // 2, size // 4 : size // 2] = 1
    return x, y


def worker(name: str, size: int, batch: int, repeats: int, weights: Path) -> dict:
    """One contender's timed steps in this process; returns seconds per step and peak resident bytes."""
    x, y = batch_of(size, batch)
    if name == "keras":
        from parity_tests.shared_data import OFFICIAL_CODE
        from reference.official import OfficialModel, find_official_code

        official = OfficialModel(find_official_code(OFFICIAL_CODE), weights)
        import tf_keras

        model = official.model
        for weight in model.weights:  # the original's Bayar constraint assigns in place (TF 1), which TF 2 refuses
            weight._constraint = None
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-4), loss="binary_crossentropy")
        xk, yk = x.transpose(0, 2, 3, 1), y.transpose(0, 2, 3, 1)

        def step() -> None:
            model.train_on_batch(xk, yk)
    else:
        import torch

        from converter import load_weights
        from mantranet_torch.training import KerasAdam, apply_constraints

        model = load_weights(weights, variant=4)
        model.train()
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        if name == "earlier-port":
            sys.path.insert(0, str(REPO / "benchmarks"))
            from naive_port import NaivePort

            port = NaivePort(model).train()
            optimizer = torch.optim.Adam(port.parameters(), lr=1e-4)

            def step() -> None:
                out = port(xt).clamp(1e-7, 1 - 1e-7)
                torch.nn.functional.binary_cross_entropy(out, yt).backward()
                optimizer.step()
                optimizer.zero_grad()
        else:
            from training.engine import forward_logits, training_loss

            precision = "bf16" if "bf16" in name else "fp32"
            checkpointed = name.endswith("ckpt")
            optimizer = KerasAdam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

            def step() -> None:
                training_loss(forward_logits(model, xt, precision, checkpointed), yt).backward()
                optimizer.step()
                apply_constraints(model)
                optimizer.zero_grad()

    step()  # warm-up: kernels chosen, optimiser state allocated
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": float(np.median(times)), "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def spawn(name: str, size: int, args: argparse.Namespace, weights: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--sizes", str(size), "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--weights", str(weights)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"over {args.timeout} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each contender")
    parser.add_argument("--weights", type=Path, help="ManTraNet_Ptrain4.h5 (default: a stand-in of its layout)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per contender and size")
    parser.add_argument("--quick", action="store_true", help="128 px, batch 2, one timed step")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.batch, args.repeats = [128], 2, 1
    if args.worker:
        print(json.dumps(worker(args.worker, args.sizes[0], args.batch, args.repeats, args.weights)))
        return
    from parity_tests.official_files import official_code_missing

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            from converter.synthetic import write_standin

            weights = write_standin(
                Path(tmp) / "ManTraNet_Ptrain4.h5", 4, 0
            )  # named: the official code identifies by name
        missing = official_code_missing()
        results = {}
        for size in args.sizes:
            for name in args.contenders:
                if name == "keras" and missing:
                    results[(name, size)] = {"error": f"skipped: {missing}"}
                    continue
                results[(name, size)] = spawn(name, size, args, weights)
                r = results[(name, size)]
                text = r.get("error") or (f"{args.batch / r['seconds']:7.2f} images/s  {r['seconds']:7.2f} s/step  "
                                          f"peak {r['peak_bytes'] / 2**30:5.2f} GB")  # fmt: skip
                print(f"{size:4d} px  {name:16s} {text}", flush=True)
    print("\nratios (images/s of ours-fp32 over each, same size, same batch):")
    for size in args.sizes:
        ours = results.get(("ours-fp32", size), {})
        for name in args.contenders:
            other = results.get((name, size), {})
            if name != "ours-fp32" and "seconds" in ours and "seconds" in other:
                print(f"{size:4d} px  ours-fp32 / {name:16s} {other['seconds'] / ours['seconds']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({f"{n}@{s}": r for (n, s), r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
