"""User-facing errors. Their messages are one line that says what to do; the CLI prints them
without a stack trace."""


class OnepassError(Exception):
    """A mistake in the user's input or environment, not a bug in onepass."""


class ModelLoadError(OnepassError):
    """The model could not be found, read or understood."""
