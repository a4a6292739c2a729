"""``selftest``: the parity suite run from the installed package, on this machine's torch and TensorFlow, and
optionally the layer-by-layer parity of the model on another device (a GPU) against the reference.

    from parity_tests.selftest import selftest
    result = selftest()                      # the quick derandomized profile: a few minutes on 2 cores
    result.passed, result.counts, result.failures

Needs the ``reference`` extra (TensorFlow, tf_keras, pytest, hypothesis); without it ``MissingExtra`` says what
to install. Nothing is written in the current folder: no pytest cache, no Hypothesis example database, no bytecode;
Hypothesis's constants cache goes to the user cache folder (``converter.cache.cache_dir()/hypothesis``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The property-based parity suite: layers and the whole model against the reference and float64, the engine.
# test_parity_cmd.py, test_api.py and test_official.py test the commands and files around it, and run in CI.
QUICK = (
    "test_layer_parity.py",
    "test_end_to_end.py",
    "test_engine.py",
    "test_float64_attribution.py",
    "test_gradient_properties.py",  # the backward pass of each custom piece
)
THOROUGH = (*QUICK, "test_reference.py", "test_mutations.py", "test_gru_parity.py", "test_gradients.py")
PROFILES = {False: "ci", True: "explore"}  # parity_tests/profiles.py: derandomized / many more examples
REQUIRED = {"tensorflow": "tensorflow", "tf_keras": "tf_keras", "pytest": "pytest", "hypothesis": "hypothesis"}
INSTALL_HINT = "pip install 'mantranet-torch[reference]'"
DEVICE_RELEASES = (0, 4)  # the two architectures: 32 filters, tanh, four windows; 16 filters, linear, three


class MissingExtra(ImportError):
    """The ``reference`` extra is not installed; the message is one line with the install command."""


@dataclass
class DeviceCheck:
    """Layer-by-layer parity of the model on ``device`` against the reference, built-in images, both modes."""

    device: str
    releases: list[int]
    images: int
    passed: bool
    first_divergent: str | None  # "release R, image NAME: layer (mode)" of the first failure
    worst: dict[str, float]  # layer -> its own largest error (local mode, max abs) over releases and images

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class SelftestResult:
    profile: str
    files: list[str]
    exit_code: int  # pytest's
    counts: dict[str, int] = field(default_factory=dict)  # passed, failed, skipped, error
    failures: list[str] = field(default_factory=list)  # test ids
    skipped: list[str] = field(default_factory=list)  # "test id: reason"
    seconds: float = 0.0
    device: DeviceCheck | None = None
    problem: str | None = None  # why the suite could not run (a -k expression pytest refuses or that selects none)

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not self.counts.get("failed") and (self.device is None or self.device.passed)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "device"}
        return {**d, "passed": self.passed, "device": None if self.device is None else self.device.to_dict()}


def missing_extra() -> list[str]:
    """The ``reference`` extra's modules this Python cannot import."""
    return [name for name, module in REQUIRED.items() if importlib.util.find_spec(module) is None]


def selftest(
    thorough: bool = False, device: str | None = None, keyword: str | None = None, quiet: bool = True
) -> SelftestResult:
    """Run the parity suite (``QUICK`` files on the derandomized ``ci`` profile, or ``THOROUGH`` files on the
    ``explore`` profile) in this process with pytest, then, with ``device`` (e.g. "cuda"), the device check.
    ``keyword``: pytest's ``-k`` expression, to run part of the suite. ``quiet``: pytest prints nothing."""
    missing = missing_extra()
    if missing:
        raise MissingExtra(f"selftest needs {', '.join(missing)}: {INSTALL_HINT}")
    import pytest
    from hypothesis import settings

    from .environment import import_reference
    from .profiles import PROFILE_ENV

    profile = PROFILES[thorough]
    files = [str(Path(__file__).with_name(name)) for name in (THOROUGH if thorough else QUICK)]
    collector = _Collector()
    # the installed suite alone: no configuration file of the current folder, no cache, no plugins' reordering
    args = [*files, "-c", os.devnull, "--rootdir", str(Path(__file__).parent), "-p", "no:cacheprovider"]
    args += ["-W", "ignore::DeprecationWarning", *(["-k", keyword] if keyword else [])]
    args += ["-p", "no:terminal"] if quiet else ["-q"]
    start = time.perf_counter()
    import_reference()  # TensorFlow's C++ start-up notices silenced, once, before the tests import it
    said = io.StringIO()  # pytest's own words on a refused -k expression, in quiet mode
    with _environment(PROFILE_ENV, profile), _no_bytecode(), _hypothesis_storage(), _stderr_to(said if quiet else None):
        settings.register_profile("selftest", parent=settings.get_profile(profile), database=None)
        settings.load_profile("selftest")
        exit_code = int(pytest.main(args, plugins=[collector]))
    result = SelftestResult(
        profile, [Path(f).name for f in files], exit_code, collector.counts, collector.failures, collector.skipped,
        time.perf_counter() - start, problem=_problem(exit_code, keyword, said.getvalue()),
    )  # fmt: skip
    if device is not None and result.problem is None:
        result.device = device_check(device)
    return result


