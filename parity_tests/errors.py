"""The one exception of the parity API for input it cannot compare (``mantranet parity`` exits 2 on it)."""


class ParityInputError(ValueError):
    """Bad input to a parity run: the message names the file, option or layer at fault."""
