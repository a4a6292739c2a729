"""ManTraNet in PyTorch: the model, its five official releases, and inference."""

from .config import RELEASES, ManTraNetConfig, release_config
from .image import scale_pixels, to_model_input
from .model import LAYERS, AnomalyDetector, Featex, ManTraNet
from .precision import PRECISIONS, SlowPrecisionWarning, bf16_support
from .transfer import Initialisation, init_from
from .weights import WeightFileError, load

__version__ = "0.2.0"


def pretrained(release: int = 4, **options: object) -> ManTraNet:
    """Official release ``release`` (0-4) as a trained model in eval mode: downloaded, verified, converted and
    cached per user on first use (see ``converter.pretrained``, which takes the same arguments)."""
    from converter.trained import pretrained as load_release  # at call time: this package imports none of ours

    return load_release(release, **options)


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
    "pretrained",
    "release_config",
    "scale_pixels",
    "to_model_input",
]