# pytest's exit statuses that mean the suite did not run (pytest.ExitCode): a usage error, nothing selected
USAGE_ERROR, NO_TESTS_COLLECTED = 4, 5


def _problem(exit_code: int, keyword: str | None, said: str) -> str | None:
    """Why pytest ran no test, in words, or None when it ran the suite (passed or not)."""
    if exit_code == NO_TESTS_COLLECTED:
        return f"-k {keyword!r} selects none of the suite's tests" if keyword else "the suite holds no tests"
    if exit_code == USAGE_ERROR:
        reason = next((line.removeprefix("ERROR: ") for line in said.splitlines() if line.startswith("ERROR: ")), "")
        reason = reason.removeprefix(f"Wrong expression passed to '-k': {keyword}: ")
        what = f"-k {keyword!r} is not an expression pytest reads" if keyword else "pytest refused its arguments"
        return f"{what} ({reason})" if reason else what
    return None


@contextlib.contextmanager
def _stderr_to(buffer: io.StringIO | None) -> Iterator[None]:
    if buffer is None:
        yield
        return
    with contextlib.redirect_stderr(buffer):
        yield


@contextlib.contextmanager
def _hypothesis_storage() -> Iterator[None]:
    """Hypothesis's files (its constants cache; the example database is off) in the user cache folder, never
    ``.hypothesis/`` in the folder the user runs the command from."""
    from hypothesis import configuration

    from converter.cache import cache_dir

    configuration.set_hypothesis_home_dir(cache_dir() / "hypothesis")
    try:
        yield
    finally:
        configuration.set_hypothesis_home_dir(None)


class _Collector:
    """A pytest plugin that counts outcomes and keeps the ids of failures and the reasons of skips."""

    def __init__(self) -> None:
        self.counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
        self.failures: list[str] = []
        self.skipped: list[str] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or report.outcome != "passed":
            kind = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if report.outcome == "failed":
                self.failures.append(report.nodeid)
            elif report.outcome == "skipped":
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                self.skipped.append(f"{report.nodeid}: {reason.removeprefix('Skipped: ')}")

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.counts["error"] += 1
            self.failures.append(f"{report.nodeid} (collection)")


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def _no_bytecode() -> Iterator[None]:
    """pytest rewrites test modules' asserts and caches the result beside them: not in an installation."""
    saved = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = saved


class DeviceSide:
    """Our model on ``device`` as a parity ``Side``: inputs moved there, outputs brought back, true float32."""

    def __init__(self, model, device) -> None:
        from .runner import torch_layers

        self.model, self.device = model.to(device), device
        self.layers = torch_layers(self.model)

    def stages(self, x) -> Iterator:
        import torch

        from mantranet_torch.precision import float32_precision

        from .compare import from_nhwc, to_nhwc

        with torch.inference_mode(), float32_precision("fp32"):
            for name, out in self.model.stages(from_nhwc(x).to(self.device)):
                yield name, to_nhwc(out)

    def layer(self, name: str, *inputs):
        import torch

        from mantranet_torch.precision import float32_precision

        from .compare import from_nhwc, to_nhwc

        with torch.inference_mode(), float32_precision("fp32"):
            return to_nhwc(self.layers[name](*(from_nhwc(a).to(self.device) for a in inputs)))


def device_check(device: str, releases: Sequence[int] = DEVICE_RELEASES, size: int | None = None) -> DeviceCheck:
    """The model on ``device`` against the TensorFlow reference (on the CPU), layer by layer, on the built-in
    images, with the project's tolerance policy and the float64 evaluation arbitrating (as ``run_parity`` does on
    images this small): the same check as the suite's, on the device's kernels. ``size``: the images' side
    (default: the built-in set's)."""
    import numpy as np
    import torch

    import reference
    from converter import keras_to_torch, synthetic_keras_weights
    from mantranet_torch import LAYERS, RELEASES, ManTraNet, scale_pixels

    from .builtin_images import builtin_images
    from .oracle import Oracle
    from .runner import compare_layers

    target = torch.device(device)
    torch.empty(1, device=target)  # fails here, clearly, when the device is not there
    images = builtin_images() if size is None else builtin_images(size)
    worst: dict[str, float] = {}
    first = None
    for release in releases:
        config = RELEASES[release]
        arrays = synthetic_keras_weights(config, seed=release)
        model = ManTraNet(config)
        model.load_state_dict(keras_to_torch(arrays, config, f"release {release}"))
        side = DeviceSide(model.eval(), target)
        ref = reference.from_keras_arrays(arrays, config)
        oracle = Oracle(ref.arrays, config)  # float64: where the reference drifts, the exact value arbitrates
        for image in images:
            x = scale_pixels(torch.from_numpy(image.pixels)).numpy()[None]
            report = compare_layers(ref, side, np.ascontiguousarray(x), oracle=oracle)
            for layer in report.layers:
                if layer.local is not None:
                    worst[layer.name] = max(worst.get(layer.name, 0.0), layer.local.max_abs)
                for mode, comparison in layer.comparisons.items():
                    if not comparison.passed and first is None:
                        first = f"release {release}, image {image.name}: {layer.name} ({mode})"
    ordered = {name: worst[name] for name in LAYERS if name in worst}
    return DeviceCheck(str(target), list(releases), len(images), first is None, first, ordered)
