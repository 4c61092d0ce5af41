"""From raw frames to :class:`~shared_models.tasks.HospitalData`, for deployment and simulation."""

from __future__ import annotations

import functools

import pandas as pd

from .config import RunConfig
from .partition import partition_frame
from .tasks import LABEL, DataError, HospitalData, Task, get_task, prepare_hospital
from .tasks.base import split_key_from_seed

SPLITS = ("per-record", "stratified")  # run config data.split (simulation)


def hospital_from_frame(
    task: Task,
    name: str,
    frame: pd.DataFrame,
    *,
    preprocessing: str,
    test_fraction: float,
    split_key: bytes | None = None,
    stratified_seed: int | None = None,
) -> HospitalData:
    """Preprocess one hospital's raw frame (the task's features, then :func:`prepare_hospital`).

    ``test_fraction`` 0 means the task's default split; ``split_key`` (each record assigned by
    its keyed hash) or ``stratified_seed`` (benchmarks only) as in :func:`prepare_hospital`.
    """
    resolved = task.resolve_preprocessing(preprocessing)
    x, y = task.features(frame, resolved)
    return prepare_hospital(
        name, x, y,
        test_fraction=test_fraction or task.default_test_fraction,
        split_key=split_key, stratified_seed=stratified_seed,
        reference_scaling=task.scaling(resolved),
    )  # fmt: skip


def simulated_hospital_frames(
    task: Task, *, data_dir: str, num_hospitals: int, scheme: str, alpha: float, seed: int
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
        Unreadable data, or ``num_hospitals`` incompatible with a natural split.
    """
    hospitals = task.load_hospitals(data_dir)
    pooled = scheme != "natural" and (len(hospitals) == 1 or task.repartitionable)
    if not pooled:
        if num_hospitals != len(hospitals):
            names = ", ".join(name for name, _ in hospitals)
            raise DataError(
                f"task {task.name} has {len(hospitals)} real hospitals ({names}); "
                f"it cannot be simulated with {num_hospitals}"
            )
        return hospitals
    frame = (
        hospitals[0][1]
        if len(hospitals) == 1
        else pd.concat([f for _, f in hospitals], ignore_index=True)
    )
    parts = partition_frame(
        frame, label=LABEL, num_partitions=num_hospitals, scheme=scheme, alpha=alpha, seed=seed
    )
    return [(f"hospital-{i + 1}", part) for i, part in enumerate(parts)]


@functools.lru_cache(maxsize=8)
def simulated_hospitals(
    task_name: str,
    *,
    data_dir: str,
    num_hospitals: int,
    scheme: str,
    alpha: float,
    seed: int,
    preprocessing: str,
    test_fraction: float,
    split: str = "per-record",
) -> tuple[HospitalData, ...]:
    """All simulated hospitals, preprocessed (each on its own). Cached per process.

    A task with its own ``simulated_hospitals`` hook (data with an official test split) builds them
    itself; otherwise raw frames are partitioned and split by :func:`hospital_from_frame`:
    ``split = "per-record"`` with the key :func:`~shared_models.tasks.base.split_key_from_seed`
    of ``seed``, ``"stratified"`` with ``seed`` as the stratified split's seed (FLamby's
    protocol; it does not preserve the unit of privacy, see :func:`prepare_hospital`).
    """
    if split not in SPLITS:
        raise ValueError(f"data.split {split!r}; choose one of {list(SPLITS)}")
    task = get_task(task_name)
    if task.simulated_hospitals is not None:
        return tuple(
            task.simulated_hospitals(
                data_dir, num_hospitals=num_hospitals, scheme=scheme, alpha=alpha, seed=seed,
                preprocessing=task.resolve_preprocessing(preprocessing),
                test_fraction=test_fraction,
            )
        )  # fmt: skip
    frames = simulated_hospital_frames(
        task, data_dir=data_dir, num_hospitals=num_hospitals, scheme=scheme, alpha=alpha, seed=seed
    )
    key = split_key_from_seed(seed) if split == "per-record" else None
    return tuple(
        hospital_from_frame(
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


def simulated_hospitals_for(run: RunConfig, num_hospitals: int) -> tuple[HospitalData, ...]:
    """:func:`simulated_hospitals` with the run's data settings (``task.*``, ``data.*``, seed): the
    hospitals of the federation, in partition-id order.

    The partition and train/test splits use ``data.split-seed`` when it is set (>= 0), else
    ``train.seed`` (benchmarks fix the split while the training seed varies, as FLamby does);
    ``data.split`` chooses the per-record split (default) or FLamby's stratified one.

    With ``simulation.hold-out`` set (``fedcare simulate --hold-out``), ``num_hospitals`` counts the
    federation's hospitals: the data are split into ``num_hospitals + 1`` hospitals and the held-out
    one is left out, so that the ServerApp and every ClientApp see the same reduced list.

    Raises
    ------
    DataError
        The held-out hospital is not one of the data's hospitals.
    """
    if not run.simulated_hold_out:
        return _all_simulated_hospitals(run, num_hospitals)
    hospitals = _all_simulated_hospitals(run, num_hospitals + 1)
    held_out_hospital(run, num_hospitals)  # checks the name
    return tuple(s for s in hospitals if s.name != run.simulated_hold_out)


def held_out_hospital(run: RunConfig, num_hospitals: int) -> HospitalData:
    """The hospital ``simulation.hold-out`` names, of the ``num_hospitals + 1`` hospitals of which the
    federation (``num_hospitals``, :func:`simulated_hospitals_for`) leaves it out.

    Raises
    ------
    DataError
        No hold-out is set, or it is not one of the data's hospitals (the message lists them).
    """
    hospitals = _all_simulated_hospitals(run, num_hospitals + 1)
    for s in hospitals:
        if s.name == run.simulated_hold_out:
            return s
    raise DataError(
        f"--hold-out {run.simulated_hold_out!r}: no such hospital; known hospitals: "
        f"{', '.join(s.name for s in hospitals)}"
    )


def _all_simulated_hospitals(run: RunConfig, num_hospitals: int) -> tuple[HospitalData, ...]:
    return simulated_hospitals(
        run.task.name,
        data_dir=run.data.dir,
        num_hospitals=num_hospitals,
        scheme=run.data.partition,
        alpha=run.data.alpha,
        seed=run.data.split_seed if run.data.split_seed >= 0 else run.train.seed,
        preprocessing=run.task.preprocessing,
        test_fraction=run.data.test_fraction,
        split=run.data.split,
    )
