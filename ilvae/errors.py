"""User-facing errors: reported by the CLI as one line naming the field and what is allowed."""


class ConfigurationError(ValueError):
    """Bad configuration or bad data, detected before (or at the very start of) training."""


class CheckpointError(ConfigurationError):
    """A checkpoint file that cannot be used: missing, truncated, corrupted or untrusted."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stopped before saving anything else.

    ``report`` holds the step, epoch, batch index, the loss terms logged at that step and the
    last checkpoint written before it.
    """

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = dict(report or {})
