"""Errors that the command line turns into one line (no traceback), importable without torch."""

from __future__ import annotations


class DataError(ValueError):
    """A data file is missing, malformed, or does not match the task's schema.

    The message names the file (and row / column where there is one) and what to do.
    """


__all__ = ["DataError"]
