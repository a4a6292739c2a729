"""Deprecated alias of ``mantranet_torch.image_files``, whose name says what it holds; removed in 0.3.0."""

import sys
import warnings

from . import image_files

warnings.warn(
    "mantranet_torch.images is deprecated: import mantranet_torch.image_files (removed in 0.3.0)", DeprecationWarning, 2
)
sys.modules[__name__] = image_files  # the same module object: its names and any patch of them are shared
