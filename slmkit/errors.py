"""The one error type users see: a clear one-line message naming what went wrong and where."""


class SlmError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line, no traceback."""
