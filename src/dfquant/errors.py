"""User-facing errors.

A :class:`DfqError` carries a one-line message that names the fix; the CLI prints it
and exits with code 2 instead of showing a traceback. The library names the parameters of
the call that failed (``wbits=9 is not supported``) and lists them in ``params``; the CLI
renders those as its flags (``--wbits 9 is not supported``), so neither audience reads the
other's spelling.
"""

from __future__ import annotations

import re
from typing import Callable


class DfqError(Exception):
    """Bad input or missing resource; the message says what to do about it."""

    def __init__(self, message: str, *, params: tuple[str, ...] = ()):
        super().__init__(message)
        self.params = tuple(params)

    def render(self, flag: Callable[[str], str] = lambda p: "--" + p.replace("_", "-")) -> str:
        """The message with each ``name=`` of :attr:`params` written as ``flag(name)`` (``name=True`` as the
        bare flag): how the CLI shows a library error."""
        text = str(self)
        for p in self.params:
            text = re.sub(rf"(?<![\w.-]){re.escape(p)}=(True\b|(?=[\s,;)]|$))", flag(p), text)
            text = re.sub(rf"(?<![\w.-]){re.escape(p)}=", flag(p) + " ", text)
        return text
