"""The original ManTraNet code as the reference: the user's own copy of the official ``src/modelCore.py``, run
unmodified on TensorFlow 2 under ``tf_keras`` (the Keras 2 API).

The project holds none of that code (its licence allows academic use only): it runs the file the user gives, or
the one ``mantranet weights fetch --code`` downloaded from the official URL and verified by its git blob SHA-1.
What it takes to run it here is this compatibility layer:

- its Keras 2.2 import paths (``keras.layers.convolutional._Conv``, ``keras.legacy.interfaces``,
  ``keras.engine.InputSpec``, ``keras.backend``, ...) resolve to their ``tf_keras`` equivalents, for that file
  alone (its own ``__import__``; nothing is put in ``sys.modules``, so Keras 3 stays importable beside it);
- three TensorFlow 1 graph behaviours are restored: on its ``CombinedConv2D`` (b1c1), the SRM kernel stays an
  untracked constant (TF1 never saved it; eager TF2 would track it as a 27th weight and ``load_weights`` fails
  with "expects 27 weights, saved 26"), and the combined kernel is rebuilt from the layer's weights at each call
  (TF1 rebuilt it in the graph; eager TF2 keeps the concatenation of the initial weights, so loaded weights would
  be ignored); its ``BayarConstraint`` is given the updated value as a tensor, as Keras 2.2's optimisers gave
  it (tf_keras' give the variable, on which its ``w *= ...`` fails).

``OfficialModel`` then builds the release's model with the official ``create_model``, loads the official-layout
weight file with Keras' own ``load_weights``, and taps the 21 named layers (Featex's output is its L2 layer).
With ``dtype="float64"`` (``K.set_floatx`` while building) it is the exact answer of the float64 attribution.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import tempfile
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from converter import Conversion, ConversionError, KerasWeights, identify_keras_file
from converter.releases import Identification, file_digests, official_code, official_code_path
from mantranet_torch.config import ManTraNetConfig
from mantranet_torch.weights import H5_SUFFIXES  # what Keras' load_weights reads as HDF5 too

from .model import DETECTOR_LAYERS, FEATEX_LAYERS, LAYERS

FEATEX_MODEL = "Featex"  # the feature extractor, a model nested in the official one
EXPAND_TIME = "expTime"  # the Lambda between glbStd and divStd (glbStd's output given a time axis)


class OfficialCodeError(Exception):
    """The official code cannot be found, read, or run here; the message names the file and says why."""


@dataclass(frozen=True)
class CodeCopy:
    """A copy of the official ``modelCore.py``: where it is, its git blob SHA-1, and whether that is the official
    file's (``weights/releases.json``)."""

    path: Path
    git_blob_sha1: str

    @property
    def verified(self) -> bool:
        return self.git_blob_sha1 == official_code().git_blob_sha1

    def describe(self) -> str:
        official = official_code().git_blob_sha1
        status = "the official file" if self.verified else f"NOT the official file, whose is {official}"
        return f"{self.path} (git blob SHA-1 {self.git_blob_sha1}: {status})"


def find_official_code(location: str | Path | None = None) -> CodeCopy:
    """``location``: the official ``modelCore.py``, or a folder holding it (the user's clone's ``src/`` or the
    clone itself); None for the copy ``mantranet weights fetch --code`` downloaded."""
    name = official_code().file
    if location is None:
        cached = official_code_path()
        if not cached.is_file():
            raise OfficialCodeError(
                f"no official {name} in {cached.parent}: download it with 'mantranet weights fetch --code', "
                "or give the folder of your copy with --reference official:DIR"
            )
        location = cached
    path = Path(location).expanduser()
    candidates = [path] if path.is_file() else [path / name, path / "src" / name]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return CodeCopy(candidate, file_digests(candidate).git_blob_sha1)
            except OSError as e:
                raise OfficialCodeError(f"{candidate}: cannot read it ({e.strerror or e})") from None
    raise OfficialCodeError(
        f"{path}: no {name} there; give the folder that holds the official ManTraNet src/{name}, "
        "or download it with: mantranet weights fetch --code"
    )


