"""The converter's one error type: bad input, named in the message, shown without a traceback."""

from mantranet_torch.files import FileError

# A file that cannot be read, converted or written. The class lives on the ground floor, where the atomic writes
# that raise it for outputs are, so that ``except ConversionError`` catches a refused write as it always has.
ConversionError = FileError
