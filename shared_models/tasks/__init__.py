"""Tasks: input schema, upstream file loaders, per-site preprocessing, model and metric choice.

A task is what the coordinator and every hospital must agree on; it travels in the app bundle
the hospitals approve. Each family of tasks has its own module (``tabular``: one task per task
file in the app's ``tasks/`` folder, see :mod:`.taskfile`; ``images``: chest X-rays; ``icu``: ICU
stays as time series); this package holds the registry. The training loop takes a task's
``Dataset`` and a model from :mod:`shared_models.models`, so a new family adds a loader and a
model, not a branch in ``client/training.py``.
"""

from __future__ import annotations

from pathlib import Path

from .base import LABEL, DataError, SiteData, Task, prepare_site
from .icu import ICU_TASKS
from .images import IMAGE_TASKS
from .tabular import TABULAR_TASKS, TASK_FILE_PROBLEMS, TASKS_DIR, load_task_folder
from .taskfile import TaskFileError

__all__ = [
    "LABEL", "TASKS", "TASKS_DIR", "DataError", "SiteData", "Task", "TaskFileError",
    "app_task_names", "get_task", "prepare_site", "task_file_problems",
]  # fmt: skip

TASKS: dict[str, Task] = {**TABULAR_TASKS, **IMAGE_TASKS, **ICU_TASKS}


def get_task(name: str) -> Task:
    """Return the registered task ``name``.

    Raises
    ------
    ValueError
        Unknown name; the message lists the known tasks (and any task file of ``tasks/`` that
        could not be loaded, with its problem).
    """
    try:
        return TASKS[name]
    except KeyError:
        broken = "".join(f"; {problem}" for problem in TASK_FILE_PROBLEMS.values())
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}{broken}"
        ) from None


def app_task_names(app_dir: Path) -> list[str]:
    """The tasks an app folder provides: the tasks written in Python (this installation's) and
    the task files of ``app_dir/tasks/`` (e.g. a copy of the app with a consortium's task)."""
    in_code = set(TASKS) - set(TABULAR_TASKS)
    return sorted(in_code | set(load_task_folder(Path(app_dir) / "tasks")[0]))


def task_file_problems(app_dir: Path) -> list[str]:
    """Why task files of ``app_dir/tasks/`` could not be loaded (invalid, misnamed)."""
    return list(load_task_folder(Path(app_dir) / "tasks")[1].values())
