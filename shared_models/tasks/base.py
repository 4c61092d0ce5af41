"""What every task is made of: the :class:`Task` record, one hospital's :class:`HospitalData`,
the :class:`DataError` every loader raises, and :func:`prepare_hospital` (the per-record train/test
split, fixed imputation and scaling).

A task is what the coordinator and every hospital must agree on. Each hospital turns its own
raw data into tensors with the task's fixed, data-independent constants: no preprocessing step
ever needs raw data -- or statistics -- of two hospitals.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from shared_models.errors import DataError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

LABEL = "label"


@dataclass(frozen=True)
class Subgroup:
    """A patient subgroup a task declares for subgroup reports (TRIPOD+AI item 23a: performance
    in key subgroups such as sex and age bands), defined on one column of the raw frame that
    ``Task.read_file`` returns.

    Attributes
    ----------
    name : str
        How reports name it (``"sex"``, ``"age"``).
    column : str
        The raw frame's column.
    levels : tuple
        Categorical: the values of the column, one group each (numbers and text that reads as a
        number compare as numbers), named by ``labels`` (default: the values).
    labels : tuple[str, ...]
        One name per level.
    bands : tuple[float, ...]
        Numeric: increasing cut points ``c1 < c2 < ...``, groups ``< c1``, ``c1 to < c2``, ...,
        ``>= ck``. Exactly one of ``levels`` and ``bands`` is set.
    unit : str
        The column's unit, for band names (``years``).
    """

    name: str
    column: str
    levels: tuple[Any, ...] = ()
    labels: tuple[str, ...] = ()
    bands: tuple[float, ...] = ()
    unit: str = ""

    def masks(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """``{group name: [N] bool}`` for the rows of ``frame``; rows in no group (missing or
        another value) under ``"missing or other"`` when there are any.

        Raises
        ------
        DataError
            ``frame`` has no column ``column``.
        """
        from shared_models.tasks.table import match_values

        if self.column not in frame.columns:
            raise DataError(
                f"subgroup {self.name!r}: the data have no column {self.column!r}; the task "
                "declares this subgroup on it"
            )
        series = frame[self.column]
        out: dict[str, np.ndarray] = {}
        if self.bands:
            values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
            unit = f" {self.unit}" if self.unit else ""
            edges = [-np.inf, *self.bands, np.inf]
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                if lo == -np.inf:
                    label = f"< {hi:g}{unit}"
                elif hi == np.inf:
                    label = f">= {lo:g}{unit}"
                else:
                    label = f"{lo:g} to < {hi:g}{unit}"
                out[label] = (values >= lo) & (values < hi)
        else:
            index = match_values(series, self.levels)
            labels = self.labels or tuple(str(v) for v in self.levels)
            for i, label in enumerate(labels):
                out[label] = index == i
        rest = ~np.logical_or.reduce(list(out.values())) if out else np.ones(len(frame), bool)
        if rest.any():
            out["missing or other"] = rest
        return out


@dataclass(frozen=True)
class HospitalData:
    """One hospital's preprocessed data.

    Attributes
    ----------
    name : str
        Hospital name (e.g. ``"cleveland"``, ``"hospital-1"``).
    x_train, x_test : np.ndarray
        ``[N, *input_shape] float32`` (tabular: ``[N, F]``), preprocessed with the task's fixed
        constants.
    y_train, y_test : np.ndarray
        ``[N] float32`` in {0, 1}; 1 = disease present.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.y_test.shape[0])

    def train_set(self) -> Dataset:
        """The training split as a torch ``Dataset`` of ``(x [*input_shape], y [])`` pairs."""
        import torch
        from torch.utils.data import TensorDataset

        return TensorDataset(torch.from_numpy(self.x_train), torch.from_numpy(self.y_train))


class SimulatedHospitals(Protocol):
    """``(data_dir, *, num_hospitals, scheme, alpha, seed, preprocessing, test_fraction) -> hospitals``.

    Builds all simulated hospitals of a task whose data come with their own test split;
    ``scheme``/``alpha`` as in :func:`shared_models.partition.partition_frame`, ``test_fraction``
    0 = the task's default (used only where the data have no official split).
    Raises :class:`DataError`.
    """

    def __call__(
        self,
        data_dir: str,
        *,
        num_hospitals: int,
        scheme: str,
        alpha: float,
        seed: int,
        preprocessing: str,
        test_fraction: float,
    ) -> list[HospitalData]: ...


