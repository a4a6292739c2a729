"""``evaluate``: score a model on a dataset, every perturbation as its own row, resumably, on either engine."""

from __future__ import annotations

import csv
import io
import math
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

import numpy as np

from converter.releases import bytes_digest, file_digests, release_by_hash
from mantranet_torch.files import file_problem, os_reason, write_bytes_atomic

from .datasets import Dataset, Entry
from .engines import local_setup, run_local, run_ray
from .metrics import (
    IMAGE_SCORES,
    METRICS,
    Confusion,
    PixelScores,
    ScoreDistribution,
    image_level,
    mean_or_none,
    merge_distributions,
)
from .perturb import Perturbation
from .store import Record, ResultStore, record_key
from .worker import TENSORFLOW, TORCH, Evaluator, Execution, Options, Outcome, Setup, Task

Progress = Callable[[int, int], None]  # (records done, records in all), resumed ones included
ENGINES = ("local", "ray")


@dataclass
class Config:
    weights: Path
    store: Path
    variant: int | None = None
    options: Options = field(default_factory=Options)
    execution: Execution = field(default_factory=Execution)
    perturbations: list[Perturbation] = field(default_factory=list)
    image_score: str = "max"
    compare_reference: bool = False
    engine: str = "local"
    workers: int | None = None
    ray_address: str | None = None
    save_maps: Path | None = None


@dataclass
class Row:
    """One row of the results table: the dataset as it is, or under one perturbation."""

    perturbation: str | None
    backend: str
    metrics: dict[str, float | None]
    counts: dict[str, int]

    @property
    def label(self) -> str:
        return self.perturbation or "none"


@dataclass
class Evaluation:
    dataset: dict
    weights: dict
    options: dict
    rows: list[Row]
    records: list[dict]  # per image, per row and backend
    skipped: list[tuple[str, str]]
    counts: dict[str, int]
    engine: dict
    seconds: float
    curves: dict = field(default_factory=dict)  # (perturbation, backend) -> pooled ScoreDistribution
    previews: dict = field(default_factory=dict)  # (name, perturbation, backend) -> 8-bit (map, mask) previews
    images: dict = field(default_factory=dict)  # name -> its image file, for the report's pictures

    def row(self, perturbation: str | None = None, backend: str = TORCH) -> Row:
        return next(r for r in self.rows if r.perturbation == perturbation and r.backend == backend)

    @property
    def metrics(self) -> dict[str, float | None]:
        return self.row().metrics

    def to_json(self) -> dict:
        rows = []
        for row in self.rows:
            if row.backend != TORCH:
                continue
            item = {"perturbation": row.label, "metrics": row.metrics, "counts": row.counts}
            reference = next(
                (r for r in self.rows if r.perturbation == row.perturbation and r.backend == TENSORFLOW), None
            )
            if reference is not None:
                item["reference"] = reference.metrics
                item["difference"] = {
                    k: None if v is None or reference.metrics[k] is None else v - reference.metrics[k]
                    for k, v in row.metrics.items()
                }
            rows.append(item)
        return {
            "metrics": self.metrics,
            "rows": rows,
            "counts": self.counts,
            "skipped": [{"entry": name, "reason": why} for name, why in self.skipped],
            "dataset": self.dataset,
            "weights": self.weights,
            "options": self.options,
            "engine": self.engine,
            "seconds": round(self.seconds, 3),
            "versions": versions(),
        }

    def csv_bytes(self) -> bytes:
        """One line per image and row: its scores and per-image metrics."""
        columns = [
            "image", "perturbation", "backend", "label", "width", "height", "score_max", "score_mean", "score_p99",
            "pixel_auc", "pixel_f1_fixed", "pixel_f1_best", "best_threshold", "pixel_iou_fixed", "pixel_mcc_fixed",
            "tp", "fp", "fn", "tn", "predict_seconds",
        ]  # fmt: skip
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for r in self.records:
            pixel = r.get("pixel") or {}
            confusion = pixel.get("confusion") or {}
            writer.writerow(
                [
                    r["name"], r["perturbation"] or "none", r["backend"], r["label"], r["width"], r["height"],
                    *(_fmt(r["scores"][k]) for k in IMAGE_SCORES),
                    *(_fmt(pixel.get(k)) for k in ("auc", "f1_fixed", "f1_best", "best_threshold", "iou_fixed",
                                                    "mcc_fixed")),
                    *(confusion.get(k, "") for k in ("tp", "fp", "fn", "tn")),
                    _fmt(r.get("predict_seconds")),
                ]
            )  # fmt: skip
        return buffer.getvalue().encode()


