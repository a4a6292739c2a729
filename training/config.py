"""What a training run is asked to do: ``TrainConfig``, checked in one place before any work starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mantranet_torch.config import ManTraNetConfig
from mantranet_torch.precision import PRECISIONS
from mantranet_torch.training import FREEZE_CHOICES

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "plateau", "constant")
BN_MODES = ("batch", "frozen")  # bnorm on the batch's statistics (Keras' training), or on its moving statistics
RECURRENT = ("lstm", "gru")
ENGINES = ("local", "ray")
BEST_METRICS = ("pixel_auc", "pooled_auc", "pixel_f1_best", "pixel_f1_fixed", "image_auc", "loss")
TRAIN_PRECISIONS = tuple(p for p in PRECISIONS if p != "tf32")  # fp32, bf16, auto
DEFAULT_LR = {"adam": 1e-4, "adamw": 1e-4, "sgd": 1e-3}  # fine-tuning rates; Keras' own defaults are 10x these
SGD_MOMENTUM = 0.9
ADAMW_WEIGHT_DECAY = 1e-2
MAX_BAD_STEPS = 5  # non-finite steps in a row before a run stops


class TrainError(ValueError):
    """A run that cannot start or go on; the message is one line and names the file, option or step at fault."""


@dataclass
class TrainConfig:
    """One training run. Paths may be str; ``check()`` is called by ``train``.

    Args:
        output: the run folder (model.safetensors and its manifest, checkpoint.pt, metrics.jsonl, report).
        data: a manifest or benchmark folder ``evaluate`` reads (random native-resolution crops of it); or
        synthetic: a folder of authentic photographs to make forgeries from on the fly. Exactly one.
        val: a manifest or folder to validate on every ``val_every`` steps (pixel AUC, F1, image AUC).
        init: "release:N" (the official release through ``converter.pretrained``), a weight file
            (``converter.load_weights``) or "scratch" (release ``variant``'s architecture, or ``architecture``).
        variant: the release whose architecture a scratch model (or an ambiguous file) takes.
        architecture: a scratch model's config (overrides ``variant``; Python only, e.g. small windows in tests).
        steps: optimiser steps.
        batch: images per step on each process.
        crop: the crops' side in pixels (at native resolution).
        seed: the seed of everything (model initialisation, crops, flips, forgeries, order).
        checkpoint_every: steps between checkpoints (and validations, unless ``val_every``).
        resume: continue the run in ``output`` from its checkpoint.
        freeze: "none", "first5" or "featex" (``mantranet_torch.training.freeze``).
        bn: "batch" (the batch's statistics, as Keras trains) or "frozen" (the moving statistics, not updated).
        recurrent: "lstm" (the official layer) or "gru" (the ConvGRU variant, initialised from the parent but for
            its recurrent layer).
        precision: "fp32", "bf16" (the feature extractor under bfloat16 autocast; the detector in float32) or
            "auto" (bf16 where native).
        optimizer: "adam" (``KerasAdam``: Keras' Adam, epsilon 1e-7), "adamw" (``torch.optim.AdamW``) or "sgd"
            (``KerasSGD``, momentum 0.9).
        lr: the peak learning rate (default ``DEFAULT_LR[optimizer]``).
        schedule: "cosine" (to 0 at the last step), "plateau" (halved after ``patience`` validations without
            improvement of ``best_metric``) or "constant"; all after ``warmup`` linear warm-up steps.
        clip_grad: the gradients' global L2 norm is clipped to this (None: no clipping).
        accumulate: micro-batches of ``batch`` per optimiser step.
        pos_weight: weight of the forged pixels in the binary cross-entropy (None: 1).
        dice: weight of a soft Dice loss on sigmoid(logits) added to the cross-entropy (0: none).
        checkpoint_activations: recompute the feature extractor's activations in the backward pass, block by
            block (``torch.utils.checkpoint``): less memory, about a third more compute.
        max_memory: a budget in GB: the run is refused, naming a crop and batch that fit, when its modelled peak
            exceeds it (activation checkpointing is switched on first if that is enough).
        engine: "local" (this process, or a ``torchrun`` group) or "ray" (Ray Train's TorchTrainer).
        workers: processes for ``engine="ray"``.
        tensorboard: also write TensorBoard event files (needs the ``train`` extra).
        val_every: steps between validations (default ``checkpoint_every``).
        best_metric: the validation metric that picks ``best.safetensors`` ("loss": the training loss).
        max_bad_steps: non-finite losses or gradients in a row that stop the run.
        workers_per_loader: DataLoader worker processes (0: load in the training process).
        deterministic: ``torch.use_deterministic_algorithms`` (resumed runs then end bit-identical on CPU).
        device: "cpu", "cuda", or None (CUDA when available).
        threads: torch threads (None: torch's default).
        keep_examples: validation images drawn in the report.
        time_limit: seconds of steps (from the first, after set-up and the first validation) after which the run
            ends early, at the end of a step, with its validation, checkpoint and outputs (the schedule still
            counts ``steps``).
    """

    output: Path
    data: Path | None = None
    synthetic: Path | None = None
    val: Path | None = None
    init: str = "scratch"
    variant: int | None = None
    architecture: ManTraNetConfig | None = None
    steps: int = 1000
    batch: int = 8
    crop: int = 256
    seed: int = 0
    checkpoint_every: int = 100
    resume: bool = False
    freeze: str = "none"
    bn: str = "batch"
    recurrent: str = "lstm"
    precision: str = "fp32"
    optimizer: str = "adam"
    lr: float | None = None
    schedule: str = "cosine"
    warmup: int = 0
    clip_grad: float | None = None
    accumulate: int = 1
    pos_weight: float | None = None
    dice: float = 0.0
    checkpoint_activations: bool = False
    max_memory: float | None = None
    engine: str = "local"
    workers: int = 2
    tensorboard: bool = False
    val_every: int | None = None
    best_metric: str = "pixel_auc"
    patience: int = 3
    max_bad_steps: int = MAX_BAD_STEPS
    workers_per_loader: int = 0
    deterministic: bool = True
    device: str | None = None
    threads: int | None = None
    keep_examples: int = 4
    time_limit: float | None = None
    data_options: dict = field(default_factory=dict)

    def check(self) -> None:
        """Refuse nonsense values before anything is read or written. Raises TrainError naming the option."""
        self.output = Path(self.output)
        if (self.data is None) == (self.synthetic is None):
            raise TrainError("give either a dataset (--data MANIFEST) or a folder of photographs (--synthetic DIR)")
        choices = {
            "freeze": FREEZE_CHOICES, "bn": BN_MODES, "recurrent": RECURRENT, "precision": TRAIN_PRECISIONS,
            "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "engine": ENGINES, "best_metric": BEST_METRICS,
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r}: choose one of {', '.join(allowed)}"
                )
        for name in (
            "steps",
            "batch",
            "crop",
            "checkpoint_every",
            "accumulate",
            "max_bad_steps",
            "workers",
            "patience",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainError(f"--{name.replace('_', '-')} {value!r}: must be a positive integer")
        if self.crop < 8:
            raise TrainError(f"--crop {self.crop}: the model needs crops of at least 8 pixels")
        if self.val_every is not None and self.val_every < 1:
            raise TrainError(f"--val-every {self.val_every}: must be a positive integer")
        for name in ("warmup", "workers_per_loader", "keep_examples"):
            if getattr(self, name) < 0:
                raise TrainError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be 0 or more")
        for name in ("lr", "clip_grad", "pos_weight", "max_memory", "time_limit"):
            value = getattr(self, name)
            if value is not None and not (0 < value < math.inf):
                raise TrainError(f"--{name.replace('_', '-')} {value}: must be a positive, finite number")
        if not (0 <= self.dice < math.inf):
            raise TrainError(f"--dice {self.dice}: must be a finite number >= 0")
        if self.init != "scratch" and not self.init.startswith("release:") and self.architecture is not None:
            raise TrainError("an architecture is for --init scratch only: a weight file carries its own")
        if self.init.startswith("release:"):
            index = self.init.removeprefix("release:")
            if not index.isdigit():
                raise TrainError(f"--init {self.init}: expected release:N with N a release number (0-4)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    @property
    def validate_every(self) -> int:
        return self.val_every or self.checkpoint_every

    def to_dict(self) -> dict:
        """As JSON: paths as strings, the architecture as its dict."""
        d = asdict(self)
        for key, value in d.items():
            if isinstance(value, Path):
                d[key] = str(value)
        d["architecture"] = self.architecture.to_dict() if self.architecture else None
        return d

    def resumable_with(self, saved: dict) -> list[str]:
        """The options that differ from those ``saved`` (a checkpoint's config) in a way a resume cannot honour."""
        fixed = ("data", "synthetic", "init", "variant", "batch", "crop", "seed", "freeze", "bn", "recurrent",
                 "optimizer", "schedule", "accumulate", "precision", "architecture")  # fmt: skip
        now = self.to_dict()
        return [name for name in fixed if now.get(name) != saved.get(name)]
