"""The training engine: ``train(TrainConfig) -> TrainingRun``, what ``mantranet train`` runs.

    from training import TrainConfig, train
    run = train(TrainConfig(output="runs/a", synthetic="photos/", init="release:4", freeze="featex",
                            steps=2000, batch=8, crop=256, val="held_out/manifest.csv"))
    run.model          # runs/a/model.safetensors, which detect, evaluate, parity and the exporters read

One optimiser step: ``accumulate`` micro-batches, each ``model.logits`` (the feature extractor under
``precision``, block by block recomputed in the backward pass when ``checkpoint_activations``; the detector in
float32) into ``binary_cross_entropy_with_logits`` (+ ``pos_weight``, + a soft Dice loss on the sigmoid), the
gradients averaged over the processes of a ``torchrun`` group, a step skipped when the loss or a gradient is
not finite, clipping, the optimiser (``KerasAdam`` by default: Keras' Adam), then the original's constraints
(``apply_constraints``). Every ``checkpoint_every`` steps a checkpoint (``training.checkpoint``); every
``val_every`` steps a validation (``training.validate``), which keeps ``best.safetensors``.

Determinism: every sample is a pure function of (seed, epoch, index) (``training.data``), the checkpoint holds
every state the loop reads, and CPU kernels run deterministically, so a run killed and resumed on CPU ends
with the same bits as one that was not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

import mantranet_torch
from mantranet_torch import ManTraNet, ManTraNetConfig, release_config
from mantranet_torch.files import FileError, check_writable_folder, write_files_atomic
from mantranet_torch.layers import l2_normalize_tf
from mantranet_torch.memory import available_memory
from mantranet_torch.model import FEATEX_LAYERS
from mantranet_torch.precision import float32_precision, resolve_precision
from mantranet_torch.tiling import autocast
from mantranet_torch.training import KerasAdam, KerasSGD, apply_constraints, freeze
from mantranet_torch.weights import WeightFileError, encode_safetensors, manifest_path

from . import memory as train_memory
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_states, save_checkpoint, set_rng_states
from .config import ADAMW_WEIGHT_DECAY, SGD_MOMENTUM, TrainConfig, TrainError
from .data import EpochSampler, Skips, collate, open_training_data
from .distributed import sync_batch_norm
from .synthetic import DataError
from .validate import Validation, load_validation_set, validate

MODEL_NAME = "model.safetensors"
BEST_NAME = "best.safetensors"
METRICS_NAME = "metrics.jsonl"
DICE_SMOOTH = 1.0  # added to the Dice quotient's both sides: a batch with no forged pixel gives a finite loss
PLATEAU_FACTOR = 0.5

Progress = Callable[[dict], None]


@dataclass
class TrainingRun:
    """What a run did.

    Attributes:
        output: the run folder.
        model: the trained weights (``model.safetensors``, with its ``.json`` manifest).
        steps: optimiser steps done (skipped steps included), of ``config.steps``.
        resumed_from: the step the run resumed at (None: started afresh).
        skipped_steps: steps skipped for a non-finite loss or gradient, with their step numbers.
        loss: the last step's training loss.
        history: one dict per step (step, loss, lr, images_per_s) and per validation (step, val).
        before, after: validation metrics at the start and at the end (None without ``val``).
        best: the best validation (metric, value, step) and its weights' path.
        data_skips: files left out or skipped while reading (``training.data.Skips.to_dict``).
        report: the report's files.
        seconds: wall time of this process's part of the run.
    """

    output: Path
    model: Path
    steps: int
    resumed_from: int | None
    skipped_steps: list[int]
    loss: float | None
    history: list[dict]
    before: dict | None = None
    after: dict | None = None
    best: dict | None = None
    data_skips: dict = field(default_factory=dict)
    report: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["output"], d["model"] = str(self.output), str(self.model)
        d["report"] = [str(p) for p in self.report]
        if self.best:
            d["best"] = {**self.best, "path": str(self.best["path"])}
        return d


# ------------------------------------------------------------------------------------------------ the pieces


def training_loss(logits: Tensor, mask: Tensor, pos_weight: float | None = None, dice: float = 0.0) -> Tensor:
    """Binary cross-entropy on the logits (never on sigmoid outputs), plus ``dice`` times a soft Dice loss.

    Args:
        logits: N x 1 x H x W, ``model.logits(x)``.
        mask: N x 1 x H x W in {0, 1}.
        pos_weight: weight of the forged pixels' terms (``binary_cross_entropy_with_logits``' pos_weight).
        dice: weight of ``1 - (2 |p m| + 1) / (|p| + |m| + 1)`` with p = sigmoid(logits), over the batch.

    Returns:
        The mean loss, a float32 scalar.
    """
    logits = logits.float()
    weight = None if pos_weight is None else torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, mask, pos_weight=weight)
    if dice:
        p = torch.sigmoid(logits)
        overlap = (p * mask).sum()
        loss = loss + dice * (1 - (2 * overlap + DICE_SMOOTH) / (p.sum() + mask.sum() + DICE_SMOOTH))
    return loss


def forward_logits(model: ManTraNet, x: Tensor, precision: str = "fp32", checkpointed: bool = False) -> Tensor:
    """``model.logits(x)`` with the feature extractor under ``precision``'s autocast (the detector, and so the
    statistics of bnorm, glbStd, the window means and divStd, in float32) and, when ``checkpointed``, each of its
    layers recomputed in the backward pass instead of kept (``torch.utils.checkpoint``)."""
    featex = model.featex
    with autocast(x.device.type, precision):
        h = x
        for name in FEATEX_LAYERS[:-1]:
            layer = getattr(featex, name)
            recompute = checkpointed and torch.is_grad_enabled()
            h = checkpoint(layer, h, use_reentrant=False) if recompute else layer(h)
        features = l2_normalize_tf(h, dim=1)
    return model.detector.logits(features.to(x.dtype))


class Schedule:
    """The learning rate of each step: linear warm-up, then cosine to 0, constant, or halved on a plateau.

    A small class of its own rather than ``torch.optim.lr_scheduler``'s: warm-up followed by a plateau rule is
    not one of torch's schedulers, and the lr here is a pure function of the step and ``state_dict``.
    """

    def __init__(self, kind: str, lr: float, steps: int, warmup: int = 0, patience: int = 3) -> None:
        self.kind, self.base, self.steps, self.warmup, self.patience = kind, lr, steps, warmup, patience
        self.factor, self.best, self.waited = 1.0, None, 0

    def lr(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based)."""
        if step < self.warmup:
            return self.base * (step + 1) / (self.warmup + 1)
        if self.kind == "cosine":
            progress = (step - self.warmup) / max(self.steps - self.warmup, 1)
            return self.base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.base * self.factor

    def observe(self, value: float, higher_is_better: bool) -> None:
        """A validation's value of the chosen metric: ``plateau`` halves the rate after ``patience`` without
        improvement."""
        if self.kind != "plateau" or not math.isfinite(value):
            return
        better = self.best is None or (value > self.best if higher_is_better else value < self.best)
        if better:
            self.best, self.waited = value, 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            self.factor, self.waited = self.factor * PLATEAU_FACTOR, 0

    def state_dict(self) -> dict:
        return {"factor": self.factor, "best": self.best, "waited": self.waited}

    def load_state_dict(self, state: dict) -> None:
        self.factor, self.best, self.waited = state["factor"], state["best"], state["waited"]


