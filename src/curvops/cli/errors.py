"""The one error type of the command line: a usage error reported in one line, exit code 2."""

from __future__ import annotations

EXIT_USAGE = 2


class CLIError(Exception):
    """A mistake in the command's arguments or the user's factories.

    :func:`curvops.cli.main.main` prints its message as one line (``curvops <command>: error:
    <message>``) and returns exit code :data:`EXIT_USAGE`. Messages say what was wrong and
    how to fix it.

    Args:
        message: What was wrong and how to fix it.
        prog: The (sub-)command the error belongs to, if known before parsing finished.
    """

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(message)
        self.prog = prog
