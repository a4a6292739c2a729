"""ManTraNet in PyTorch: the model, its five official releases, and inference."""

from .config import RELEASES, ManTraNetConfig, release_config
from .image import scale_pixels, to_model_input
from .model import LAYERS, AnomalyDetector, Featex, ManTraNet
from .precision import PRECISIONS, SlowPrecisionWarning, bf16_support
from .weights import WeightFileError, load

__all__ = [
    "LAYERS",
    "PRECISIONS",
    "RELEASES",
    "AnomalyDetector",
    "Featex",
    "ManTraNet",
    "ManTraNetConfig",
    "SlowPrecisionWarning",
    "WeightFileError",
    "bf16_support",
    "load",
    "release_config",
    "scale_pixels",
    "to_model_input",
]
