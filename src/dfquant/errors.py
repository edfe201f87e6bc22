"""User-facing errors.

A :class:`DfqError` carries a one-line message that names the fix; the CLI prints it
and exits with code 2 instead of showing a traceback.
"""


class DfqError(Exception):
    """Bad input or missing resource; the message says what to do about it."""
