"""The per-user folder for downloaded and converted weights: ``$MANTRANET_HOME``, else the platform's user cache
folder (``~/.cache/mantranet-torch`` on Linux, ``~/Library/Caches/mantranet-torch`` on macOS,
``%LOCALAPPDATA%\\mantranet-torch\\Cache`` on Windows). Never the installation: a wheel's files are read-only
to the program that uses them."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

HOME_ENV = "MANTRANET_HOME"
APP_NAME = "mantranet-torch"


def cache_dir() -> Path:
    """``$MANTRANET_HOME`` when set (and not empty), else the platform's user cache folder for this package."""
    home = os.environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser()
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def weights_dir() -> Path:
    """Where ``fetch``, ``pretrained`` and ``convert`` (without ``-o``) put weight files: ``cache_dir()/weights``."""
    return cache_dir() / "weights"
