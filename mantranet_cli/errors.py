"""Expected failures of a command: shown as one message, never as a traceback."""

BAD_INPUT = 2  # `mantranet parity`'s exit status for input it cannot compare; 1 there means "layers differ"


class CommandError(Exception):
    """A failure the user can act on; ``exit_code`` is what the command returns."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