def _fmt(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def versions() -> dict:
    import sklearn
    import torch

    from converter.convert import tool_version

    return {
        "mantranet-torch": tool_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
    }


def map_path(root: Path, name: str, perturbation: str | None, backend: str) -> Path:
    """``--save-maps`` file of an image: ROOT/<name without suffix>.npy, under a folder per perturbation (and
    ``reference/`` for the TensorFlow maps)."""
    folder = root / "reference" if backend == TENSORFLOW else root
    if perturbation:
        folder = folder / perturbation.replace(":", "-")
    parts = [p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("/", "..", ".")]
    return folder.joinpath(*parts).with_suffix(".npy")  # never outside ROOT, whatever the manifest says


def evaluate(dataset: Dataset, config: Config, progress: Progress | None = None) -> Evaluation:
    """Score the model on ``dataset``; records already in ``config.store`` are reused, new ones stored at once.

    Three steps, each callable alone: ``plan_evaluation`` (what to compute, what the store already has),
    ``run_plan`` (the computations, on the local or the Ray engine) and ``aggregate_evaluation`` (the rows).

    Args:
        dataset: the images, masks and labels (``datasets.load_dataset``).
        config: the weights, the result store, the options, the perturbations and the engine.
        progress: called with (records done, records in all) as records are resumed or computed.

    Returns:
        The ``Evaluation``: one row per perturbation (and per backend with ``compare_reference``), per-image records.

    Raises:
        ValueError: an unknown image score or engine.
        ConversionError: the weight file cannot be read (before any image is computed).
    """
    started = time.perf_counter()
    planned = plan_evaluation(dataset, config)
    engine = run_plan(planned, progress)
    return aggregate_evaluation(planned, engine, time.perf_counter() - started)


@dataclass
class Plan:
    """What an evaluation computes: every (image, perturbation, backend) record wanted, the ones the store already
    holds, and the computations left (one per distinct record key)."""

    dataset: Dataset
    config: Config
    weights: dict
    perturbations: list[str | None]
    backends: list[str]
    wanted: list[tuple[Entry, Task]]
    skipped: dict[str, str]
    records: dict[str, Record]
    todo: dict[str, list[Task]]  # key -> the tasks it answers (one image listed twice: one computation)
    resumed: int = 0
    computed: int = 0


def plan_evaluation(dataset: Dataset, config: Config) -> Plan:
    """The records ``config`` asks of ``dataset``, and which of them ``config.store`` already holds.

    Raises:
        ValueError: an unknown image score or engine.
    """
    if config.image_score not in IMAGE_SCORES:
        raise ValueError(f"image score {config.image_score!r}: choose one of {', '.join(IMAGE_SCORES)}")
    if config.engine not in ENGINES:
        raise ValueError(f"engine {config.engine!r}: choose one of {', '.join(ENGINES)}")
    if config.options.precision == "auto":  # resolved here, once: the key must name what the maps were computed in
        from mantranet_torch.precision import resolve_precision

        from .worker import device

        precision = resolve_precision("auto", device(), warn=False)
        config = replace(config, options=replace(config.options, precision=precision))
    digests = file_digests(config.weights)
    release = release_by_hash(digests.git_blob_sha1)
    weights = {
        "path": str(config.weights),
        "git_blob_sha1": digests.git_blob_sha1,
        "release": release.file if release else None,
    }
    perturbations = [None, *(str(p) for p in config.perturbations)]
    backends = [TORCH, TENSORFLOW] if config.compare_reference else [TORCH]
    skipped: dict[str, str] = dict(dataset.problems)
    wanted: list[tuple[Entry, Task]] = []
    for entry in dataset.entries:
        # a folder, FIFO or missing file is named as such (a FIFO is never opened: reading it would block)
        problems = [(p, file_problem(p)) for p in (entry.image, entry.mask) if p is not None]
        at, problem = next(((p, why) for p, why in problems if why), (None, None))
        if problem:
            skipped[entry.name] = f"{at}: {problem}"
            continue
        try:
            content = bytes_digest(entry.image.read_bytes())
            mask_content = bytes_digest(entry.mask.read_bytes()) if entry.mask else None
        except OSError as e:
            skipped[entry.name] = f"{e.filename or entry.image}: {os_reason(e)}"
            continue
        for perturbation in perturbations:
            for backend in backends:
                key = record_key(
                    image=content,
                    mask=mask_content,
                    label=entry.label,
                    weights=digests.git_blob_sha1,
                    variant=config.variant,
                    perturbation=perturbation,
                    backend=backend,
                    **config.options.key_parts(),
                )
                want_map = config.save_maps is not None
                task = Task(
                    key, entry.name, entry.label, str(entry.image), str(entry.mask) if entry.mask else None,
                    content, mask_content, perturbation, backend, want_map,
                )  # fmt: skip
                wanted.append((entry, task))

    store = ResultStore(config.store)
    planned = Plan(dataset, config, weights, perturbations, backends, wanted, skipped, {}, {})
    for _, task in wanted:
        record = planned.records.get(task.key) or store.get(task.key)
        have_map = (
            config.save_maps is None or map_path(config.save_maps, task.name, task.perturbation, task.backend).exists()
        )
        if record is not None and have_map and task.key not in planned.todo:
            planned.records[task.key] = _light(record)
            planned.resumed += 1
        else:
            planned.todo.setdefault(task.key, []).append(task)
    return planned


def run_plan(planned: Plan, progress: Progress | None = None) -> dict:
    """Compute ``planned``'s records left to do, each stored as it arrives (and its map saved with ``save_maps``);
    an image that fails is recorded in ``planned.skipped``.

    Returns:
        The engine's description for the report (engine, workers, threads).

    Raises:
        ConversionError: the weight file cannot be loaded (before any image is computed).
    """
    config, todo = planned.config, planned.todo
    store = ResultStore(config.store)
    total, done = len(planned.wanted), planned.resumed
    if progress:
        progress(done, total)

    def on_outcome(outcome: Outcome) -> None:
        nonlocal done
        tasks = todo[outcome.task.key]
        if outcome.error is not None:
            for task in tasks:
                planned.skipped.setdefault(task.name, outcome.error)
        else:
            store.put(outcome.task.key, outcome.record)
            planned.computed += 1
            planned.records[outcome.task.key] = _light(outcome.record)
            if config.save_maps is not None and outcome.likelihood is not None:
                for task in tasks:
                    target = map_path(config.save_maps, task.name, task.perturbation, task.backend)
                    write_bytes_atomic(target, _npy(outcome.likelihood), force=True)
        done += len(tasks)
        if progress:
            progress(done, total)

    setup = Setup(
        str(config.weights),
        config.variant,
        config.options,
        config.execution,
        compare_reference=config.compare_reference,
    )
    engine = {"engine": config.engine}
    first = [tasks[0] for tasks in todo.values()]
    if todo:
        if config.engine == "ray":
            Evaluator(replace(setup, execution=replace(setup.execution, threads=None)))  # a bad file fails here
            engine |= run_ray(first, setup, config.workers, config.ray_address, on_outcome)
        else:
            workers = config.workers or 1
            setup = local_setup(setup, workers)
            evaluator = Evaluator(setup)  # loads the model here: a bad weight file fails before any work
            engine |= {"workers": workers, "threads_per_worker": setup.execution.threads}
            run_local(first, setup, workers, on_outcome, evaluator if workers == 1 else None)
    return engine


def aggregate_evaluation(planned: Plan, engine: dict, seconds: float) -> Evaluation:
    """The ``Evaluation`` of a plan that has run: per-image records in dataset order, one row per perturbation
    and backend (``aggregate``), the pooled curves and the previews of the report."""
    config, records, skipped, wanted = planned.config, planned.records, planned.skipped, planned.wanted
    store = ResultStore(config.store)
    # a record is the image's content: its name and label in this dataset are the entry's
    ordered = [{**records[t.key].fields, "name": t.name, "label": t.label} for _, t in wanted if t.key in records]
    dataset = planned.dataset
    evaluation = Evaluation(
        dataset=dataset.describe(),
        weights=planned.weights,
        options=_options(config),
        rows=[],
        records=ordered,
        skipped=sorted(skipped.items()),
        counts={
            "entries": len(dataset.entries) + len(dataset.problems),
            "records": len(wanted),
            "computed": planned.computed,  # computations: an image listed twice is computed once
            "resumed": planned.resumed,
            "skipped": len(skipped),
        },
        engine=engine,
        seconds=seconds,
    )
    for perturbation in planned.perturbations:
        for backend in planned.backends:
            keys = [
                t.key
                for e, t in wanted
                if t.perturbation == perturbation
                and t.backend == backend
                and t.key in records
                and e.name not in skipped
            ]
            chosen = [records[key] for key in keys]
            stored = (_distribution(store, key) for key in keys if records[key].fields["pixel"])
            row, pooled = aggregate(chosen, config.image_score, stored)
            evaluation.rows.append(Row(perturbation, backend, row["metrics"], row["counts"]))
            evaluation.curves[(perturbation, backend)] = pooled
    for _, task in wanted:
        if task.key in records and task.perturbation is None and task.backend == TORCH:
            arrays = records[task.key].arrays
            evaluation.previews[(task.name, None, TORCH)] = (arrays["preview_map"], arrays.get("preview_mask"))
            evaluation.images[task.name] = task.image
    return evaluation


def _npy(likelihood: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, likelihood.astype(np.float32, copy=False))
    return buffer.getvalue()


def _options(config: Config) -> dict:
    return {
        **config.options.key_parts(),
        "image_score": config.image_score,
        "perturbations": [str(p) for p in config.perturbations],
        "compare_reference": config.compare_reference,
        "variant": config.variant,
        "tile": config.execution.tile,
        "max_memory": config.execution.max_memory,
        "store": str(config.store),
    }


def _light(record: Record) -> Record:
    """A record without its score distribution (read back from the store one at a time when rows are merged)."""
    return Record(record.fields, {k: v for k, v in record.arrays.items() if k.startswith("preview_")})


def _distribution(store: ResultStore, key: str) -> ScoreDistribution:
    record = store.get(key)
    if record is None:
        raise RuntimeError(f"{store.path(key)}: a record written in this run is gone or damaged; run again")
    return ScoreDistribution.from_arrays(record.arrays)


def aggregate(
    records: list[Record], image_score: str, distributions: Iterable[ScoreDistribution] | None = None
) -> tuple[dict, ScoreDistribution]:
    """The metrics of one row from its images' records, and the row's pooled score distribution.
    ``distributions``: the forged images' score distributions, in order (default: from the records' arrays)."""
    pixel = [PixelScores.from_dict(r.fields["pixel"]) for r in records if r.fields["pixel"]]
    aucs = [p.auc for p in pixel if p.auc is not None]
    if distributions is None:
        distributions = (ScoreDistribution.from_arrays(r.arrays) for r in records if r.fields["pixel"])
    pooled_scores = merge_distributions(distributions)
    pooled = sum((p.confusion for p in pixel), Confusion(0, 0, 0, 0))
    labels = [r.fields["label"] for r in records]
    scores = [r.fields["scores"][image_score] for r in records]
    metrics = {
        "pixel_auc": mean_or_none(aucs),
        "pixel_f1_fixed": mean_or_none([p.f1_fixed for p in pixel]),
        "pixel_f1_best": mean_or_none([p.f1_best for p in pixel]),
        "pixel_iou_fixed": mean_or_none([p.iou_fixed for p in pixel]),
        "pixel_mcc_fixed": mean_or_none([p.mcc_fixed for p in pixel]),
        "pooled_auc": pooled_scores.auc(),
        "pooled_f1_fixed": pooled.f1() if pixel else None,
        **image_level(labels, scores),
    }
    assert tuple(metrics) == METRICS
    counts = {
        "images": len(records),
        "forged": sum(1 for label in labels if label == 1),
        "authentic": sum(1 for label in labels if label == 0),
        "forged_with_mask": len(pixel),
        "pixel_auc_excluded": len(pixel) - len(aucs),
    }
    return {"metrics": metrics, "counts": counts}, pooled_scores


def write_outputs(evaluation: Evaluation, json_path: Path | None, csv_path: Path | None) -> None:
    import json

    if json_path is not None:  # strict JSON: a non-finite number (none should be left) is written as null
        text = json.dumps(_json_safe(evaluation.to_json()), indent=2, sort_keys=False, allow_nan=False) + "\n"
        write_bytes_atomic(json_path, text.encode(), force=True)
    if csv_path is not None:
        write_bytes_atomic(csv_path, evaluation.csv_bytes(), force=True)


def _json_safe(value: object) -> object:
    """``value`` with NaN and infinities as None: JSON has no such numbers, and most readers refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


__all__ = [
    "Config",
    "Evaluation",
    "Plan",
    "Row",
    "aggregate_evaluation",
    "evaluate",
    "map_path",
    "plan_evaluation",
    "run_plan",
    "write_outputs",
]
