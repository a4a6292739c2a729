"""Deprecated alias of ``mantranet_torch.files``, where atomic writes and file checks now live; removed in 0.3.0."""

import sys
import warnings

from mantranet_torch import files

warnings.warn("converter.atomic is deprecated: import mantranet_torch.files (removed in 0.3.0)", DeprecationWarning, 2)
sys.modules[__name__] = files  # the same module object: its names and any patch of them are shared
