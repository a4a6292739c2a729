"""ManTraNet in PyTorch: the model, its five official releases, and inference.

The ground floor: it imports nothing else of this project. The trained releases come from the floor above, which
reads weight files: ``converter.pretrained(release)`` (or ``torch.hub.load(..., "mantranet")``).
"""

from .config import RELEASES, ManTraNetConfig, release_config
from .model import LAYERS, AnomalyDetector, Featex, ManTraNet
from .model_input import scale_pixels, to_model_input
from .precision import PRECISIONS, SlowPrecisionWarning, bf16_support
from .transfer import Initialisation, init_from
from .weights import WeightFileError, load

__version__ = "0.2.0"


def __getattr__(name: str) -> object:
    if name == "pretrained":  # was here before 0.2.0's release; importing the converter from here ran upward
        raise AttributeError(
            "mantranet_torch.pretrained moved to converter.pretrained: `from converter import pretrained`"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")



__all__ = [
    "LAYERS",
    "PRECISIONS",
    "RELEASES",
    "AnomalyDetector",
    "Featex",
    "Initialisation",
    "ManTraNet",
    "ManTraNetConfig",
    "SlowPrecisionWarning",
    "WeightFileError",
    "__version__",
    "bf16_support",
    "init_from",
    "load",
    "release_config",
    "scale_pixels",
    "to_model_input",
]
