"""More than one process: bnorm's batch statistics over the whole group, and the Ray engine.

Data parallelism (``torchrun``, or Ray Train's workers) gives each process its share of every global batch
(``training.data.EpochSampler``) and averages the gradients. Keras' training-mode bnorm normalises with the
statistics of the whole batch; a process sees only its share, so ``SyncKerasBatchNorm`` all-reduces the
per-channel sums (float64) before normalising: the group computes what one process computes on the global batch,
up to the rounding of the sums' order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from mantranet_torch import ManTraNet
from mantranet_torch.layers import KerasBatchNorm

from .config import TrainConfig, TrainError


class SyncKerasBatchNorm(KerasBatchNorm):
    """``KerasBatchNorm`` whose training-mode statistics are those of the batch across the process group."""

    def batch_moments(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return super().batch_moments(x)
        from torch.distributed.nn.functional import all_reduce  # the all-reduce autograd differentiates through

        wide = x.to(torch.float64)
        count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=torch.float64, device=x.device)
        sums = all_reduce(torch.cat([wide.sum(dim=(0, 2, 3)), wide.square().sum(dim=(0, 2, 3)), count]))
        channels, n = x.shape[1], sums[-1]
        mean = sums[:channels] / n
        var = (sums[channels : 2 * channels] / n - mean.square()).clamp_min(0)
        return var, mean, int(n.item())


def _swap_batch_norm(model: ManTraNet, kind: type[KerasBatchNorm]) -> None:
    old = model.detector.bnorm
    if type(old) is kind:
        return
    new = kind(old.moving_mean.numel(), old.momentum).to(old.moving_mean.device)
    new.load_state_dict(old.state_dict())
    new.train(old.training)
    model.detector.bnorm = new


def sync_batch_norm(model: ManTraNet) -> None:
    """Swap bnorm for ``SyncKerasBatchNorm`` in place (same buffers, same state-dict keys)."""
    _swap_batch_norm(model, SyncKerasBatchNorm)


def plain_batch_norm(model: ManTraNet) -> None:
    """Back to ``KerasBatchNorm`` (before writing a model others load)."""
    _swap_batch_norm(model, KerasBatchNorm)


def train_ray(config: TrainConfig, progress=None, address: str | None = None):
    """Run ``train`` on ``config.workers`` Ray Train workers (``TorchTrainer``; gloo on CPU, NCCL on GPUs).

    Every worker reads the data and writes nothing but the first, which writes ``config.output``: the run folder
    must be on storage every worker's node shares (on one machine, any folder).

    Returns:
        The ``TrainingRun`` of the first worker, rebuilt from what it wrote.

    Raises:
        TrainError: Ray is missing or the run failed (its first line).
    """
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as e:
        raise TrainError(f"--engine ray needs Ray Train: pip install 'ray[train]' ({e})") from None
    from .engine import train

    config.check()
    output = Path(config.output).resolve()
    config.output = output
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)

    def loop(_: dict) -> None:
        import ray.train

        result = train(config)
        if ray.train.get_context().get_world_rank() == 0:
            (output / "run.json").write_text(json.dumps(result.to_dict(), default=str))

    trainer = TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=torch.cuda.is_available()),
        run_config=RunConfig(storage_path=str(output / "ray"), name="train"),
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps the worker's error: its first line is the run's message
        message = str(getattr(e, "cause", None) or e).strip().splitlines()
        line = next((line for line in message if "TrainError" in line), message[-1] if message else str(e))
        raise TrainError(line.split("TrainError: ")[-1]) from None
    finally:
        if started:
            ray.shutdown()
    from .engine import TrainingRun

    record = json.loads((output / "run.json").read_text())
    record["output"], record["model"] = Path(record["output"]), Path(record["model"])
    record["report"] = [Path(p) for p in record["report"]]
    if record.get("best"):
        record["best"]["path"] = Path(record["best"]["path"])
    return TrainingRun(**record)
