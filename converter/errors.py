"""The converter's one error type: bad input, named in the message, shown without a traceback."""


class ConversionError(ValueError):
    """An input that cannot be converted; the message names the file and the layer or array at fault."""