def make_optimizer(config: TrainConfig, params: list[Tensor]) -> torch.optim.Optimizer:
    lr = config.learning_rate
    if config.optimizer == "adam":
        return KerasAdam(params, lr=lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
    return KerasSGD(params, lr=lr, momentum=SGD_MOMENTUM)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _state_sha256(model: ManTraNet) -> str:
    """SHA-256 of a model's weights as this project encodes them (no provenance)."""
    return hashlib.sha256(encode_safetensors(model.state_dict(), model.config, {})).hexdigest()


def build_model(config: TrainConfig) -> tuple[ManTraNet, dict]:
    """The model a run starts from, and its parent's description (for the manifest).

    Raises:
        TrainError: a release that cannot be had, a weight file that cannot be read, an unknown variant.
    """
    from converter import ConversionError, load_weights, pretrained

    try:
        if config.init == "scratch":
            architecture = config.architecture or release_config(4 if config.variant is None else config.variant)
            model = ManTraNet(architecture)  # drawn from torch's generator, seeded by the run
            parent = {"name": "scratch", "seed": config.seed}
        elif config.init.startswith("release:"):
            index = int(config.init.removeprefix("release:"))
            release_config(index)  # an unknown release is named before any download
            model = pretrained(index)
            parent = {"name": f"release:{index}"}
        else:
            path = Path(config.init)
            if not path.exists():
                raise TrainError(f"--init {path}: no such file (expected release:N, scratch or a weight file)")
            model = load_weights(path, config.variant, quiet=True)
            parent = {"name": path.name, "sha256": _sha256(path)}
    except (ConversionError, WeightFileError, ValueError) as e:
        if isinstance(e, TrainError):
            raise
        raise TrainError(str(e)) from None
    parent["weights_sha256"] = _state_sha256(model)
    parent["config"] = model.config.to_dict()
    if config.recurrent != getattr(model.config, "recurrent", "lstm"):
        model = _with_recurrent(model, config.recurrent, parent)
    return model, parent


def _with_recurrent(model: ManTraNet, recurrent: str, parent: dict) -> ManTraNet:
    """The parent's arrays in a model whose recurrent layer is ``recurrent`` (that layer's own arrays drawn)."""
    if "recurrent" not in {f.name for f in dataclasses.fields(ManTraNetConfig)}:
        raise TrainError(f"--recurrent {recurrent}: this version of the model has the ConvLSTM only")
    from mantranet_torch.transfer import init_from

    variant = ManTraNet(dataclasses.replace(model.config, recurrent=recurrent))
    done = init_from(variant, model)
    parent["initialisation"] = done.describe()
    parent["left_at_initialisation"] = list(done.left)
    return variant


def dataset_record(config: TrainConfig, data: object) -> dict:
    """What the manifest says of the training data: the manifest's hash, or the synthetic recipe and seed."""
    if config.data is not None:
        source = Path(config.data)
        record = {"kind": "dataset", "path": str(source)}
        if source.is_file():
            record["sha256"] = _sha256(source)
        else:
            names = sorted(str(e.name) for e in getattr(data, "entries", []))
            record["listing_sha256"] = hashlib.sha256("\n".join(names).encode()).hexdigest()
        return record
    forgeries = data.forgeries
    recipe = getattr(forgeries, "recipe", None)
    return {
        "kind": "synthetic",
        "path": str(config.synthetic),
        "seed": config.seed,
        "recipe": recipe.to_dict() if recipe is not None else None,
    }


# ------------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class Group:
    """This process among the data-parallel ones (``torchrun`` sets RANK and WORLD_SIZE)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Group:
        """The group ``torchrun`` (RANK, WORLD_SIZE) or Ray Train (an initialised process group) started."""
        import torch.distributed as dist

        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
                return cls()
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def broadcast(self, value: float | None) -> float | None:
        """The first process's ``value`` in every process (validation runs on the first only)."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average(self, tensors: list[Tensor]) -> None:
        """Average ``tensors`` in place over the group (one flat all-reduce)."""
        if self.world == 1 or not tensors:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


# ------------------------------------------------------------------------------------------------ the run


def _device(config: TrainConfig) -> torch.device:
    if config.device:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _metrics_lines(path: Path, upto: int) -> list[dict]:
    """The records of ``metrics.jsonl`` up to step ``upto`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(record, dict) and record.get("step", math.inf) <= upto:
            kept.append(record)
    return kept


def _write_weights(target: Path, model: ManTraNet, provenance: dict) -> dict:
    """Write the weights and their manifest together (``convert``'s format: detect, evaluate, parity and the
    exporters read it). Returns the manifest."""
    data = encode_safetensors(model.state_dict(), model.config, provenance)
    manifest = {**provenance, "output": {"name": target.name, "sha256": hashlib.sha256(data).hexdigest(),
                                         "size": len(data)}}  # fmt: skip
    text = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    try:
        write_files_atomic({target: data, manifest_path(target): text}, force=True)
    except FileError as e:
        raise TrainError(str(e)) from None
    return manifest


def train(config: TrainConfig, progress: Progress | None = None) -> TrainingRun:
    """Train ManTraNet as ``config`` says; see the module docstring.

    Args:
        config: the run.
        progress: called with a dict per event: {"event": "step", "step", "steps", "loss", "lr", "images_per_s"},
            {"event": "skip", "step", "why"}, {"event": "validation", "step", "metrics"}, {"event": "checkpoint",
            "step", "path"}, {"event": "start", "steps", "resumed_from"}.

    Returns:
        The ``TrainingRun``.

    Raises:
        TrainError: bad options or data, a model that cannot be had, too many non-finite steps in a row, a
            checkpoint that cannot be written (the last good one is kept and named), a budget too small.
    """
    start_time = time.perf_counter()
    config.check()
    emit = progress or (lambda event: None)
    device = _device(config)
    precision = resolve_precision(config.precision, device)
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    group = Group.from_env(device)
    output = config.output
    ckpt_path = output / CHECKPOINT_NAME
    if group.main:
        try:
            check_writable_folder(output)
        except FileError as e:
            raise TrainError(str(e)) from None
    if not config.resume and ckpt_path.exists():
        raise TrainError(f"{output}: holds a checkpoint of an earlier run; pass --resume to continue it, or choose "
                         "another -o")  # fmt: skip
    saved = load_checkpoint(ckpt_path) if config.resume else None
    if saved is not None:
        differ = config.resumable_with(saved["config"])
        if differ:
            names = ", ".join("--" + n.replace("_", "-") for n in differ)
            raise TrainError(f"{ckpt_path}: the run was started with other {names}; resume with the same options")

    torch.manual_seed(config.seed)
    try:
        data = open_training_data(config.data, config.synthetic, config.crop, config.seed, **config.data_options)
    except DataError as e:
        raise TrainError(str(e)) from None
    if len(data) == 0:
        raise TrainError(f"{config.data or config.synthetic}: no usable training image")
    val_set = load_validation_set(config.val) if config.val is not None else None
    model, parent = build_model(config)
    model.to(device)
    if group.world > 1 and config.bn == "batch":
        sync_batch_norm(model)  # the batch's statistics over every process's share, as one process would have them
    frozen = freeze(model, config.freeze)
    trainable = [p for p in model.parameters() if p.requires_grad]
    config.checkpoint_activations = train_memory.fit(config, model, device, frozen)

    optimizer = make_optimizer(config, trainable)
    schedule = Schedule(config.schedule, config.learning_rate, config.steps, config.warmup, config.patience)
    sampler = EpochSampler(data, config.batch, config.seed, group.rank, group.world)
    step, bad_in_row, skipped, best, before = 0, 0, [], None, None
    history: list[dict] = []
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        sampler.set_epoch(saved["epoch"], saved["position"])
        step, skipped, best, before = saved["step"], list(saved["skipped"]), saved["best"], saved["before"]
        history = _metrics_lines(output / METRICS_NAME, step)
        set_rng_states(saved["rng"])
    resumed_from = step if saved is not None else None
    skips = Skips.of(data)
    best_metric = config.best_metric if val_set is not None else "loss"  # without --val: the training loss
    higher = best_metric != "loss"
    writer = _tensorboard(output, config) if group.main else None
    if best is not None:
        best["path"] = Path(best["path"])

    def state() -> dict:
        return {
            "step": step, "epoch": sampler.epoch, "position": sampler.position, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": rng_states(),
            "skipped": skipped, "best": None if best is None else {**best, "path": str(best["path"])},
            "before": before, "config": config.to_dict(),
        }  # fmt: skip

    def provenance(steps_done: int, final: dict | None) -> dict:
        return {
            "source": parent, "training": {"data": dataset_record(config, data), "steps": steps_done,
                                           "options": config.to_dict(), "final_metrics": final,
                                           "skipped_steps": skipped},
            "config": model.config.to_dict(),
            "tool": {"name": "mantranet-torch", "version": mantranet_torch.__version__},
        }  # fmt: skip

    def log(record: dict) -> None:
        history.append(record)
        if group.main:
            with (output / METRICS_NAME).open("a") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                for key, value in _scalars(record):
                    writer.add_scalar(key, value, record["step"])

    def run_validation() -> Validation | None:
        if val_set is None or not group.main:
            return None
        result = validate(model, val_set, precision, config.keep_examples)
        model.train(True)
        _bn_mode(model, config.bn)
        return result

    if group.main:
        (output / METRICS_NAME).write_text("".join(json.dumps(r) + "\n" for r in history))
    emit({"event": "start", "steps": config.steps, "resumed_from": resumed_from})

    with float32_precision("bf16" if precision == "bf16" else "fp32"):
        if saved is None:
            first = run_validation()
            if first is not None:
                before = first.metrics
                log({"step": 0, "val": before})
                emit({"event": "validation", "step": 0, "metrics": before})
                value = before.get(best_metric) if higher else None
                if value is not None and math.isfinite(value):  # the parent is a candidate too
                    best = {"metric": best_metric, "value": value, "step": 0, "path": output / BEST_NAME}
                    _write_weights(output / BEST_NAME, model, provenance(0, {best_metric: value}))
            if group.main:
                save_checkpoint(ckpt_path, state())  # step 0: there is always a last good checkpoint
        model.train(True)
        _bn_mode(model, config.bn)
        batches = _batches(data, sampler, config, device)
        last_loss, last_validation = None, None
        examples_per_step = config.batch * config.accumulate * group.world
        loop_start = time.perf_counter()  # --time-limit counts the steps, not the set-up and first validation
        while step < config.steps:
            tick = time.perf_counter()
            lr = schedule.lr(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            buffers = {k: v.clone() for k, v in model.named_buffers()}
            total = torch.zeros((), device=device)
            try:
                for _ in range(config.accumulate):
                    batch = next(batches)
                    skips.update(batch["meta"])
                    logits = forward_logits(model, batch["image"], precision, config.checkpoint_activations)
                    loss = training_loss(logits, batch["mask"], config.pos_weight, config.dice) / config.accumulate
                    loss.backward()
                    total += loss.detach()
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
                if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "memory" not in str(e).lower():
                    raise
                del e
                optimizer.zero_grad(set_to_none=True)
                hint = train_memory.out_of_memory_hint(config, model, available_memory(device))
                raise TrainError(
                    f"out of memory in step {step + 1} ({config.batch} crops of {config.crop} px); what fits the "
                    f"memory available now: {hint}; the last good checkpoint is {ckpt_path}"
                ) from None
            grads = [p.grad for p in trainable if p.grad is not None]
            group.average([total, *grads])
            finite = bool(torch.isfinite(total)) and all(bool(torch.isfinite(g).all()) for g in grads)
            if finite:
                if config.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, config.clip_grad)
                optimizer.step()
                apply_constraints(model)
                bad_in_row = 0
            else:
                with torch.no_grad():  # the moving statistics must not keep a non-finite batch's moments
                    for name, value in model.named_buffers():
                        value.copy_(buffers[name])
                skipped.append(step + 1)
                bad_in_row += 1
                emit({"event": "skip", "step": step + 1, "why": "non-finite loss or gradient"})
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - tick
            last_loss = float(total)
            log({"step": step, "loss": last_loss, "lr": lr, "images_per_s": examples_per_step / max(seconds, 1e-9),
                 "skipped": not finite})  # fmt: skip
            emit({"event": "step", "step": step, "steps": config.steps, "loss": last_loss, "lr": lr,
                  "images_per_s": examples_per_step / max(seconds, 1e-9)})  # fmt: skip
            if bad_in_row >= config.max_bad_steps:
                good = load_checkpoint(ckpt_path)["step"] if ckpt_path.is_file() else 0
                raise TrainError(
                    f"stopped at step {step}: the loss or a gradient was not finite in {bad_in_row} steps in a row "
                    f"({len(skipped)} skipped in all); the last good checkpoint is {ckpt_path} (step {good}). "
                    "Lower --lr, add --clip-grad, or use --precision fp32"
                )
            if step % config.validate_every == 0 or step == config.steps:
                result = run_validation()
                if result is not None:
                    last_validation = result
                    log({"step": step, "val": result.metrics})
                    emit({"event": "validation", "step": step, "metrics": result.metrics})
                value = result.metrics.get(best_metric) if result is not None and higher else last_loss
                value = group.broadcast(value) if higher else value
                if value is not None and math.isfinite(value):
                    schedule.observe(value, higher)
                    if group.main and (best is None or (value > best["value"] if higher else value < best["value"])):
                        best = {"metric": best_metric, "value": value, "step": step, "path": output / BEST_NAME}
                        _write_weights(output / BEST_NAME, model, provenance(step, {best_metric: value}))
            out_of_time = config.time_limit is not None and time.perf_counter() - loop_start > config.time_limit
            out_of_time = bool(group.broadcast(out_of_time))
            if out_of_time and not (step % config.validate_every == 0 or step == config.steps):
                result = run_validation()
                if result is not None:
                    last_validation = result
                    log({"step": step, "val": result.metrics})
                    emit({"event": "validation", "step": step, "metrics": result.metrics})
            if group.main and (step % config.checkpoint_every == 0 or step == config.steps or out_of_time):
                save_checkpoint(ckpt_path, state())
                emit({"event": "checkpoint", "step": step, "path": str(ckpt_path)})
            if out_of_time:
                emit({"event": "time_limit", "step": step})
                break

    after = last_validation.metrics if last_validation is not None else None
    report: list[Path] = []
    if group.main:
        final = after or {"loss": last_loss}
        _write_weights(output / MODEL_NAME, model, provenance(step, final))
        from .report import write_report

        report = write_report(output, history, last_validation)
    if writer is not None:
        writer.close()
    return TrainingRun(
        output=output, model=output / MODEL_NAME, steps=step, resumed_from=resumed_from, skipped_steps=skipped,
        loss=history[-1].get("loss") if history and "loss" in history[-1] else last_loss, history=history,
        before=before, after=after, best=best, data_skips=skips.to_dict(), report=report,
        seconds=time.perf_counter() - start_time, config=config.to_dict(),
    )  # fmt: skip


def _bn_mode(model: ManTraNet, bn: str) -> None:
    """``frozen``: bnorm normalises with its moving statistics, and leaves them as they are."""
    model.detector.bnorm.train(bn == "batch")


def _batches(data: object, sampler: EpochSampler, config: TrainConfig, device: torch.device) -> Iterator[dict]:
    """Batches forever, epoch after epoch, from the sampler's position; keeps ``sampler.position`` current."""
    while True:
        loader = DataLoader(data, batch_size=config.batch, sampler=sampler, collate_fn=collate,
                            num_workers=config.workers_per_loader)  # fmt: skip
        for batch in loader:
            position = sampler.position + sampler.global_batch
            if position >= sampler.epoch_samples:
                sampler.epoch, sampler.position = sampler.epoch + 1, 0
            else:
                sampler.position = position
            yield {"image": batch["image"].to(device), "mask": batch["mask"].to(device), "meta": batch["meta"]}
        if sampler.position != 0:  # the loader ended early (never, unless the dataset changed size)
            sampler.epoch, sampler.position = sampler.epoch + 1, 0


def _scalars(record: dict) -> Iterator[tuple[str, float]]:
    for key in ("loss", "lr", "images_per_s"):
        if isinstance(record.get(key), (int, float)):
            yield f"train/{key}", float(record[key])
    for key, value in (record.get("val") or {}).items():
        if isinstance(value, (int, float)):
            yield f"val/{key}", float(value)


def _tensorboard(output: Path, config: TrainConfig) -> object | None:
    if not config.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TrainError(f"--tensorboard needs TensorBoard: pip install 'mantranet-torch[train]' ({e})") from None
    return SummaryWriter(str(output / "tensorboard"))
