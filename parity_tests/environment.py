"""The process a parity run shares with TensorFlow: PyTorch's thread count beside TensorFlow's pool, TensorFlow's
C++ notices kept off the terminal, the reference imported with an install hint, and the versions that computed a
report."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from converter.convert import tool_version

from .errors import ParityInputError


def torch_threads() -> int:
    """PyTorch's threads while TensorFlow shares the machine: half the cores (the two alternate layer by layer and
    TensorFlow's pool keeps spinning between its ops; measured in the README).

    Returns:
        The thread count, at least 1.
    """
    return max(1, (os.cpu_count() or 2) // 2)


@contextlib.contextmanager
def torch_thread_count(count: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``count`` for the block, and restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null: TensorFlow's C++ start-up notices bypass Python and its log level."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (an embedding host): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_reference() -> Any:
    """The ``reference`` package (TensorFlow). TensorFlow's C++ warnings (float64 graphs it does not optimise, for
    one) are off unless the user set ``TF_CPP_MIN_LOG_LEVEL``.

    Returns:
        The imported ``reference`` module.

    Raises:
        ParityInputError: TensorFlow is not installed; the message says which extra installs it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with native_stderr_silenced():
            import reference
    except ImportError as e:
        raise ParityInputError(
            f"the TensorFlow reference needs TensorFlow ({e}); "
            "install it with: pip install 'mantranet-torch[reference]'"
        ) from None
    return reference


def versions() -> dict[str, str]:
    """The versions that computed a report (TensorFlow's and Keras' once they are imported).

    Returns:
        Package name to version: mantranet-torch, torch, numpy, and tensorflow, keras, tf_keras where loaded.
    """
    found = {"mantranet-torch": tool_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("tensorflow", "keras", "tf_keras"):
        module = sys.modules.get(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "unknown")
    return found