@dataclass(frozen=True)
class Task:
    """A learning task both sides agree on.

    Attributes
    ----------
    name : str
        Registry key.
    read_file : Callable[[Path], pd.DataFrame]
        Reads one hospital's file in the task's upstream format and returns the raw frame with
        a binary ``label`` column. Raises :class:`DataError`.
    load_hospitals : Callable[[str], list[tuple[str, pd.DataFrame]]]
        Simulation only: the raw frames of all hospitals in a data folder (``""`` = the embedded
        data). One frame per natural hospital, or a single frame to be partitioned.
    features : Callable[[pd.DataFrame, str], tuple[np.ndarray, np.ndarray]]
        ``(raw frame, preprocessing) -> (x [N, F] float32 with NaN for missing, y [N])``.
    input_shape : Callable[[str], tuple[int, ...]]
        Shape of one example for a preprocessing name (tabular: ``(F,)``).
    write_file : Callable[[pd.DataFrame, Path], None]
        Writes a raw frame (as returned by ``read_file``) back in the task's hospital file format.
    file_name : Callable[[str], str]
        Hospital file name for a hospital name.
    natural_split : bool
        True when the data come as real hospitals (no partitioning in simulation).
    repartitionable : bool
        Natural-split tasks only: in simulation the real hospitals' data may also be pooled and
        partitioned into simulated ones (``data.partition`` ``iid`` / ``dirichlet``, i.e.
        ``fedcare simulate --hospitals N``); ``natural`` keeps the real hospitals.
    run_defaults : dict[str, bool | int | float | str]
        The task's recipe: run settings (:data:`shared_models.recipes.RECIPE_KEYS`) it
        recommends in place of the schema's defaults (e.g. more rounds for a larger model),
        with and without DP; ``--run-config`` and explicit options still override them.
    run_defaults_dp, run_defaults_no_dp : dict[str, bool | int | float | str]
        The recipe's settings for runs with sample-level DP / without DP only (they override
        ``run_defaults``). A task with no recipe for a run's privacy setting gets
        :func:`shared_models.recipes.rule`.
    preprocessings : tuple[str, ...]
        Allowed ``task.preprocessing`` values; the first is the default.
    positive_class : str
        What label 1 means, for reports (see :meth:`positive_class_for`).
    positive_class_of : Callable[[str], str] or None
        What label 1 means for a given ``--data-dir`` where that depends on the data (a
        MedMNIST file other than PneumoniaMNIST); None: always ``positive_class``.
    attribution_names : Callable[[str], tuple[str, ...]] or None
        The names explanations are reported by, for a (resolved) preprocessing, where they are
        not the inputs' names: one per index of ``attribution_axis`` of an example (ICU: the
        variables). See :meth:`explained_features`.
    attribution_axis : int or None
        The axis of one example (``input_shape``) that indexes the reported features; an
        attribution is summed over the other axes (ICU: ``[T, V, 3]`` -> per variable ``V``,
        axis 1). None: the task has no per-feature explanation.
    saliency_grid : int
        Image tasks: explanations are class-conditional mean saliency maps on a
        ``saliency_grid x saliency_grid`` lattice
        (:func:`shared_models.attributions.spatial_saliency`); 0: none.
    default_test_fraction : float
        Test share of each hospital when ``data.test-fraction`` is 0.
    reference_scaling : (center, scale) or None
        Fixed, data-independent per-feature centre and scale (from the task's documented units).
        None: the features are used as the task's ``features`` returns them.
    models : tuple[str, ...]
        Names in :data:`shared_models.models.MODELS` that fit the task; the first is its default
        (run config ``model.name = "default"``).
    preprocessing_models : Mapping[str, tuple[str, ...]]
        Preprocessings whose examples only some models take (e.g. scattering coefficients
        instead of pixels): the models that fit each, the first its default. The others fit
        the models listed under no preprocessing here. See :meth:`models_for`.
    simulated_hospitals : SimulatedHospitals or None
        Simulation only, for data that bring their own test split (MedMNIST's official
        train/test files): returns every simulated hospital's :class:`HospitalData` directly, in
        partition-id order. None (tabular tasks): ``load_hospitals`` -> partitioning ->
        ``features`` -> :func:`prepare_hospital`'s random split.
    scaling_for : Callable[[str], (center, scale)] or None
        The fixed scaling for a preprocessing name, when it depends on it (task files: missing
        indicator columns); None: ``reference_scaling`` for every preprocessing.
    check_file : Callable[[Path], TableReport] or None
        Tabular tasks from a task file: the per-column report of one hospital file
        (:func:`shared_models.tasks.table.check_table`), for ``fedcare client check``.
    subgroups : tuple[Subgroup, ...]
        Patient subgroups ``fedcare evaluate`` reports separately (sex, age bands); () = none.
    feature_names : Callable[[str], list[str]] or None
        Tabular tasks: the names of the ``F`` model inputs for a preprocessing (one-hot levels
        and missing indicators included), for shift warnings; None: ``input j``.
    """

    name: str
    read_file: Callable[[Path], pd.DataFrame]
    load_hospitals: Callable[[str], list[tuple[str, pd.DataFrame]]]
    features: Callable[[pd.DataFrame, str], tuple[np.ndarray, np.ndarray]]
    input_shape: Callable[[str], tuple[int, ...]]
    write_file: Callable[[pd.DataFrame, Path], None]
    file_name: Callable[[str], str]
    natural_split: bool
    preprocessings: tuple[str, ...]
    positive_class: str
    default_test_fraction: float = 0.3
    reference_scaling: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    models: tuple[str, ...] = ("mlp", "logreg")
    simulated_hospitals: SimulatedHospitals | None = None
    repartitionable: bool = False
    run_defaults: Mapping[str, bool | int | float | str] = field(default_factory=dict, hash=False)
    run_defaults_dp: Mapping[str, bool | int | float | str] = field(
        default_factory=dict, hash=False
    )
    run_defaults_no_dp: Mapping[str, bool | int | float | str] = field(
        default_factory=dict, hash=False
    )
    scaling_for: Callable[[str], tuple[tuple[float, ...], tuple[float, ...]]] | None = None
    check_file: Callable[[Path], Any] | None = None
    preprocessing_models: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    positive_class_of: Callable[[str], str] | None = None
    subgroups: tuple[Subgroup, ...] = ()
    feature_names: Callable[[str], list[str]] | None = None
    attribution_names: Callable[[str], tuple[str, ...]] | None = None
    attribution_axis: int | None = 0
    saliency_grid: int = 0

    def input_names(self, preprocessing: str) -> list[str]:
        """The names of a tabular example's ``F`` inputs for a (resolved) preprocessing
        (``input 0`` ... where the task has none)."""
        if self.feature_names is not None:
            return list(self.feature_names(preprocessing))
        return [f"input {j}" for j in range(int(np.prod(self.input_shape(preprocessing))))]

    def explained_features(self, preprocessing: str) -> tuple[str, ...]:
        """The names explanations are reported by: ``attribution_names``, else (tabular) the
        input names (:meth:`input_names`), else "feature 1", "feature 2", ...

        Raises
        ------
        ValueError
            The task has no per-feature explanation (``attribution_axis`` None).
        """
        if self.attribution_axis is None:
            raise ValueError(f"task '{self.name}' has no per-feature explanation")
        preprocessing = self.resolve_preprocessing(preprocessing)
        if self.attribution_names is not None:
            return tuple(self.attribution_names(preprocessing))
        shape = self.input_shape(preprocessing)
        if self.feature_names is not None and len(shape) == 1:
            return tuple(self.feature_names(preprocessing))
        return tuple(f"feature {i + 1}" for i in range(shape[self.attribution_axis]))

    def positive_class_for(self, data_dir: str = "") -> str:
        """What label 1 means for the data at ``data_dir`` (``""``: the task's embedded or
        documented data)."""
        if self.positive_class_of is not None and data_dir:
            return self.positive_class_of(data_dir)
        return self.positive_class

    def scaling(self, preprocessing: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The fixed ``(center, scale)`` of a (resolved) preprocessing, or None."""
        if self.scaling_for is not None:
            return self.scaling_for(preprocessing)
        return self.reference_scaling

    def recipe(self, *, dp: bool) -> dict[str, bool | int | float | str]:
        """The task's recipe for a run with (``dp``) or without sample-level DP; {} = none."""
        return {**self.run_defaults, **(self.run_defaults_dp if dp else self.run_defaults_no_dp)}

    def models_for(self, preprocessing: str = "default") -> tuple[str, ...]:
        """The models that take the examples of a preprocessing; the first is the default."""
        preprocessing = self.resolve_preprocessing(preprocessing)
        if preprocessing in self.preprocessing_models:
            return self.preprocessing_models[preprocessing]
        special = {m for models in self.preprocessing_models.values() for m in models}
        return tuple(m for m in self.models if m not in special)

    def resolve_model(self, name: str, preprocessing: str = "default") -> str:
        """Map ``"default"`` to the default model of the task (and preprocessing); raise
        ``ValueError`` for a model that does not fit them."""
        fitting = self.models_for(preprocessing)
        if name == "default":
            return fitting[0]
        if name not in fitting:
            shown = "" if preprocessing == "default" else f" with preprocessing {preprocessing!r}"
            raise ValueError(
                f"model {name!r} does not fit task '{self.name}'{shown}; choose one of "
                f"{list(fitting)} or 'default'"
            )
        return name

    def resolve_preprocessing(self, name: str) -> str:
        """Map ``"default"`` to the task's default; raise ``ValueError`` on an unknown name."""
        if name == "default":
            return self.preprocessings[0]
        if name not in self.preprocessings:
            raise ValueError(
                f"task '{self.name}' has no preprocessing {name!r}; "
                f"choose one of {list(self.preprocessings)} or 'default'"
            )
        return name


# ----------------------------------------------------------------------------------------------
# helpers shared by the loaders
# ----------------------------------------------------------------------------------------------
def require_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found; check the path")
    if not path.is_file():
        raise DataError(f"{path}: is a directory, expected a data file")


SPLIT_KEY_BYTES = 32


def split_key_from_seed(seed: int) -> bytes:
    """The split key of simulated hospitals, derived from ``data.split-seed`` so that a
    simulation's splits are reproducible. A deployed hospital uses a random key kept in its
    ledger folder (:func:`client.hospital_data.hospital_split_key`)."""
    return hashlib.sha256(f"fedcare train/test split {int(seed)}".encode()).digest()


def assign_test_records(
    x: np.ndarray, y: np.ndarray, *, test_fraction: float, key: bytes
) -> np.ndarray:
    """Which records are in the test split, each decided by that record alone.

    Record ``i`` is a test record when the first 8 bytes of its keyed BLAKE2b hash (RFC 7693,
    ``hashlib.blake2b(key=key)`` over the record's float32 features and its label), read as an
    integer, are below ``test_fraction * 2**64``. Adding or removing a patient therefore changes
    no other patient's assignment: neighbouring datasets differ in one training or one test
    record, as DP's accounting assumes (a seeded permutation of the rows, as
    ``train_test_split`` does, moves many records). Identical records share their assignment.

    Parameters
    ----------
    x : np.ndarray
        ``[N, *input_shape]`` features (NaN where missing), before imputation and scaling.
    y : np.ndarray
        ``[N]`` labels.
    test_fraction : float
        Expected share of test records (the realised share varies, binomially).
    key : bytes
        The hospital's split key (:data:`SPLIT_KEY_BYTES` bytes).

    Returns
    -------
    np.ndarray
        ``[N] bool``, True for a test record.
    """
    if len(key) != SPLIT_KEY_BYTES:
        raise ValueError(f"a split key has {SPLIT_KEY_BYTES} bytes, got {len(key)}")
    threshold = int(test_fraction * 2**64)
    rows = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(len(x), -1))
    labels = np.ascontiguousarray(np.asarray(y, dtype=np.float32))
    out = np.empty(len(rows), dtype=bool)
    for i in range(len(rows)):
        digest = hashlib.blake2b(rows[i].tobytes(), key=key, digest_size=8)
        digest.update(labels[i].tobytes())
        out[i] = int.from_bytes(digest.digest(), "little") < threshold
    return out


