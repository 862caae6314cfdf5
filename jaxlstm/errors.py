"""Exceptions that the command line reports as a one-line message."""


class JaxlstmError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    The message names the value at fault, what was expected and what to do.
    The command line prints it without a traceback and exits with status 1.
    """


class InputError(JaxlstmError, ValueError):
    """An invalid setting, file or text supplied by the user."""


class DownloadError(JaxlstmError):
    """A corpus download that failed or returned something unusable."""


class TrainingError(JaxlstmError):
    """Training that cannot go on, such as a loss that is not finite."""


class TrainingStopped(JaxlstmError):
    """Training stopped by a signal after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum  # the command line exits with 128 + signum
