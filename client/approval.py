"""The hospital's list of approved app bundles (FABs), kept in its ledger folder.

A Flower SuperNode runs whatever app bundle the coordinator ships, and run-config overrides
(e.g. the noise level) are covered by no signature. A fedcare hospital therefore runs only FABs
whose SHA-256 (the hash Flower itself uses to name and store a FAB) its operator approved with
``fedcare client approve``; the approved code then enforces the hospital policy on the run config.

Inspecting a bundle never executes it: the FAB is read as a zip archive, its task list is
parsed from ``shared_models/tasks/*.py`` with :mod:`ast` and from the task files
``tasks/*.toml`` (validated as data, see :mod:`shared_models.tasks.taskfile`), and its
metadata from its ``pyproject.toml``.

Layout: ``<ledger>/approved.json`` = ``{"approved": [{"sha256", "fab_id", "version",
"tasks", "files", "approved_at", "source"}, ...]}``, written atomically (temporary file, fsync,
rename) and never reset: an unreadable file is an error the hospital must resolve.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import tomllib
import zipfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.common.config import get_metadata_from_config

from shared_models.files import write_json_atomic

APPROVED_FILE = "approved.json"
TASKS_PACKAGE = "shared_models/tasks/"  # where a fedcare bundle registers its Python tasks
TASK_FILES = "tasks/"  # the bundle's task files (tasks/NAME.toml), one tabular task each


class ApprovalError(RuntimeError):
    """A bundle cannot be read, or the approved list is unreadable (never reset automatically)."""


@dataclass(frozen=True)
class BundleInfo:
    """What an operator sees before approving a bundle.

    Attributes
    ----------
    sha256 : str
        SHA-256 of the FAB's bytes (64 hex digits): Flower's ``fab_hash``.
    fab_id : str
        ``publisher/name`` from the bundle's pyproject.toml.
    version : str
        ``[project].version`` from the bundle's pyproject.toml.
    files : list[str]
        Files in the bundle with their sizes in bytes, ``"path (N bytes)"``.
    tasks : list[str]
        Task names registered in the bundle's ``TASKS`` (parsed, never imported) and those of
        its task files.
    """

    sha256: str
    fab_id: str
    version: str
    files: list[str]
    tasks: list[str]


def fab_bytes(source: Path) -> bytes:
    """The FAB of ``source``: a ``.fab`` file's bytes, or the FAB built from an app folder.

    An app folder is packed with :func:`shared_models.fab.build_fab`: Flower's own build
    (``flwr.cli.build``, which ``flwr run APP_DIR`` uses; deterministic: sorted files, fixed zip
    dates) without walking the folder's ``.venv``, so the hash equals the ``fab_hash`` of a run
    submitted from that folder.

    Raises
    ------
    ApprovalError
        ``source`` does not exist, or the folder is not a valid Flower app.
    """
    if source.is_file():
        return source.read_bytes()
    if not (source / "pyproject.toml").is_file():
        raise ApprovalError(f"{source}: neither a .fab file nor an app folder with pyproject.toml")
    from shared_models.fab import build_fab

    try:
        return build_fab(source)
    except ValueError as exc:
        raise ApprovalError(f"{source}: not a valid Flower app ({exc})") from None


def task_names(source: str, *, module: str = TASKS_PACKAGE) -> list[str]:
    """Task names registered in a module of ``shared_models/tasks/``, without executing it.

    Reads the string keys of the dict literals assigned to a name ending in ``TASKS``
    (``TABULAR_TASKS = {...}``, annotated or not). Returns an empty list when there is none.

    Raises
    ------
    ApprovalError
        The source is not valid Python.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ApprovalError(f"{module}: not valid Python ({exc})") from None
    names: list[str] = []
    for node in tree.body:
        target: ast.expr | None = None
        value: ast.expr | None = None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign):
            target, value = node.target, node.value
        if (
            isinstance(target, ast.Name)
            and target.id.endswith("TASKS")
            and isinstance(value, ast.Dict)
        ):
            names += [
                k.value
                for k in value.keys
                if isinstance(k, ast.Constant) and isinstance(k.value, str)
            ]
    return names


