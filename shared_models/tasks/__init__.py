"""Tasks: input schema, upstream file loaders, per-site preprocessing, model and metric choice.

A task is what the coordinator and every hospital must agree on; it travels in the app bundle
the hospitals approve. Each family of tasks has its own module (``tabular``: rows from the
datasets' upstream files; ``images``: chest X-rays; ``icu``: ICU stays as time series);
this package holds the registry. The training loop takes a task's
``Dataset`` and a model from :mod:`shared_models.models`, so a new family adds a loader and a
model, not a branch in ``client/training.py``.
"""

from __future__ import annotations

from .base import LABEL, DataError, SiteData, Task, prepare_site
from .icu import ICU_TASKS
from .images import IMAGE_TASKS
from .tabular import TABULAR_TASKS

__all__ = ["LABEL", "TASKS", "DataError", "SiteData", "Task", "get_task", "prepare_site"]

TASKS: dict[str, Task] = {**TABULAR_TASKS, **IMAGE_TASKS, **ICU_TASKS}


def get_task(name: str) -> Task:
    """Return the registered task ``name``.

    Raises
    ------
    ValueError
        Unknown name; the message lists the known tasks.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}"
        ) from None
