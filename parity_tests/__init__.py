"""Layer-by-layer parity of the PyTorch port against the TensorFlow reference: ``run_parity`` (the whole run of
``mantranet parity``, returning a ``ParityRun`` whose ``to_json()`` is the JSON report), its engine
(``runner.compare_layers``), the float64 oracle, the tolerance policy and the property-based suite."""

from .api import ParityEvent, run_parity
from .errors import ParityInputError
from .report import ParityRun

__all__ = ["ParityEvent", "ParityInputError", "ParityRun", "run_parity"]
