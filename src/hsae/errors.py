"""The one error type users see: a clear message naming the problem and the fix (CLI exit code 2)."""


class HsaeError(Exception):
    """Bad input or an impossible request. The message says what is wrong and how to fix it."""

    exit_code = 2


class HsaeWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""
