"""``mantranet train``: fine-tune or train ManTraNet (the logic is ``training.engine.train``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import progress
from .errors import CommandError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune or train ManTraNet on a dataset or on forgeries made from photographs",
        description="Train on random native-resolution crops of a dataset evaluate reads (--data), or of forgeries "
        "made on the fly from authentic photographs (--synthetic). RUN_DIR receives model.safetensors and its "
        "manifest (read by detect, evaluate, parity, export-keras, export-onnx), checkpoint.pt, best.safetensors, "
        "metrics.jsonl and report.html. The loss is binary cross-entropy on the logits; the original's weight "
        "constraints are applied after every step; --optimizer adam is Keras' Adam (epsilon 1e-7).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, metavar="MANIFEST", help="a manifest (.csv/.jsonl) or benchmark folder")
    source.add_argument("--synthetic", type=Path, metavar="DIR", help="a folder of authentic photographs")
    p.add_argument("--resize", type=int, metavar="LONG_SIDE", help="--data: scale images first (default: native)")
    p.add_argument("--resize-masks", action="store_true", help="--data: resize masks of another size, not skip them")
    p.add_argument("--val", type=Path, metavar="MANIFEST", help="held-out dataset validated on every --val-every steps")
    p.add_argument("--init", required=True, metavar="release:N|FILE|scratch", help="where the weights start")
    p.add_argument("--variant", type=int, help="release whose architecture --init scratch takes (default 4)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="RUN_DIR")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps")
    p.add_argument("--batch", type=int, default=8, help="crops per step on each process (default 8)")
    p.add_argument("--crop", type=int, default=256, help="crop side in pixels, at native resolution (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, metavar="K", help="steps between checkpoints")
    p.add_argument("--val-every", type=int, metavar="N", help="steps between validations (default: --checkpoint-every)")
    p.add_argument("--best-metric", default="pixel_auc", help="the validation metric best.safetensors is chosen by")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--freeze", default="none", help="none, first5 (b1c1..b2c2) or featex (train the detector only)")
    p.add_argument("--bn", default="batch", help="batch (batch statistics, as Keras trains) or frozen")
    p.add_argument("--recurrent", default="lstm", help="lstm (official) or gru (the ConvGRU variant)")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 (the feature extractor) or auto")
    p.add_argument("--optimizer", default="adam", help="adam (Keras' Adam), adamw or sgd (momentum 0.9)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-4 for adam/adamw, 1e-3 for sgd)")
    p.add_argument("--schedule", default="cosine", help="cosine, plateau or constant, after --warmup")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    p.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradients' global norm")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--pos-weight", type=float, help="weight of forged pixels in the cross-entropy")
    p.add_argument("--dice", type=float, default=0.0, metavar="W", help="add W times a soft Dice loss")
    p.add_argument("--checkpoint-activations", action="store_true", help="recompute the extractor's activations")
    p.add_argument("--max-memory", type=float, metavar="GB", help="refuse a step whose modelled peak exceeds this")
    p.add_argument("--engine", default="local", help="local (or under torchrun) or ray")
    p.add_argument("--workers", type=int, default=2, help="processes for --engine ray")
    p.add_argument("--ray-address", metavar="ADDRESS", help="a running Ray cluster (default: start a local one)")
    p.add_argument("--tensorboard", action="store_true", help="write TensorBoard logs into RUN_DIR/tensorboard")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="end the run early after this long")
    p.add_argument("--json", action="store_true", help="print the run's summary as JSON")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace):
    from training.config import TrainConfig

    data_options = {}
    if args.data is not None:  # forgeries made from photographs are cut at the crop's size: nothing to resize
        data_options = {"resize": args.resize, "resize_masks": args.resize_masks}
    return TrainConfig(
        output=args.output, data=args.data, synthetic=args.synthetic, val=args.val, init=args.init,
        variant=args.variant, steps=args.steps, batch=args.batch, crop=args.crop, seed=args.seed,
        checkpoint_every=args.checkpoint_every, resume=args.resume, freeze=args.freeze, bn=args.bn,
        recurrent=args.recurrent, precision=args.precision, optimizer=args.optimizer, lr=args.lr,
        schedule=args.schedule, warmup=args.warmup, clip_grad=args.clip_grad, accumulate=args.accumulate,
        pos_weight=args.pos_weight, dice=args.dice, checkpoint_activations=args.checkpoint_activations,
        max_memory=args.max_memory, engine=args.engine, workers=args.workers, tensorboard=args.tensorboard,
        val_every=args.val_every, best_metric=args.best_metric, workers_per_loader=args.loader_workers,
        threads=args.threads, device=args.device, time_limit=args.time_limit, data_options=data_options,
    )  # fmt: skip


class StepBar:
    """The run's progress on stderr: loss, lr, images/s and ETA (``progress.bar``), skips and validations as lines."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.bar = progress.bar(event["steps"], "train", unit="step", initial=event["resumed_from"] or 0)
        elif kind == "step" and self.bar is not None:
            self.bar.update(event["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}",
                                 img_s=f"{event['images_per_s']:.1f}")  # fmt: skip
        elif kind == "skip":
            progress.message(f"mantranet train: step {event['step']} skipped: {event['why']}")
        elif kind == "validation":
            metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in event["metrics"].items() if k != "images")
            progress.message(f"step {event['step']}: validation {metrics}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def run(args: argparse.Namespace) -> int:
    try:
        from training.config import TrainError
        from training.engine import train
    except ImportError as e:
        raise CommandError(
            f"train needs the train and eval extras: pip install 'mantranet-torch[train,eval]' ({e})"
        ) from None
    config = _config(args)
    bar = StepBar()
    try:
        if args.engine == "ray":
            from training.distributed import train_ray

            result = train_ray(config, progress=bar, address=args.ray_address)
        else:
            result = train(config, progress=bar)
    except TrainError as e:
        raise CommandError(str(e)) from None
    finally:
        bar.close()
    if os.environ.get("RANK", "0") != "0":  # a torchrun process other than the first: the first prints
        return 0
    if args.json:
        import json

        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from is not None else ""
    print(f"{result.output}: {result.steps} steps{resumed}, last loss {_fmt(result.loss)}, {result.seconds:.1f} s")
    if result.skipped_steps:
        print(f"skipped {len(result.skipped_steps)} step(s) with a non-finite loss or gradient: {result.skipped_steps}")
    for label, metrics in (("before", result.before), ("after", result.after)):
        if metrics:
            print(f"validation {label}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k != "images"))
    if result.best:
        best = result.best
        print(f"best {best['metric']} {best['value']:.4f} at step {best['step']}: {best['path']}")
    print(f"wrote {result.model} (and its manifest), report {result.output / 'report.html'}")
    for line in result.data_skips.get("files", []):
        print(f"mantranet train: skipped {line['name']}: {line['why']}", file=sys.stderr)
    return 0