# --- the import shim ------------------------------------------------------------------------------------------


def _keras2_names() -> dict[str, Any]:
    """What each Keras 2.2 import of the official code resolves to under tf_keras."""
    import tf_keras
    from tf_keras.src.layers.convolutional.base_conv import Conv

    def legacy_conv2d_support(fn: Any) -> Any:
        return fn  # Keras 2.2 translated Keras 1 argument names; the official code passes Keras 2 ones

    return {
        "keras": tf_keras,
        "keras.backend": tf_keras.backend,
        "keras.layers": tf_keras.layers,
        "keras.models": tf_keras.models,
        "keras.constraints": tf_keras.constraints,
        "keras.activations": tf_keras.activations,
        "keras.initializers": tf_keras.initializers,
        "keras.layers.convolutional": types.SimpleNamespace(_Conv=Conv),
        "keras.legacy": types.SimpleNamespace(
            interfaces=types.SimpleNamespace(legacy_conv2d_support=legacy_conv2d_support)
        ),
        "keras.engine": types.SimpleNamespace(InputSpec=tf_keras.layers.InputSpec, Layer=tf_keras.layers.Layer),
    }


def _importer(source: Path, names: dict[str, Any]) -> Any:
    def shim_import(name: str, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == "keras" or name.startswith("keras.")):
            if name not in names:
                raise ImportError(
                    f"{source}: imports {name}, which the Keras 2 compatibility layer does not provide "
                    "(is this the official modelCore.py?)"
                )
            return names[name] if fromlist else names["keras"]
        return builtins.__import__(name, globals, locals, fromlist, level)

    return shim_import


def _restore_tf1_graph_behaviours(module: types.ModuleType) -> None:
    """The two behaviours of TensorFlow 1 graphs that eager TensorFlow 2 lacks, restored on b1c1's layer."""
    layer_class = module.CombinedConv2D
    build_srm_kernel = layer_class._build_SRM_kernel
    official_call = layer_class.call

    def srm_kernel_constant(self: Any) -> tf.Tensor:
        # The official code makes the SRM kernel with K.variable, outside Keras' weight lists; TF1 never saved it.
        return tf.constant(build_srm_kernel(self).numpy(), dtype=self.dtype)

    def call_with_current_kernel(self: Any, inputs: tf.Tensor) -> tf.Tensor:
        # The official build concatenates regular, SRM and Bayar kernels once; TF1 re-evaluated that in the graph.
        parts = [k for k in (self.regular_kernel, self.srm_kernel, self.bayar_kernel) if k is not None]
        self.kernel = tf.concat([tf.convert_to_tensor(k) for k in parts], axis=-1)
        return official_call(self, inputs)

    layer_class._build_SRM_kernel = srm_kernel_constant
    layer_class.call = call_with_current_kernel

    constraint_class = module.BayarConstraint
    official_constrain = constraint_class.__call__

    def constrain_value(self: Any, w: Any) -> tf.Tensor:
        # Keras 2.2's optimisers gave a constraint the updated value (a graph tensor), which its in-place
        # arithmetic then rebinds; tf_keras gives the variable itself, which refuses `*=`. Its mask, made in
        # float32, follows the weight's dtype (a float64 build).
        w = tf.convert_to_tensor(w)
        if self.mask is None:
            self._initialize_mask(w)
        self.mask = tf.cast(self.mask, w.dtype)
        return official_constrain(self, w)

    constraint_class.__call__ = constrain_value


