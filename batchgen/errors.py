"""Errors that end a run with a one-line message instead of a traceback."""


class BatchgenError(Exception):
    """Bad config or input: reported as one line, exit code 2, before any model loads."""

    exit_code = 2
