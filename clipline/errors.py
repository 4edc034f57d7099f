"""The error type for bad input: the CLI prints its message on one line and exits non-zero, with no traceback."""


class UsageError(ValueError):
    """Input that cannot be used (a file, a column, a value); the message names the problem and the fix."""