def load_official_code(code: CodeCopy) -> types.ModuleType:
    """The official ``modelCore.py`` executed as it is, its Keras 2 imports resolved under tf_keras, with the two
    TF1 behaviours restored. A fresh module each call, never registered in ``sys.modules``."""
    try:
        source = code.path.read_bytes()
    except OSError as e:
        raise OfficialCodeError(f"{code.path}: cannot read it ({e.strerror or e})") from None
    try:
        names = _keras2_names()
    except ImportError as e:
        raise OfficialCodeError(
            f"running the official code needs tf_keras ({e}); install it with: pip install 'mantranet-torch[reference]'"
        ) from None
    module = types.ModuleType("mantranet_official_modelCore")
    module.__file__ = str(code.path)
    module.__dict__["__builtins__"] = {**builtins.__dict__, "__import__": _importer(code.path, names)}
    try:
        exec(compile(source, str(code.path), "exec"), module.__dict__)
        _restore_tf1_graph_behaviours(module)
    except OfficialCodeError:
        raise
    except Exception as e:  # any failure of someone else's code, reported with the file it came from
        raise OfficialCodeError(f"{code.path}: the official code does not run here: {type(e).__name__}: {e}") from e
    return module


# --- the model ----------------------------------------------------------------------------------------------


def official_arguments(variant: int) -> tuple[int, list[int]]:
    """``create_model``'s feature-extractor type and window sizes for release ``variant``, as the official
    ``load_pretrain_model_by_index`` chooses them."""
    if variant == 4:
        return 2, [7, 15, 31]
    return variant, [7, 15, 31, 63]


@contextlib.contextmanager
def keras_floatx(dtype: str) -> Iterator[None]:
    import tf_keras

    previous = tf_keras.backend.floatx()
    tf_keras.backend.set_floatx(dtype)
    try:
        yield
    finally:
        tf_keras.backend.set_floatx(previous)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The official code's prints ("INFO: ..."), Keras' warnings on it (unseeded initialisers) and TensorFlow's
    notices (retracing for each new image size) kept off the user's screen."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _hdf5_name(path: Path) -> Iterator[Path]:
    """``path`` under a name Keras reads as HDF5 (a link in a temporary folder when its suffix is another)."""
    if path.suffix.lower() in H5_SUFFIXES:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="mantranet-official-") as folder:
        link = Path(folder) / "weights.h5"
        link.symlink_to(path.resolve())
        yield link