def task_file_name(text: str, *, path: str) -> str:
    """The task name of a bundle's task file ``tasks/NAME.toml``, validated as data.

    Raises
    ------
    ApprovalError
        The file is not a valid task file, or its task name is not its file name (the
        hospitals would not load it): the bundle should not be approved.
    """
    from shared_models.tasks.taskfile import TaskFileError, parse_task_text

    try:
        spec = parse_task_text(text, source=path)
    except TaskFileError as exc:
        raise ApprovalError(f"the bundle's task file is invalid: {exc}") from None
    if f"{TASK_FILES}{spec.name}.toml" != path:
        raise ApprovalError(
            f"the bundle's task file {path} names task '{spec.name}'; a task file is named "
            "after its task"
        )
    return spec.name


def inspect_fab(content: bytes) -> BundleInfo:
    """Describe a FAB from its bytes (a zip archive) without extracting or importing it.

    Raises
    ------
    ApprovalError
        Not a zip archive, no ``pyproject.toml`` inside, or an invalid task file (named).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
        names = archive.namelist()
        project = tomllib.loads(archive.read("pyproject.toml").decode())
        tasks = [
            task
            for name in names
            if name.startswith(TASKS_PACKAGE) and name.endswith(".py")
            for task in task_names(archive.read(name).decode(), module=name)
        ]
        tasks += [
            task_file_name(archive.read(name).decode("utf-8-sig"), path=name)
            for name in names
            if name.startswith(TASK_FILES) and name.endswith(".toml") and name.count("/") == 1
        ]
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ApprovalError(f"not a Flower app bundle ({type(exc).__name__}: {exc})") from None
    try:
        fab_id, version = get_metadata_from_config(project)  # Flower's reading of the FAB
    except KeyError as exc:
        raise ApprovalError(f"not a Flower app bundle (pyproject.toml has no {exc})") from None
    files = [
        f"{i.filename} ({i.file_size} bytes)"
        for i in archive.infolist()
        if not i.filename.startswith(".info/")
    ]
    return BundleInfo(
        sha256=hashlib.sha256(content).hexdigest(),
        fab_id=fab_id,
        version=str(version),
        files=files,
        tasks=sorted(tasks),
    )


class ApprovedBundles:
    """``approved.json`` in a hospital's ledger folder.

    Parameters
    ----------
    folder : Path
        The hospital's ledger folder (created on the first approval).
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / APPROVED_FILE

    def entries(self) -> list[dict[str, Any]]:
        """Every approval recorded (oldest first); ``[]`` when none was ever recorded.

        Raises
        ------
        ApprovalError
            The file exists but is truncated, corrupted or of another shape. The message names
            the file; it is never reset automatically.
        """
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            entries = data["approved"]
            if not all(isinstance(e, dict) and _is_sha256(e["sha256"]) for e in entries):
                raise ValueError("an entry has no valid sha256")
            return list(entries)
        except (ValueError, KeyError, TypeError) as exc:
            raise ApprovalError(
                f"approved-bundles file {self.path} is unreadable ({type(exc).__name__}: {exc}); "
                "it is never reset automatically -- restore it from a backup, or move it away and "
                f"approve the bundles again with `fedcare client approve --ledger {self.path.parent} "
                "APP_DIR_OR_FAB`"
            ) from None

    def is_approved(self, sha256: str) -> bool:
        """Whether a FAB with this SHA-256 was approved (raises :class:`ApprovalError`)."""
        return any(e["sha256"] == sha256 for e in self.entries())

    def approve(self, info: BundleInfo, *, source: str) -> bool:
        """Record ``info`` (atomically: write, fsync, rename); existing entries are kept.

        Returns
        -------
        bool
            False when the hash was already approved (nothing is written).

        Raises
        ------
        ApprovalError
            The existing file is unreadable (it is left untouched).
        """
        entries = self.entries()
        if any(e["sha256"] == info.sha256 for e in entries):
            return False
        entry = {
            **asdict(info),
            "approved_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "source": source,
        }
        write_json_atomic(self.path, {"approved": [*entries, entry]}, indent=1)
        return True


def _is_sha256(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )
