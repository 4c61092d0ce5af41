"""Splitting one dataset into simulated hospitals (simulation only).

Uses Flower Datasets' partitioners (``flwr_datasets.partitioner.IidPartitioner`` and
``DirichletPartitioner``; Dirichlet label skew after Hsu et al. 2019, arXiv:1909.06335).
The partition is a deterministic function of (data, number of hospitals, scheme, alpha, seed),
so the simulated hospitals and the coordinator's pooled evaluation agree on it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .tasks import LABEL, DataError

MIN_PARTITION_SIZE = 10


def partition_frame(
    frame: pd.DataFrame,
    *,
    num_partitions: int,
    scheme: str,
    alpha: float,
    seed: int,
) -> list[pd.DataFrame]:
    """Partition rows of ``frame`` into ``num_partitions`` simulated hospitals.

    Parameters
    ----------
    frame : pd.DataFrame
        Raw rows with a binary ``label`` column.
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
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    n = len(frame)
    if num_partitions < 1:
        raise DataError(f"the number of hospitals must be at least 1 (got {num_partitions})")
    if num_partitions * MIN_PARTITION_SIZE > n:
        raise DataError(
            f"{num_partitions} hospitals for {n} patients leaves fewer than "
            f"{MIN_PARTITION_SIZE} patients per hospital; use at most {n // MIN_PARTITION_SIZE}"
        )
    table = pd.DataFrame({"row": np.arange(n), LABEL: frame[LABEL].astype(int).to_numpy()})
    dataset = Dataset.from_pandas(table, preserve_index=False)
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        # IidPartitioner splits in order: shuffle first, deterministically
        dataset = dataset.shuffle(seed=seed)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL,
            alpha=alpha,
            min_partition_size=MIN_PARTITION_SIZE,
            self_balancing=True,
            seed=seed,
        )
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose 'iid' or 'dirichlet'")
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
    return [frame.iloc[np.sort(np.asarray(rows))].reset_index(drop=True) for rows in parts]
