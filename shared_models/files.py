"""Writing files so that a crash never leaves a half-written one (ledgers, approvals, reports)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any, *, indent: int = 2) -> None:
    """Write ``data`` as JSON to ``path``: a temporary file in the same folder, flushed and
    fsynced, then renamed over ``path`` (``os.replace``) and the folder fsynced, so the rename
    itself survives a power cut. A crash leaves the previous version.

    Raises
    ------
    OSError
        The folder cannot be written (the temporary file is removed).
    ValueError
        ``data`` holds NaN or infinity (not valid JSON).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=indent, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """fsync a folder, making a rename or a new file in it durable (POSIX; no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
