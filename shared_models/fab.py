"""Flower App Bundles (FABs) built from an app folder without walking its virtual environment.

Flower 1.41 builds a FAB (``flwr.cli.build.build_fab_from_disk``, which ``flwr run APP_DIR``
also calls) by walking every file under the folder (``flwr.cli.utils.collect_files``) and only
then dropping what its publish rules exclude. fedcare's app folder is its checkout, where the
README's install puts ``.venv`` (about 50,000 files): the walk took 9 s on the 2-core machine,
in every ``fedcare client approve`` of the checkout and twice in every ``fedcare server run``.

:func:`app_files` collects the same files as Flower's ``collect_files`` but does not enter the
folders Flower's publish rules exclude whatever their content (``APP_PUBLISH_EXCLUDE_PATTERNS``:
``.flwr/**`` and ``.venv/**`` at the top, ``__pycache__`` anywhere); each other top-level folder is
walked by Flower's own ``collect_files``. :func:`build_fab` hands them to Flower's
``build_fab_from_files``, so the bytes, hence the SHA-256 hospitals approve, are Flower's.
``tests/test_approval.py`` compares the result with ``build_fab_from_disk`` on the checkout and
on a folder with every excluded kind of path, and ``tests/test_flower_internals.py`` pins
``collect_files`` and the exclude patterns.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

# The parts of ``flwr.supercore.constant.APP_PUBLISH_EXCLUDE_PATTERNS`` that exclude whole folders
# (pinned with it in tests/test_flower_internals.py).
SKIPPED_AT_TOP = frozenset({".flwr", ".venv"})
SKIPPED_ANYWHERE = "__pycache__"


def app_files(root: Path) -> dict[str, Path]:
    """The files of an app folder that Flower's FAB build considers, by relative POSIX path.

    Equal to ``flwr.cli.utils.collect_files(root)`` after Flower's exclude patterns, without
    entering the folders those patterns exclude (see the module docstring).

    Parameters
    ----------
    root : Path
        The app folder (with ``pyproject.toml``).
    """
    from flwr.cli.utils import collect_files

    root = root.expanduser().resolve()
    files: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_symlink():  # Flower: symlinked files are skipped, symlinked folders not entered
            continue
        if entry.is_dir():
            if entry.name in SKIPPED_AT_TOP or entry.name == SKIPPED_ANYWHERE:
                continue
            for rel, path in collect_files(entry).items():
                if SKIPPED_ANYWHERE not in rel.split("/"):
                    files[f"{entry.name}/{rel}"] = path
        elif entry.is_file():
            files[entry.name] = entry
    return files


def build_fab(root: Path) -> bytes:
    """The FAB of an app folder, byte for byte what ``flwr run ROOT`` would submit.

    Source: ``flwr.cli.build.build_fab_from_files`` over :func:`app_files`.

    Raises
    ------
    ValueError
        Flower's: the folder is not a valid Flower app (e.g. no ``[project]`` in pyproject.toml).
    """
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(app_files(root))[0]


def unpack_fab(fab: bytes, dst: Path) -> Path:
    """Write a FAB's app files (not its ``.info/`` metadata) into ``dst``: an app folder whose FAB
    is ``fab`` again (Flower's build is deterministic). Returns ``dst``."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        for name in archive.namelist():
            if not name.startswith(".info/"):
                (dst / name).parent.mkdir(parents=True, exist_ok=True)
                (dst / name).write_bytes(archive.read(name))
    return dst
