"""From raw frames to :class:`~shared_models.tasks.SiteData`, for deployment and simulation."""

from __future__ import annotations

import functools

import pandas as pd

from .config import RunConfig
from .partition import partition_frame
from .tasks import LABEL, DataError, SiteData, Task, get_task, prepare_site
from .tasks.base import split_key_from_seed

SPLITS = ("per-record", "stratified")  # run config data.split (simulation)


def site_from_frame(
    task: Task,
    name: str,
    frame: pd.DataFrame,
    *,
    preprocessing: str,
    test_fraction: float,
    split_key: bytes | None = None,
    stratified_seed: int | None = None,
) -> SiteData:
    """Preprocess one hospital's raw frame (the task's features, then :func:`prepare_site`).

    ``test_fraction`` 0 means the task's default split; ``split_key`` (each record assigned by
    its keyed hash) or ``stratified_seed`` (benchmarks only) as in :func:`prepare_site`.
    """
    resolved = task.resolve_preprocessing(preprocessing)
    x, y = task.features(frame, resolved)
    return prepare_site(
        name, x, y,
        test_fraction=test_fraction or task.default_test_fraction,
        split_key=split_key, stratified_seed=stratified_seed,
        reference_scaling=task.scaling(resolved),
    )  # fmt: skip


def simulated_site_frames(
    task: Task, *, data_dir: str, num_sites: int, scheme: str, alpha: float, seed: int
) -> list[tuple[str, pd.DataFrame]]:
    """The raw frames of the simulated hospitals, in partition-id order.

    Tasks with a natural split (or a data folder with one file per hospital) keep their real
    hospitals; otherwise the single dataset is partitioned with
    :func:`~shared_models.partition.partition_frame` into ``hospital-1`` ... ``hospital-N``.
    A ``repartitionable`` task keeps its real hospitals with ``scheme="natural"`` and pools and
    partitions their data with ``iid`` or ``dirichlet``.

    Raises
    ------
    DataError
        Unreadable data, or ``num_sites`` incompatible with a natural split.
    """
    sites = task.load_sites(data_dir)
    pooled = scheme != "natural" and (len(sites) == 1 or task.repartitionable)
    if not pooled:
        if num_sites != len(sites):
            names = ", ".join(name for name, _ in sites)
            raise DataError(
                f"task {task.name} has {len(sites)} real hospitals ({names}); "
                f"it cannot be simulated with {num_sites}"
            )
        return sites
    frame = sites[0][1] if len(sites) == 1 else pd.concat([f for _, f in sites], ignore_index=True)
    parts = partition_frame(
        frame, label=LABEL, num_partitions=num_sites, scheme=scheme, alpha=alpha, seed=seed
    )
    return [(f"hospital-{i + 1}", part) for i, part in enumerate(parts)]


@functools.lru_cache(maxsize=8)
def simulated_sites(
    task_name: str,
    *,
    data_dir: str,
    num_sites: int,
    scheme: str,
    alpha: float,
    seed: int,
    preprocessing: str,
    test_fraction: float,
    split: str = "per-record",
) -> tuple[SiteData, ...]:
    """All simulated hospitals, preprocessed (each on its own). Cached per process.

    A task with its own ``simulated_sites`` hook (data with an official test split) builds them
    itself; otherwise raw frames are partitioned and split by :func:`site_from_frame`:
    ``split = "per-record"`` with the key :func:`~shared_models.tasks.base.split_key_from_seed`
    of ``seed``, ``"stratified"`` with ``seed`` as the stratified split's seed (FLamby's
    protocol; it does not preserve the unit of privacy, see :func:`prepare_site`).
    """
    if split not in SPLITS:
        raise ValueError(f"data.split {split!r}; choose one of {list(SPLITS)}")
    task = get_task(task_name)
    if task.simulated_sites is not None:
        return tuple(
            task.simulated_sites(
                data_dir, num_sites=num_sites, scheme=scheme, alpha=alpha, seed=seed,
                preprocessing=task.resolve_preprocessing(preprocessing),
                test_fraction=test_fraction,
            )
        )  # fmt: skip
    frames = simulated_site_frames(
        task, data_dir=data_dir, num_sites=num_sites, scheme=scheme, alpha=alpha, seed=seed
    )
    key = split_key_from_seed(seed) if split == "per-record" else None
    return tuple(
        site_from_frame(
            task,
            name,
            frame,
            preprocessing=preprocessing,
            test_fraction=test_fraction,
            split_key=key,
            stratified_seed=seed if key is None else None,
        )  # fmt: skip
        for name, frame in frames
    )


def simulated_sites_for(run: RunConfig, num_sites: int) -> tuple[SiteData, ...]:
    """:func:`simulated_sites` with the run's data settings (``task.*``, ``data.*``, seed): the
    hospitals of the federation, in partition-id order.

    The partition and train/test splits use ``data.split-seed`` when it is set (>= 0), else
    ``train.seed`` (benchmarks fix the split while the training seed varies, as FLamby does);
    ``data.split`` chooses the per-record split (default) or FLamby's stratified one.

    With ``simulation.hold-out`` set (``fedcare simulate --hold-out``), ``num_sites`` counts the
    federation's hospitals: the data are split into ``num_sites + 1`` hospitals and the held-out
    one is left out, so that the ServerApp and every ClientApp see the same reduced list.

    Raises
    ------
    DataError
        The held-out hospital is not one of the data's hospitals.
    """
    if not run.simulated_hold_out:
        return _all_simulated_sites(run, num_sites)
    sites = _all_simulated_sites(run, num_sites + 1)
    held_out_site(run, num_sites)  # checks the name
    return tuple(s for s in sites if s.name != run.simulated_hold_out)


def held_out_site(run: RunConfig, num_sites: int) -> SiteData:
    """The hospital ``simulation.hold-out`` names, of the ``num_sites + 1`` hospitals of which the
    federation (``num_sites``, :func:`simulated_sites_for`) leaves it out.

    Raises
    ------
    DataError
        No hold-out is set, or it is not one of the data's hospitals (the message lists them).
    """
    sites = _all_simulated_sites(run, num_sites + 1)
    for s in sites:
        if s.name == run.simulated_hold_out:
            return s
    raise DataError(
        f"--hold-out {run.simulated_hold_out!r}: no such hospital; known hospitals: "
        f"{', '.join(s.name for s in sites)}"
    )


def _all_simulated_sites(run: RunConfig, num_sites: int) -> tuple[SiteData, ...]:
    return simulated_sites(
        run.task.name,
        data_dir=run.data.dir,
        num_sites=num_sites,
        scheme=run.data.partition,
        alpha=run.data.alpha,
        seed=run.data.split_seed if run.data.split_seed >= 0 else run.train.seed,
        preprocessing=run.task.preprocessing,
        test_fraction=run.data.test_fraction,
        split=run.data.split,
    )
