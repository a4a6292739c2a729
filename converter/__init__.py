"""Official ManTraNet Keras HDF5 files to PyTorch weights, with h5py alone (no TensorFlow), and every weight file
this project reads: ``load_weights`` (any of them, to a model), ``identify`` (what a file is), ``pretrained`` and
``fetch`` (the official releases through the per-user cache, ``cache``)."""

from .convert import Conversion, convert_h5, identify_keras_file, output_paths, save_conversion, write_official_h5
from .errors import ConversionError
from .file_record import FileRecord, identify
from .keras_h5 import FULL_MODEL, WEIGHTS_ONLY, KerasWeights, read_keras_h5
from .legacy import EarlierPortWarning, load_earlier_port
from .load import load_weights
from .mapping import MAPPING, keras_to_torch, torch_to_keras
from .onnx_export import OnnxModel, export_onnx
from .synthetic import synthetic_keras_weights
from .trained import FetchResult, PretrainedError, fetch, list_weights, pretrained

__all__ = [
    "FULL_MODEL",
    "MAPPING",
    "WEIGHTS_ONLY",
    "Conversion",
    "ConversionError",
    "EarlierPortWarning",
    "FetchResult",
    "FileRecord",
    "KerasWeights",
    "OnnxModel",
    "PretrainedError",
    "convert_h5",
    "export_onnx",
    "fetch",
    "identify",
    "identify_keras_file",
    "keras_to_torch",
    "list_weights",
    "load_earlier_port",
    "load_weights",
    "output_paths",
    "pretrained",
    "read_keras_h5",
    "save_conversion",
    "synthetic_keras_weights",
    "torch_to_keras",
    "write_official_h5",
]
