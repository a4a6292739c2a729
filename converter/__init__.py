"""Official ManTraNet Keras HDF5 files to PyTorch weights, with h5py alone (no TensorFlow)."""

from .convert import Conversion, convert_h5, identify_keras_file, output_paths, save_conversion, write_official_h5
from .errors import ConversionError
from .keras_h5 import FULL_MODEL, WEIGHTS_ONLY, KerasWeights, read_keras_h5
from .legacy import EarlierPortWarning, load_earlier_port
from .mapping import MAPPING, keras_to_torch, torch_to_keras
from .onnx_export import OnnxModel, export_onnx
from .synthetic import synthetic_keras_weights

__all__ = [
    "FULL_MODEL",
    "MAPPING",
    "WEIGHTS_ONLY",
    "Conversion",
    "ConversionError",
    "EarlierPortWarning",
    "KerasWeights",
    "OnnxModel",
    "convert_h5",
    "export_onnx",
    "identify_keras_file",
    "keras_to_torch",
    "load_earlier_port",
    "output_paths",
    "read_keras_h5",
    "save_conversion",
    "synthetic_keras_weights",
    "torch_to_keras",
    "write_official_h5",
]
