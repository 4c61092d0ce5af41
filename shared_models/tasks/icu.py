"""ICU time-series tasks: in-hospital mortality from the first 48 hours of an ICU stay.

``icu-mortality``
    PhysioNet/CinC Challenge 2012 (Silva et al., CinC 2012), upstream record files read by
    :mod:`.physionet2012` (a folder of ``<RecordID>.txt`` + ``Outcomes*.txt``, or the
    ``set-*.tar.gz`` archive). Label: ``In-hospital_death``. In simulation the natural
    hospitals are the four ICU types of set A (``ICUType`` 1-4: coronary care ``ccu`` 577 stays,
    cardiac surgery recovery ``csru`` 874, medical ``micu`` 1481, surgical ``sicu`` 1068);
    ``--hospitals N`` pools them and partitions IID or by Dirichlet label skew instead.

Frames: one row per stay (``RecordID``, the general descriptors, the label, each variable's
mean observed value in the window -- NaN when never observed, so ``fedcare client check`` shows
per-variable missingness -- and the stay's observations as an ``[n, 3]`` array of (minute,
variable, value) in the ``observations`` column). Partitioning and splitting work on rows; the
tensors are made by :func:`stay_tensors`.

Preprocessing (per stay; nothing computed from other stays or hospitals), after the field's
standard for this data (GRU-D, Che et al., Sci. Rep. 2018; Harutyunyan et al., Sci. Data 2019):

1. outliers: a value outside the published outlier range of its variable is dropped (treated as
   not observed), one between the outlier and the valid range is clipped to the valid range
   (:data:`VARIABLES`, the ``OUTLIER/VALID LOW/HIGH`` columns of ``variable_ranges.csv`` of the
   MIMIC-III benchmark, Harutyunyan et al. 2019, github.com/YerevaNN/mimic3-benchmarks);
2. normalisation with fixed constants: ``z = (x - normal) / width`` or, for the right-skewed
   laboratory values, ``z = ln(x / normal) / ln(hi / lo)``, where ``normal`` is the benchmark's
   published normal value (its ``IMPUTE`` column) and ``lo``-``hi`` a conventional adult
   reference interval (MSD Manual, "Blood tests: normal values"; vital signs: adult norms) or,
   where none exists, the stated clinical range (see :data:`VARIABLES`);
3. hourly bins (``hourly``; ``half-hourly``: 30 minutes) over 48 h, mean of a bin's values;
4. last observation carried forward, 0 (= the normal value) before the first observation, with
   the observation mask and the time since the last observation (hours / 48; GRU-D's delta);
5. static inputs as always-observed channels: age, sex, height, admission weight, ICU type
   (one-hot) and the hour of the stay.

One example is ``x: [T, V, 3] float32`` with ``T = 48`` (``96`` half-hourly) bins, ``V = 46``
channels (37 time series, 9 static) and, per channel, (normalised value, observed in this bin,
time since last observation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .base import LABEL, DataError, Subgroup, Task
from .physionet2012 import (
    DESCRIPTORS,
    TIME_SERIES,
    WINDOW_MINUTES,
    Stays,
    read_source,
    write_records,
)

ICU_UNITS = {1: "ccu", 2: "csru", 3: "micu", 4: "sicu"}  # ICUType -> hospital name
OBSERVATIONS = "observations"  # the frame column holding each stay's [n, 3] observations
_BIN_MINUTES = {"hourly": 60, "half-hourly": 30}


@dataclass(frozen=True)
class Variable:
    """Fixed, published constants of one input variable.

    Attributes
    ----------
    name, unit : str
        Challenge parameter name and unit.
    outlier : (float, float)
        Values outside are dropped (Harutyunyan et al. 2019, ``OUTLIER LOW/HIGH``).
    valid : (float, float)
        Values outside (but inside ``outlier``) are clipped to it (``VALID LOW/HIGH``).
    normal : float
        Centre of the scale (the benchmark's normal value, ``IMPUTE``); 0 after normalisation.
    reference : (float, float)
        Adult reference interval or stated clinical range: the unit of the scale.
    log : bool
        Right-skewed laboratory value: normalised on a log scale.
    """

    name: str
    unit: str
    outlier: tuple[float, float]
    valid: tuple[float, float]
    normal: float
    reference: tuple[float, float]
    log: bool = False

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """``x`` (raw units, already clipped to ``valid``) -> ``z`` (0 at ``normal``)."""
        lo, hi = self.reference
        if self.log:
            floor = max(self.valid[0], 1e-2 * self.normal)
            return np.log(np.maximum(x, floor) / self.normal) / math.log(hi / lo)
        return (x - self.normal) / (hi - lo)


def _v(name, unit, outlier, valid, normal, reference, log=False):  # type: ignore[no-untyped-def]
    return Variable(name, unit, outlier, valid, normal, reference, log)


# Outlier / valid ranges and normal values: MIMIC-III benchmark variable_ranges.csv (Harutyunyan
# et al., Sci. Data 6:96, 2019), mapped to the challenge's parameters. Reference intervals: MSD
# Manual "Blood tests" table and standard adult vital-sign norms; where no reference interval
# applies (FiO2, GCS, ventilation, urine per observation, troponins, PaO2 under oxygen therapy,
# body size) a stated clinical range sets the unit of the scale.
_BP_DIA = ((0, 375), (0, 375), 59.0, (60, 80))
_BP_MEAN = ((0, 375), (14, 330), 77.0, (70, 100))
_BP_SYS = ((0, 375), (0, 375), 118.0, (100, 140))
VARIABLES: tuple[Variable, ...] = (
    _v("ALP", "IU/L", (0, 4000), (20, 3625), 106.0, (40, 130), log=True),
    _v("ALT", "IU/L", (0, 11000), (2, 10000), 34.0, (10, 40), log=True),
    _v("AST", "IU/L", (0, 22000), (6, 20000), 40.0, (10, 40), log=True),
    _v("Albumin", "g/dL", (0, 60), (0.6, 6), 3.1, (3.5, 5.0)),
    _v("BUN", "mg/dL", (0, 275), (0, 250), 23.0, (7, 20), log=True),
    _v("Bilirubin", "mg/dL", (0, 66), (0.1, 60), 0.9, (0.3, 1.2), log=True),
    _v("Cholesterol", "mg/dL", (0, 660), (32, 600), 160.0, (125, 200)),
    _v("Creatinine", "mg/dL", (0, 66), (0.1, 60), 1.0, (0.6, 1.2), log=True),
    _v("DiasABP", "mmHg", *_BP_DIA),
    _v("FiO2", "fraction", (0.2, 1.1), (0.21, 1.0), 0.21, (0.21, 1.0)),  # room air .. pure O2
    _v("GCS", "points", (3, 15), (3, 15), 11.0, (3, 15)),  # the scale's range
    _v("Glucose", "mg/dL", (0, 2200), (33, 2000), 128.0, (70, 110), log=True),
    _v("HCO3", "mmol/L", (0, 66), (0, 60), 25.0, (22, 28)),
    _v("HCT", "%", (0, 100), (0, 75), 30.2, (36, 50)),
    _v("HR", "bpm", (0, 390), (0, 350), 86.0, (60, 100)),
    _v("K", "mmol/L", (0, 15), (0, 12), 4.1, (3.5, 5.0)),
    _v("Lactate", "mmol/L", (0, 33), (0.4, 30), 1.8, (0.5, 2.2), log=True),
    _v("MAP", "mmHg", *_BP_MEAN),
    _v("MechVent", "0/1", (0, 1), (0, 1), 0.0, (0, 1)),  # recorded as 1 while ventilated
    _v("Mg", "mg/dL", (0, 22), (0, 20), 2.0, (1.7, 2.2)),
    _v("NIDiasABP", "mmHg", *_BP_DIA),
    _v("NIMAP", "mmHg", *_BP_MEAN),
    _v("NISysABP", "mmHg", *_BP_SYS),
    _v("Na", "mmol/L", (0, 250), (50, 225), 142.0, (135, 145)),
    _v("PaCO2", "mmHg", (0, 220), (0, 200), 40.0, (35, 45)),
    _v("PaO2", "mmHg", (0, 770), (32, 700), 112.0, (60, 160)),  # ventilated patients' range
    _v("Platelets", "10^3/uL", (0, 2200), (0, 2000), 208.0, (150, 400), log=True),
    _v("RespRate", "/min", (0, 330), (0, 300), 19.0, (12, 20)),
    _v("SaO2", "%", (0, 150), (0, 100), 98.0, (95, 100)),
    _v("SysABP", "mmHg", *_BP_SYS),
    _v("Temp", "degC", (14.2, 47), (26, 45), 37.0, (36.1, 37.8)),
    _v("TroponinI", "ug/L", (0, 575), (0.01, 49.6), 2.3, (0.04, 0.4), log=True),  # a decade
    _v("TroponinT", "ug/L", (0, 24), (0.01, 20.85), 0.1, (0.01, 0.1), log=True),  # a decade
    _v("Urine", "mL", (0, 2445), (0, 1200), 80.0, (30, 200), log=True),  # per observation
    _v("WBC", "10^3/uL", (0, 1100), (0, 1000), 9.9, (4, 11), log=True),
    _v("Weight", "kg", (0, 250), (0, 250), 81.8, (60, 100)),  # adult body weight
    _v("pH", "", (6.3, 10), (6.3, 8.4), 7.4, (7.35, 7.45)),
)
assert tuple(v.name for v in VARIABLES) == TIME_SERIES
# Static descriptors (Age: no published normal; the adult ICU range sets the scale)
AGE = _v("Age", "years", (0, 130), (15, 100), 65.0, (25, 65))
HEIGHT = _v("Height", "cm", (0, 275), (0, 240), 170.0, (150, 190))
WEIGHT = VARIABLES[TIME_SERIES.index("Weight")]
STATIC_CHANNELS = ("Age", "Sex", "Height", "Weight", "ccu", "csru", "micu", "sicu", "hour")
N_CHANNELS = len(TIME_SERIES) + len(STATIC_CHANNELS)

_LOWER = np.array([v.outlier[0] for v in VARIABLES], dtype=np.float32)
_UPPER = np.array([v.outlier[1] for v in VARIABLES], dtype=np.float32)
_VALID_LO = np.array([v.valid[0] for v in VARIABLES], dtype=np.float32)
_VALID_HI = np.array([v.valid[1] for v in VARIABLES], dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# frames
# ----------------------------------------------------------------------------------------------
def stays_frame(stays: Stays) -> pd.DataFrame:
    """One row per stay: RecordID, descriptors, ``label``, per-variable mean (NaN = never
    observed) and the ``observations`` column (``[n, 3] float32``: minute, variable, value)."""
    n, n_var = len(stays), len(TIME_SERIES)
    frame = pd.DataFrame({"RecordID": stays.record_id})
    for j, name in enumerate(DESCRIPTORS):
        frame[name] = stays.descriptors[:, j]
    frame[LABEL] = stays.label.astype(float)
    stay = np.repeat(np.arange(n), np.diff(stays.offsets))
    flat = stay * n_var + stays.variable.astype(np.int64)
    sums = np.bincount(flat, weights=stays.value, minlength=n * n_var).reshape(n, n_var)
    counts = np.bincount(flat, minlength=n * n_var).reshape(n, n_var)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    for v, name in enumerate(TIME_SERIES):
        frame[f"mean {name}"] = means[:, v]
    frame[OBSERVATIONS] = [stays.observations(i) for i in range(n)]
    return frame


def read_icu_data(path: Path) -> pd.DataFrame:
    """One hospital's stays from a folder of records + outcomes file, or the upstream archive.

    Raises
    ------
    DataError
        Naming the file and line (never a value of the record).
    """
    return stays_frame(read_source(Path(path)))


def write_icu_data(frame: pd.DataFrame, path: Path) -> None:
    """Write a frame of stays as a hospital folder in the upstream format (records +
    ``Outcomes.txt``)."""
    write_records(
        Path(path),
        (
            (int(row["RecordID"]), np.array([row[d] for d in DESCRIPTORS], dtype=np.float32),
             row[OBSERVATIONS], float(row[LABEL]))
            for _, row in frame.iterrows()
        ),
    )  # fmt: skip


def hospital_folders(folder: Path) -> list[Path]:
    """The hospital sub-folders of a simulation's data folder: when ``folder`` holds no
    outcomes file or archive itself, its sub-folders that hold an ``Outcomes*.txt`` each
    (their record files next to it or one folder down, as ``fedcare client check`` reads a
    hospital's folder), in name order; else ``[]`` (``folder`` is one source)."""
    if not folder.is_dir() or any(folder.glob("Outcomes*.txt")):
        return []
    if any(folder.glob("*.tar.gz")) or any(folder.glob("*.tgz")):
        return []
    subs = sorted(
        p for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any(p.glob("Outcomes*.txt"))
    )  # fmt: skip
    return subs


def _icu_hospitals(data_dir: str) -> list[tuple[str, pd.DataFrame]]:
    """Simulation: one hospital per sub-folder of the data folder when it has several
    (:func:`hospital_folders`), else the stays of the data folder, its one hospital folder or
    the archive grouped by ICU type (``ccu``, ``csru``, ``micu``, ``sicu``), in ICUType order."""
    if not data_dir:
        raise DataError(
            "task icu-mortality needs --data-dir: the folder with the PhysioNet 2012 set-a.tar.gz "
            "(or its unpacked set-a/ and Outcomes-a.txt), or one such folder per hospital"
        )
    folders = hospital_folders(Path(data_dir))
    if len(folders) > 1:  # a federation of real hospitals, one folder each
        return [(p.name, read_icu_data(p)) for p in folders]
    frame = read_icu_data(folders[0] if folders else Path(data_dir))
    unit = frame["ICUType"].to_numpy()
    unknown = ~np.isin(unit, list(ICU_UNITS))
    if unknown.any():
        raise DataError(
            f"{Path(data_dir).name}: {int(unknown.sum())} stay(s) without a known ICUType (1-4), "
            f"first RecordID {int(frame['RecordID'][unknown].iloc[0])}; the ICU-type split needs "
            "it (or simulate --hospitals N to partition instead)"
        )
    return [
        (name, frame[unit == code].reset_index(drop=True))
        for code, name in ICU_UNITS.items()
        if (unit == code).any()
    ]


# ----------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------
def _locf(
    values: np.ndarray, mask: np.ndarray, hours_per_bin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Carry the last observation forward along axis 1 and compute the time since it.

    ``values, mask: [N, T, C]`` -> ``(filled [N, T, C] (0 before the first observation),
    delta [N, T, C] in hours / 48)``; ``delta`` is 0 in an observed bin and counts from
    admission before the first observation (GRU-D's ``delta``, Che et al. 2018).
    """
    t = np.arange(values.shape[1])[None, :, None]
    last = np.where(mask, t, -1)
    np.maximum.accumulate(last, axis=1, out=last)
    filled = np.take_along_axis(values, np.maximum(last, 0), axis=1)
    filled = np.where(last >= 0, filled, 0.0)
    delta = np.where(last >= 0, t - last, t + 1) * hours_per_bin / 48.0
    return filled.astype(np.float32), delta.astype(np.float32)


def stay_tensors(frame: pd.DataFrame, preprocessing: str) -> tuple[np.ndarray, np.ndarray]:
    """Tensors of a frame of stays (see the module docstring; nothing depends on other stays).

    Parameters
    ----------
    frame : pd.DataFrame
        Rows of :func:`stays_frame`.
    preprocessing : str
        ``hourly`` (T = 48) or ``half-hourly`` (T = 96).

    Returns
    -------
    x : np.ndarray
        ``[N, T, 46, 3] float32``: per bin and channel (value, mask, hours since observed / 48).
    y : np.ndarray
        ``[N] float32``.
    """
    minutes_per_bin = _BIN_MINUTES[preprocessing]
    n_bins = WINDOW_MINUTES // minutes_per_bin
    n, n_var = len(frame), len(TIME_SERIES)
    obs = list(frame[OBSERVATIONS])
    lengths = np.array([len(o) for o in obs], dtype=np.int64)
    flat = np.concatenate(obs) if n and lengths.sum() else np.zeros((0, 3), np.float32)
    stay = np.repeat(np.arange(n), lengths)
    minute, var, value = flat[:, 0].astype(np.int64), flat[:, 1].astype(np.int64), flat[:, 2]
    keep = (value >= _LOWER[var]) & (value <= _UPPER[var])  # outliers: not observed
    stay, minute, var = stay[keep], minute[keep], var[keep]
    value = np.clip(value[keep], _VALID_LO[var], _VALID_HI[var])
    z = np.empty_like(value)
    for v, spec in enumerate(VARIABLES):
        sel = var == v
        z[sel] = spec.normalise(value[sel])
    t = np.minimum(minute // minutes_per_bin, n_bins - 1)  # 48:00 belongs to the last bin
    cell = (stay * n_bins + t) * n_var + var
    size = n * n_bins * n_var
    sums = np.bincount(cell, weights=z, minlength=size).reshape(n, n_bins, n_var)
    counts = np.bincount(cell, minlength=size).reshape(n, n_bins, n_var)
    mask = counts > 0
    mean = np.where(mask, sums / np.maximum(counts, 1), 0.0)
    filled, delta = _locf(mean, mask, minutes_per_bin / 60.0)

    static = _static_channels(frame)  # [N, S] value, [N, S] known
    values = np.concatenate(
        [filled, np.broadcast_to(static[0][:, None, :], (n, n_bins, static[0].shape[1]))], axis=2
    )
    values[:, :, -1] = (np.arange(n_bins) / n_bins)[None, :]  # hour of the stay (fraction)
    known = np.broadcast_to(static[1][:, None, :], (n, n_bins, static[1].shape[1]))
    masks = np.concatenate([mask.astype(np.float32), known], axis=2)
    deltas = np.concatenate([delta, 1.0 - known], axis=2)
    x = np.stack([values, masks, deltas], axis=-1).astype(np.float32)  # [N, T, V, 3]
    return x, frame[LABEL].to_numpy(np.float32)


def _static_channels(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(value [N, 9], known [N, 9])`` for :data:`STATIC_CHANNELS` (unknown: value 0)."""

    def scaled(spec: Variable, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ok = ~np.isnan(raw) & (raw >= spec.outlier[0]) & (raw <= spec.outlier[1])
        x = np.clip(np.where(ok, raw, spec.normal), *spec.valid)
        return np.where(ok, spec.normalise(x), 0.0), ok.astype(np.float32)

    age, age_ok = scaled(AGE, frame["Age"].to_numpy(float))
    height, height_ok = scaled(HEIGHT, frame["Height"].to_numpy(float))
    weight, weight_ok = scaled(WEIGHT, frame["Weight"].to_numpy(float))
    gender = frame["Gender"].to_numpy(float)
    sex_ok = np.isin(gender, (0.0, 1.0))
    sex = np.where(sex_ok, 2 * gender - 1, 0.0)  # male +1, female -1
    unit = frame["ICUType"].to_numpy(float)
    unit_ok = np.isin(unit, list(ICU_UNITS))
    onehot = [(unit == code).astype(np.float32) for code in ICU_UNITS]
    ones = np.ones(len(frame), dtype=np.float32)
    values = np.stack([age, sex, height, weight, *onehot, 0 * ones], axis=1)
    known = np.stack([age_ok, sex_ok, height_ok, weight_ok, *[unit_ok] * 4, ones], axis=1)
    return values.astype(np.float32), known.astype(np.float32)


def _input_shape(preprocessing: str) -> tuple[int, ...]:
    return (WINDOW_MINUTES // _BIN_MINUTES[preprocessing], N_CHANNELS, 3)


ICU_TASKS: dict[str, Task] = {
    "icu-mortality": Task(
        name="icu-mortality",
        read_file=read_icu_data,
        load_hospitals=_icu_hospitals,
        write_file=write_icu_data,
        file_name=lambda hospital: hospital,  # a folder per hospital
        features=stay_tensors,
        input_shape=_input_shape,
        natural_split=True,
        preprocessings=tuple(_BIN_MINUTES),
        positive_class="in-hospital death",
        default_test_fraction=0.2,
        models=("icu-logreg", "icu-gru", "icu-tcn"),
        repartitionable=True,
        attribution_names=lambda preprocessing: (*TIME_SERIES, *STATIC_CHANNELS),
        attribution_axis=1,  # [T, V, 3]: one importance per variable (channel)
        # chosen with benchmarks/icu_models.py (docs/icu.md): 60 rounds of one local
        # epoch at expected batch 64 and learning rate 0.25
        run_defaults={"train.rounds": 60, "train.batch-size": 64, "train.lr": 0.25},
        # PhysioNet 2012's descriptors: Gender 0 = female, 1 = male (-1 = missing); Age in years
        subgroups=(
            Subgroup("sex", "Gender", levels=(0, 1), labels=("female", "male")),
            Subgroup("age", "Age", bands=(50, 65, 80), unit="years"),
        ),
    ),
}
