"""Errors that the command line turns into one line (no traceback), importable without torch."""

from __future__ import annotations

import warnings


class DataError(ValueError):
    """A data file is missing, malformed, or does not match the task's schema.

    The message names the file (and row / column where there is one) and what to do.
    """


class DataWarning(UserWarning):
    """Data that is used, but not all of it: files or rows left out (with a count and examples).

    The command line prints it as one ``warning:`` line (:func:`warn_data`).
    """


def warn_data(message: str) -> None:
    """Emit ``message`` as a :class:`DataWarning` (shown once per message and process)."""
    warnings.warn(message, DataWarning, stacklevel=2)


def examples(names: list[str], *, limit: int = 3) -> str:
    """``"a.png, b.png, c.png, ..."``: the first ``limit`` names, for a message with a count."""
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "")


__all__ = ["DataError", "DataWarning", "examples", "warn_data"]
