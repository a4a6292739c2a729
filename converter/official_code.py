"""The official model code, ``src/modelCore.py``, downloaded into the cache for ``parity --reference official``.

The project holds none of that code (its licence allows academic, non-commercial use only); like the official
weights, it is fetched from the official URL by the user's own command and kept only when its git blob SHA-1 is
the official file's (``weights/releases.json``, ``official_code``).
"""

from __future__ import annotations

from pathlib import Path

from .download import Fetched, Progress, download
from .releases import official_code, official_code_path


def fetch_official_code(
    url: str | None = None, target: str | Path | None = None, force: bool = False, progress: Progress | None = None
) -> Fetched:
    """Download the official ``modelCore.py`` (from ``url``, a mirror, instead of the official URL) into the cache
    (``releases.official_code_path()``) unless ``target`` says where; verified by its git blob SHA-1, deleted
    when it is another file. A verified copy already there is kept. Raises ``download.DownloadError``."""
    code = official_code()
    return download(url or code.url, target or official_code_path(), code.git_blob_sha1, force=force, progress=progress)
