"""User-facing errors. Their messages are one line that says what to do; the CLI prints them
without a stack trace."""


class OnepassError(Exception):
    """A mistake in the user's input or environment, not a bug in onepass."""


class ModelLoadError(OnepassError):
    """The model could not be found, read or understood."""


class InputError(OnepassError, ValueError):
    """An invalid request: a prompt, sampling parameter or option the user gave."""


class BusyError(OnepassError, RuntimeError):
    """A request started on an LLM that is running another one in the same thread."""
