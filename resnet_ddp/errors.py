"""The one error type that means "the user asked for something we refuse"."""


class UsageError(Exception):
    """Bad option, bad environment value or unusable setup.

    The entry point prints it as one line on stderr and exits 2, before any
    training process starts. Anything else that escapes is a bug or a run-time
    failure and keeps its traceback.
    """


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full or read-only disk); the previous ones are intact."""


class ReportedElsewhere(Exception):
    """A refusal that rank 0 reports for every rank: this rank exits with `code` and prints nothing."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code
