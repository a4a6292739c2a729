"""Dataset scoring for ManTraNet: the standard forgery-localisation metrics at full resolution.

    from evaluation import Config, evaluate, load_dataset
    result = evaluate(load_dataset("casia/"), Config(weights=Path("ManTraNet_Ptrain4.h5"), store=Path("store")))
    result.metrics["pixel_auc"]

Needs the ``eval`` extra (scikit-learn); ``--engine ray`` needs the ``ray`` extra.
"""

from .datasets import LAYOUTS, Dataset, DatasetError, Entry, load_dataset
from .masks import MaskError, MaskRule
from .metrics import IMAGE_SCORES, METRICS, THRESHOLD
from .perturb import Perturbation, PerturbationError
from .run import Config, Evaluation, Row, evaluate, map_path, write_outputs
from .worker import Execution, Options

__all__ = [
    "IMAGE_SCORES",
    "LAYOUTS",
    "METRICS",
    "THRESHOLD",
    "Config",
    "Dataset",
    "DatasetError",
    "Entry",
    "Evaluation",
    "Execution",
    "MaskError",
    "MaskRule",
    "Options",
    "Perturbation",
    "PerturbationError",
    "Row",
    "evaluate",
    "load_dataset",
    "map_path",
    "write_outputs",
]