def prepare_hospital(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    test_fraction: float,
    split_key: bytes | None = None,
    stratified_seed: int | None = None,
    reference_scaling: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> HospitalData:
    """Split one hospital's examples into train/test and impute and scale each record on its own.

    Nothing here uses another record's values: adding or removing one patient changes that
    patient's example only (the unit of privacy DP-SGD and the evaluation releases account for).

    Parameters
    ----------
    name : str
        Hospital name.
    x : np.ndarray
        ``[N, *input_shape] float32``; NaN marks a missing value. It takes the feature's fixed
        centre (``reference_scaling``'s, i.e. 0 after scaling; 0 without a scaling): a constant
        of the task, never a statistic of the hospital's records.
    y : np.ndarray
        ``[N]`` binary labels.
    test_fraction : float
        Expected share of test records.
    split_key : bytes, optional
        The hospital's split key: each record's assignment by :func:`assign_test_records`. The default.
    stratified_seed : int, optional
        Instead of ``split_key``: ``sklearn.model_selection.train_test_split`` stratified by
        label with this seed (FLamby's benchmark protocol, simulation only). That split is a
        permutation of all rows: one patient more or less moves others between the splits, so
        it does NOT preserve the unit of privacy; it exists to reproduce published benchmarks.
    reference_scaling : (center, scale), optional
        Fixed, data-independent per-feature centre and scale, applied as ``(x - center) / scale``
        (tabular tasks); without it ``x`` is kept as the task's ``features`` made it.

    Raises
    ------
    DataError
        Fewer than 4 examples, or no training example after the split.
    ValueError
        Both or neither of ``split_key`` and ``stratified_seed``.
    """
    if (split_key is None) == (stratified_seed is None):
        raise ValueError("prepare_hospital takes exactly one of split_key and stratified_seed")
    n = int(y.shape[0])
    if n < 4:
        raise DataError(f"hospital {name}: only {n} usable rows; a hospital needs at least 4")
    if split_key is not None:
        is_test = assign_test_records(x, y, test_fraction=test_fraction, key=split_key)
        x_tr, x_te, y_tr, y_te = x[~is_test], x[is_test], y[~is_test], y[is_test]
    else:
        from sklearn.model_selection import train_test_split

        counts = np.bincount(y.astype(int), minlength=2)
        stratify = y if counts.min() >= 2 else None
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=test_fraction, random_state=stratified_seed, stratify=stratify
        )
    if len(y_tr) == 0:
        raise DataError(f"hospital {name}: no training rows after the train/test split")
    return HospitalData(
        name=name,
        x_train=impute_and_scale(x_tr, reference_scaling),
        y_train=np.asarray(y_tr, dtype=np.float32),
        x_test=impute_and_scale(x_te, reference_scaling),
        y_test=np.asarray(y_te, dtype=np.float32),
    )


def impute_and_scale(
    x: np.ndarray, reference_scaling: tuple[tuple[float, ...], tuple[float, ...]] | None
) -> np.ndarray:
    """Each record on its own: a missing value (NaN) takes the feature's fixed centre (0 without
    a scaling), then ``(x - center) / scale``; ``x [N, *input_shape] -> [N, *input_shape]
    float32``. The preprocessing of :func:`prepare_hospital`, also applied to data scored by a
    trained model (``fedcare evaluate``)."""
    center = scale = None
    if reference_scaling is not None:
        center = np.asarray(reference_scaling[0], dtype=np.float32)
        scale = np.asarray(reference_scaling[1], dtype=np.float32)
    fill = center if center is not None else np.float32(0.0)
    x = np.where(np.isnan(x), fill, x)
    if center is not None and scale is not None:
        x = (x - center) / scale
    return np.asarray(x, dtype=np.float32)
