"""Tasks: input schema, upstream file loaders, per-hospital preprocessing, model and metric choice.

A task is what the coordinator and every hospital must agree on; it travels in the app bundle
the hospitals approve. Each family of tasks has its own module (``tabular``: one task per task
file in the app's ``tasks/`` folder, see :mod:`.taskfile`; ``images``: chest X-rays; ``icu``: ICU
stays as time series); this package holds the registry. The training loop takes a task's
``Dataset`` and a model from :mod:`shared_models.models`, so a new family adds a loader and a
model, not a branch in ``client/training.py``.

A task file given by path to ``fedcare simulate`` (``--task ./consortium/my-task.toml``) is
registered for that simulation only (:func:`simulation_task`); a deployment's tasks are the
bundle's (:func:`app_task_names`), and nothing a coordinator sends adds one at a hospital.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .base import LABEL, DataError, HospitalData, Task, prepare_hospital
from .icu import ICU_TASKS
from .images import IMAGE_TASKS
from .tabular import TABULAR_TASKS, TASK_FILE_PROBLEMS, TASKS_DIR, load_task_folder
from .taskfile import TaskFileError

__all__ = [
    "LABEL", "TASKS", "TASKS_DIR", "DataError", "HospitalData", "Task", "TaskFileError",
    "app_task_names", "get_task", "is_task_file_arg", "prepare_hospital", "register_task_text",
    "simulation_task", "task_file_problems", "unknown_task_message",
]  # fmt: skip

TASKS: dict[str, Task] = {**TABULAR_TASKS, **IMAGE_TASKS, **ICU_TASKS}
# name -> task file text of the tasks registered for a simulation (register_task_text)
_SIMULATION_TASK_TEXTS: dict[str, str] = {}


def unknown_task_message(name: str, known: list[str] | set[str] | dict[str, Task]) -> str:
    """``unknown task 'NAME'; known tasks: ...`` with a "did you mean" when a name is close
    (:func:`difflib.get_close_matches`)."""
    names = sorted(known)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown task {name!r}; known tasks: {', '.join(names)}{hint}"


def get_task(name: str) -> Task:
    """Return the registered task ``name``.

    Raises
    ------
    ValueError
        Unknown name; the message lists the known tasks, suggests a close one, and names any
        task file of ``tasks/`` that could not be loaded, with its problem.
    """
    try:
        return TASKS[name]
    except KeyError:
        broken = "".join(f"; {problem}" for problem in TASK_FILE_PROBLEMS.values())
        raise ValueError(unknown_task_message(name, TASKS) + broken) from None


def is_task_file_arg(task: str) -> bool:
    """Whether a ``--task`` value is a task file's path (``*.toml`` or containing a path
    separator) rather than a task name (names are lower-case letters, digits and '-')."""
    return task.lower().endswith(".toml") or "/" in task or os.sep in task


def register_task_text(text: str, *, source: str) -> Task:
    """Register the task of a task file's text for a simulation in this process.

    Called by ``fedcare simulate --task PATH`` (through :func:`simulation_task`) and, in each
    Ray worker of the simulation, by a *simulated* hospital's ClientApp, which receives the text
    in the run config (``simulation.task-file``). A deployed hospital never calls it: its tasks
    are the task files of the bundle it approved.

    Parameters
    ----------
    text : str
        The task file's TOML text.
    source : str
        How messages name the file (its path as given).

    Returns
    -------
    Task
        The registered task (``TASKS[spec.name]``).

    Raises
    ------
    TaskFileError
        The text is not a valid task file, or its task name is one of the app's own tasks (a
        task file outside the bundle cannot replace a bundle's task; rename ``[task] name``).
    """
    from .tabular import task_from_spec
    from .taskfile import parse_task_text

    spec = parse_task_text(text, source=source)
    if _SIMULATION_TASK_TEXTS.get(spec.name) == text:
        return TASKS[spec.name]
    if spec.name in TASKS and spec.name not in _SIMULATION_TASK_TEXTS:
        raise TaskFileError(
            f"{source}: [task] name '{spec.name}' is a task of the app already; give the task "
            "file another name to simulate it beside the app's"
        )
    TASKS[spec.name] = task_from_spec(spec)
    _SIMULATION_TASK_TEXTS[spec.name] = text
    return TASKS[spec.name]


@contextmanager
def simulation_task(path: Path, *, shown: str | None = None) -> Iterator[tuple[Task, str]]:
    """Register the task file at ``path`` for the duration of a simulation; yield
    ``(task, text)``, and remove it again afterwards.

    The text (not the path) is what the simulated hospitals get, in the run config key
    ``simulation.task-file``: a Ray worker on another node needs no copy of the file, the
    file can change during the run without the hospitals disagreeing, and the text is saved
    with the run config next to every checkpoint. This keeps the app folder and its bundle
    untouched (no temporary copy of the app).

    Raises
    ------
    TaskFileError
        The file is missing, not UTF-8, invalid, or names one of the app's tasks.
    """
    from .taskfile import read_task_file_text

    source = shown or str(path)
    text = read_task_file_text(Path(path), source=source)
    task = register_task_text(text, source=source)
    try:
        yield task, text
    finally:
        if _SIMULATION_TASK_TEXTS.pop(task.name, None) is not None:
            TASKS.pop(task.name, None)


def app_task_names(app_dir: Path) -> list[str]:
    """The tasks an app folder provides: the tasks written in Python (this installation's) and
    the task files of ``app_dir/tasks/`` (e.g. a copy of the app with a consortium's task).
    During ``fedcare simulate --task PATH`` the task of that file counts too (see
    :func:`register_task_text`); ``fedcare server run`` registers none."""
    in_code = set(TASKS) - set(TABULAR_TASKS)
    return sorted(in_code | set(load_task_folder(Path(app_dir) / "tasks")[0]))


def task_file_problems(app_dir: Path) -> list[str]:
    """Why task files of ``app_dir/tasks/`` could not be loaded (invalid, misnamed)."""
    return list(load_task_folder(Path(app_dir) / "tasks")[1].values())
