"""User-facing errors: reported by the CLI as one line naming the field and what is allowed."""


class ConfigurationError(ValueError):
    """Bad configuration or bad data, detected before (or at the very start of) training."""
