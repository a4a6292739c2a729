"""Where the tests' real data lies: photographs, the earlier port's checkpoint and the original model code.

They sit in ``../shared`` beside a checkout and are never part of the project; an installed package has none,
so ``$MANTRANET_SHARED`` may name such a folder. Imports nothing heavy: light test processes use it too.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED = Path(os.environ.get("MANTRANET_SHARED") or Path(__file__).resolve().parents[2] / "shared")
SAMPLES = SHARED / "samples"
SEED_PORT_DETECTOR = SHARED / "seed-port" / "AnomalyDetectorv4.pt"
OFFICIAL_CODE = SHARED / "official" / "modelCore.py"  # the original model code: test data, never in the project
ABSENT = "(test data beside a checkout, not shipped with the package: set MANTRANET_SHARED to a folder holding it)"