class OfficialModel:
    """The official model of one release, built by the official code and loaded from an official-layout file.

    ``trace(x)`` gives the 21 named layers (``reference.LAYERS``) as the official ``predict`` computes them;
    ``stages`` and ``layer`` make it the float64 oracle of the attribution (``dtype="float64"``); ``arrays``
    are the file's Keras arrays (read with h5py) for the tolerance policy.
    """

    def __init__(
        self,
        code: CodeCopy,
        weights: str | Path,
        variant: int | None = None,
        dtype: str = "float32",
        *,
        identified: tuple[KerasWeights, Identification, ManTraNetConfig] | None = None,
        weights_of: OfficialModel | None = None,
    ) -> None:
        """The official model of the release in ``weights``, built by ``code`` in ``dtype``.

        Args:
            code: the official ``modelCore.py`` (``find_official_code``).
            weights: an official-layout ``.h5`` file, loaded by the official code's ``load_weights``.
            variant: the release 0-4 when neither the file's hash nor its name tells.
            dtype: Keras' floatx for the model, ``float32`` or ``float64``.
            identified: the file's arrays, identification and architecture when already read (``from_conversion``).
            weights_of: a model of the same file whose weights are copied (cast to ``dtype``) instead of loading it.

        Raises:
            ConversionError: the file cannot be identified or the official code cannot load it.
        """
        weights = Path(weights)
        if identified is None:
            keras_file, _, identification, config = identify_keras_file(weights, variant)
        else:
            keras_file, identification, config = identified
        self.code, self.source, self.dtype = code, str(weights), dtype
        self._identified = (keras_file, identification, config)
        self.config: ManTraNetConfig = config
        self.variant = identification.index
        self.arrays = {path: np.asarray(value, dtype=np.float32) for path, value in keras_file.arrays.items()}
        module = load_official_code(code)
        featex_type, windows = official_arguments(self.variant)
        import tf_keras

        with keras_floatx(dtype), _quiet():
            try:
                self.model = module.create_model(featex_type, False, windows)
                if weights_of is not None:
                    self.model.set_weights([np.asarray(w, dtype=dtype) for w in weights_of.model.get_weights()])
                else:
                    with _hdf5_name(weights) as readable:
                        self.model.load_weights(str(readable))
            except (ValueError, OSError, KeyError, TypeError) as e:
                raise ConversionError(
                    f"{weights}: the official code cannot load it as release {self.variant}: {e}"
                ) from None
            featex = self.model.get_layer(FEATEX_MODEL)
            self._layers = {name: featex.get_layer(name) for name in FEATEX_LAYERS}
            self._layers.update({name: self.model.get_layer(name) for name in (*DETECTOR_LAYERS, EXPAND_TIME)})
            self._featex_taps = tf_keras.Model(featex.input, [featex.get_layer(n).output for n in FEATEX_LAYERS])
            self._detector_taps = tf_keras.Model(
                self.model.input, [self.model.get_layer(n).output for n in DETECTOR_LAYERS]
            )

    @classmethod
    def from_conversion(cls, code: CodeCopy, conversion: Conversion, dtype: str = "float32") -> OfficialModel:
        """The official model of the file ``conversion`` read and identified: not read or hashed again here (the
        official ``load_weights`` reads it, as it must to be checked)."""
        identified = (conversion.keras, conversion.identification, conversion.config)
        return cls(code, conversion.source, dtype=dtype, identified=identified)

    def twin(self, dtype: str) -> OfficialModel:
        """The same official model in another ``dtype`` (float64: the exact answer), its weights copied from this
        one: the file is not read again."""
        return OfficialModel(self.code, self.source, dtype=dtype, identified=self._identified, weights_of=self)

    def _input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[3] != 3 or min(x.shape[:3]) < 1:
            raise ValueError(f"expected a non-empty N x H x W x 3 array scaled to [-1, 1], got shape {x.shape}")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The official model's ``predict``: N x H x W x 3 in [-1, 1] to N x H x W x 1."""
        with _quiet():
            return self.model.predict_on_batch(self._input(x))

    def trace(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every named layer's output, NHWC, as the official model computes it (two tapped models, each run as
        ``predict`` runs: the feature extractor's layers, and the detector's with the whole model before them)."""
        x = self._input(x)
        with _quiet():
            outputs = [*self._featex_taps.predict_on_batch(x), *self._detector_taps.predict_on_batch(x)]
        return {name: np.asarray(out) for name, out in zip(LAYERS, outputs, strict=True)}

    def stages(self, x: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        yield from self.trace(x).items()

    def layer(self, name: str, *inputs: np.ndarray) -> np.ndarray:
        """One named layer of the official model on its own inputs (NHWC; those of ``runner.LAYER_INPUTS``)."""
        return self.call_layer(name, *(tf.constant(np.asarray(a, dtype=self.dtype)) for a in inputs)).numpy()

    def call_layer(self, name: str, *inputs: tf.Tensor, training: bool = False) -> tf.Tensor:
        """One named layer of the official model called on tensors (what a ``tf.GradientTape`` records).

        ``training``: bnorm on the batch's statistics, its moving averages updated (as in ``fit``).
        """
        if name not in self._layers:
            raise KeyError(f"no layer named {name!r}")
        if name == "divStd":
            deviations, sigma = inputs
            return self._layers[name]([deviations, self._layers[EXPAND_TIME](sigma)])
        if name == "bnorm":
            return self._layers[name](inputs[0], training=training)
        return self._layers[name](*inputs)

    def variables(self) -> dict[str, tf.Variable]:
        """Each of the file's Keras arrays (``arrays``' paths) to the official model's variable that holds it."""
        found = {}
        for path in self.arrays:
            layer, weight = path.split("/")[1], path.rsplit("/", 1)[1]
            matches = [v for v in self._layers[layer].weights if v.name.rsplit("/", 1)[-1] == weight]
            if len(matches) != 1:
                raise OfficialCodeError(f"{self.code.path}: layer {layer} has no single weight named {weight}")
            found[path] = matches[0]
        return found
