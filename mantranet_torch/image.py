"""Deprecated alias of ``mantranet_torch.model_input``, whose name says what it holds; removed in 0.3.0."""

import sys
import warnings

from . import model_input

warnings.warn(
    "mantranet_torch.image is deprecated: import mantranet_torch.model_input (removed in 0.3.0)", DeprecationWarning, 2
)
sys.modules[__name__] = model_input  # the same module object: its names and any patch of them are shared
