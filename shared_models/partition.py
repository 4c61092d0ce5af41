"""Splitting one dataset into simulated hospitals (simulation only).

Uses Flower Datasets' partitioners (``flwr_datasets.partitioner.IidPartitioner`` and
``DirichletPartitioner``; Dirichlet label skew after Hsu et al. 2019, arXiv:1909.06335).
The partition is a deterministic function of (data, number of hospitals, scheme, alpha, seed),
so the simulated hospitals and the coordinator's pooled evaluation agree on it.

Because it is deterministic, it is computed once per ``fedcare simulate``: the harness names a
folder in ``$FEDCARE_PARTITION_CACHE`` (:func:`shared_models.runtime.partition_cache`; the Ray
workers it starts inherit it), the first process to partition a dataset writes the row indices
there, keyed by a hash of the labels and the partition settings, and the simulated hospitals'
actors read them instead of importing Hugging Face ``datasets`` and Flower Datasets and
partitioning again (about 1.7 s of each actor's start-up on the 2-core machine). A missing,
unreadable or inconsistent entry is recomputed.
Deployed hospitals never partition (they load their own file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError
from .files import write_json_atomic
from .runtime import PARTITION_CACHE_ENV

MIN_PARTITION_SIZE = 10


def partition_frame(
    frame: pd.DataFrame,
    *,
    label: str,
    num_partitions: int,
    scheme: str,
    alpha: float,
    seed: int,
) -> list[pd.DataFrame]:
    """Partition rows of ``frame`` into ``num_partitions`` simulated hospitals.

    Parameters
    ----------
    frame : pd.DataFrame
        Raw rows with a binary label column.
    label : str
        The label column's name (the tasks' ``shared_models.tasks.LABEL``; passed in so that
        this module does not import the tasks package, which imports it).
    num_partitions : int
        Number of simulated hospitals.
    scheme : str
        ``"iid"`` (uniform random) or ``"dirichlet"`` (label skew with concentration ``alpha``).
    alpha : float
        Dirichlet concentration; smaller = more non-IID.
    seed : int
        Partitioning seed.

    Raises
    ------
    DataError
        Fewer than ``MIN_PARTITION_SIZE`` patients per hospital, or a Dirichlet draw that cannot
        give every hospital that many patients.
    """
    n = len(frame)
    if num_partitions < 1:
        raise DataError(f"the number of hospitals must be at least 1 (got {num_partitions})")
    if num_partitions * MIN_PARTITION_SIZE > n:
        raise DataError(
            f"{num_partitions} hospitals for {n} patients leaves fewer than "
            f"{MIN_PARTITION_SIZE} patients per hospital; use at most {n // MIN_PARTITION_SIZE}"
        )
    if scheme not in ("iid", "dirichlet"):
        raise ValueError(f"unknown partition scheme {scheme!r}; choose 'iid' or 'dirichlet'")
    labels = frame[label].astype(int).to_numpy()
    settings = {"num_partitions": num_partitions, "scheme": scheme, "alpha": alpha, "seed": seed}
    cache = _cache_path(labels, settings)
    parts = _read_cached(cache, n, num_partitions) if cache is not None else None
    if parts is None:
        parts = _partition_rows(labels, **settings)  # type: ignore[arg-type]
        if cache is not None:
            with contextlib.suppress(OSError):  # the cache only saves time
                write_json_atomic(cache, [p.tolist() for p in parts], indent=0)
    return [frame.iloc[rows].reset_index(drop=True) for rows in parts]


def _partition_rows(
    labels: np.ndarray, *, num_partitions: int, scheme: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Sorted row indices of each partition, from Flower Datasets' partitioners."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    n = len(labels)
    table = pd.DataFrame({"row": np.arange(n), "label": labels})
    dataset = Dataset.from_pandas(table, preserve_index=False)
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        # IidPartitioner splits in order: shuffle first, deterministically
        dataset = dataset.shuffle(seed=seed)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=MIN_PARTITION_SIZE,
            self_balancing=True,
            seed=seed,
        )
    partitioner.dataset = dataset
    try:
        with warnings.catch_warnings():  # the partitioner warns on every resampling attempt
            warnings.simplefilter("ignore", UserWarning)
            parts = [partitioner.load_partition(i)["row"] for i in range(num_partitions)]
    except ValueError:
        raise DataError(
            f"Dirichlet partitioning into {num_partitions} hospitals (alpha={alpha:g}) could not "
            f"give every hospital {MIN_PARTITION_SIZE} patients; use fewer hospitals or a larger "
            "--alpha"
        ) from None
    return [np.sort(np.asarray(rows, dtype=np.int64)) for rows in parts]


def _cache_path(labels: np.ndarray, settings: dict[str, object]) -> Path | None:
    folder = os.environ.get(PARTITION_CACHE_ENV)
    if not folder or not Path(folder).is_dir():
        return None
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return Path(folder) / f"{digest.hexdigest()}.json"


def _read_cached(path: Path, n: int, num_partitions: int) -> list[np.ndarray] | None:
    """The cached partition at ``path`` if it is one of ``range(n)`` into ``num_partitions``
    sorted parts, else None."""
    try:
        parts = [np.asarray(p, dtype=np.int64) for p in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return None
    if len(parts) != num_partitions or any(np.any(np.diff(p) <= 0) for p in parts):
        return None
    rows = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if not np.array_equal(np.sort(rows), np.arange(n)):
        return None
    return parts
