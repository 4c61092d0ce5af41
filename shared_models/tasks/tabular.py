"""Tabular tasks read from the datasets' upstream files.

``breast-cancer``
    Wisconsin Diagnostic Breast Cancer (WDBC, 569 patients x 30 features), shipped inside
    scikit-learn (:func:`sklearn.datasets.load_breast_cancer`). Label 1 = malignant. Has no
    natural split: the simulation partitions it into hospitals. A hospital file is a CSV with a
    header, the 30 feature columns named as in scikit-learn, and a ``diagnosis`` column (M/B).
    Features are scaled to [-1, 1] with the published WDBC feature ranges.
``heart-disease``
    UCI Heart Disease, one upstream ``processed.<site>.data`` file per hospital (14 columns, no
    header, ``?`` = missing). Label ``num > 0``. Preprocessing ``flamby`` (the default) follows
    FLamby's Fed-Heart-Disease (du Terrail et al., NeurIPS 2022): drop slope, ca, thal; drop rows
    with a missing value; one-hot cp and restecg (first level dropped) -> 13 features.
    ``impute`` keeps every row and fills missing values with the site's training-split median.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .base import LABEL, DataError, Task, check_numeric, require_file


# ----------------------------------------------------------------------------------------------
# breast-cancer (WDBC)
# ----------------------------------------------------------------------------------------------
def _wdbc_feature_names() -> list[str]:
    from sklearn.datasets import load_breast_cancer

    return [str(n) for n in load_breast_cancer().feature_names]


def breast_cancer_frame() -> pd.DataFrame:
    """The embedded WDBC data as a hospital-style frame: 30 features + ``diagnosis`` (M/B).

    Source: :func:`sklearn.datasets.load_breast_cancer` (Street, Wolberg, Mangasarian 1993).
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    frame = data.data.copy()
    # scikit-learn codes 0 = malignant, 1 = benign
    frame["diagnosis"] = np.where(data.target.to_numpy() == 0, "M", "B")
    return frame


def _breast_from_frame(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    names = _wdbc_feature_names()
    missing = [c for c in [*names, "diagnosis"] if c not in frame.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}; a breast-cancer hospital file needs the 30 "
            "WDBC feature columns (scikit-learn names) and 'diagnosis' (M or B)"
        )
    diag = frame["diagnosis"].astype(str).str.strip().str.upper()
    bad = ~diag.isin(["M", "B", "1", "0"])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{source}, line {row + 2}: 'diagnosis' is {frame['diagnosis'].iloc[row]!r}; "
            "use M (malignant) or B (benign)"
        )
    out = check_numeric(frame[names], Path(source), first_line=2)
    out[LABEL] = diag.isin(["M", "1"]).astype(float).to_numpy()
    return out


def read_breast_cancer_csv(path: Path) -> pd.DataFrame:
    """Read a breast-cancer hospital CSV (header; 30 WDBC features; ``diagnosis`` M/B).

    Raises
    ------
    DataError
        File missing, not CSV, a column missing, a non-numeric feature or an unknown diagnosis.
    """
    path = Path(path)
    require_file(path)
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    return _breast_from_frame(frame, str(path))


def write_breast_cancer_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a breast-cancer hospital CSV (30 WDBC features + ``diagnosis`` M/B)."""
    out = frame[_wdbc_feature_names()].copy()
    out["diagnosis"] = np.where(frame[LABEL].to_numpy() > 0, "M", "B")
    out.to_csv(path, index=False)


def _breast_sites(data_dir: str) -> list[tuple[str, pd.DataFrame]]:
    if data_dir:
        files = sorted(Path(data_dir).glob("*.csv"))
        if not files:
            raise DataError(f"{data_dir}: no *.csv hospital files found for task breast-cancer")
        return [(f.stem, read_breast_cancer_csv(f)) for f in files]
    return [("wdbc", _breast_from_frame(breast_cancer_frame(), "embedded WDBC"))]


# Published min / max of the 30 WDBC features (the dataset description, "Summary Statistics",
# in scikit-learn's load_breast_cancer().DESCR), in feature order. Fixed, data-independent scaling
# to [-1, 1]: unlike per-site standardisation it keeps a label-skewed hospital's features on the
# same scale as everyone else's.
_WDBC_RANGES = (
    (6.981, 28.11), (9.71, 39.28), (43.79, 188.5), (143.5, 2501.0), (0.053, 0.163),
    (0.019, 0.345), (0.0, 0.427), (0.0, 0.201), (0.106, 0.304), (0.05, 0.097),
    (0.112, 2.873), (0.36, 4.885), (0.757, 21.98), (6.802, 542.2), (0.002, 0.031),
    (0.002, 0.135), (0.0, 0.396), (0.0, 0.053), (0.008, 0.079), (0.001, 0.03),
    (7.93, 36.04), (12.02, 49.54), (50.41, 251.2), (185.2, 4254.0), (0.071, 0.223),
    (0.027, 1.058), (0.0, 1.252), (0.0, 0.291), (0.156, 0.664), (0.055, 0.208),
)  # fmt: skip
_WDBC_CENTER = tuple((lo + hi) / 2 for lo, hi in _WDBC_RANGES)
_WDBC_SCALE = tuple((hi - lo) / 2 for lo, hi in _WDBC_RANGES)


def _breast_features(frame: pd.DataFrame, preprocessing: str) -> tuple[np.ndarray, np.ndarray]:
    names = _wdbc_feature_names()
    return frame[names].to_numpy(np.float32), frame[LABEL].to_numpy(np.float32)


# ----------------------------------------------------------------------------------------------
# heart-disease (UCI, four hospitals)
# ----------------------------------------------------------------------------------------------
HEART_COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
]  # fmt: skip
HEART_SITES = ("cleveland", "hungarian", "switzerland", "va")
_HEART_NUMERIC = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak"]
_HEART_ONEHOT = {"cp": (2.0, 3.0, 4.0), "restecg": (1.0, 2.0)}  # first level dropped
# Fixed scaling in the units of heart-disease.names (years, mm Hg, mg/dl, bpm, mm ST depression);
# binary and one-hot columns are left as they are. Being data-independent, it keeps real
# differences between hospitals visible to the model and needs no statistics from any site.
_HEART_CENTER = (50.0, 0.0, 130.0, 200.0, 0.0, 140.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
_HEART_SCALE = (10.0, 1.0, 20.0, 100.0, 1.0, 25.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)


def read_heart_disease_file(path: Path) -> pd.DataFrame:
    """Read one UCI ``processed.<site>.data`` file (upstream format, unchanged).

    14 comma-separated columns, no header, ``?`` = missing. Returns the 14 columns as float
    (NaN = missing) plus ``label = num > 0``.

    Raises
    ------
    DataError
        Naming the file and line: wrong column count, non-numeric value, empty file.
    """
    path = Path(path)
    require_file(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: not a text file; expected the UCI comma-separated format"
        ) from None
    n_rows = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        n_rows += 1
        n_fields = line.count(",") + 1
        if n_fields != len(HEART_COLUMNS):
            raise DataError(
                f"{path}, line {lineno}: expected {len(HEART_COLUMNS)} comma-separated values "
                f"({', '.join(HEART_COLUMNS)}), found {n_fields}"
            )
    if n_rows == 0:
        raise DataError(f"{path}: the file is empty")
    frame = pd.read_csv(
        path,
        header=None,
        names=HEART_COLUMNS,
        na_values="?",
        dtype=str,
        skip_blank_lines=True,
        keep_default_na=False,
    )
    frame = frame.apply(lambda c: c.str.strip())
    frame = frame.replace({"?": np.nan, "": np.nan})
    frame = check_numeric(frame, path, first_line=1)
    if frame["num"].isna().any():
        row = int(np.flatnonzero(frame["num"].isna().to_numpy())[0])
        raise DataError(f"{path}, line {row + 1}: the label column 'num' is missing")
    frame[LABEL] = (frame["num"] > 0).astype(float)
    return frame


def write_heart_disease_file(frame: pd.DataFrame, path: Path) -> None:
    """Write rows in the UCI upstream format (14 columns, no header, ``?`` = missing)."""
    frame[HEART_COLUMNS].to_csv(path, header=False, index=False, na_rep="?", float_format="%g")


def _heart_sites(data_dir: str) -> list[tuple[str, pd.DataFrame]]:
    if not data_dir:
        raise DataError(
            "task heart-disease needs --data-dir: the folder with the four UCI files "
            "processed.{cleveland,hungarian,switzerland,va}.data"
        )
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found")
    sites = []
    for site in HEART_SITES:
        path = folder / f"processed.{site}.data"
        if not path.exists():
            raise DataError(
                f"{path}: missing; task heart-disease expects processed.<site>.data for "
                f"{', '.join(HEART_SITES)} (the UCI upstream files)"
            )
        sites.append((site, read_heart_disease_file(path)))
    return sites


def _heart_features(frame: pd.DataFrame, preprocessing: str) -> tuple[np.ndarray, np.ndarray]:
    cols = [frame[c].to_numpy(float) for c in _HEART_NUMERIC]
    for col, levels in _HEART_ONEHOT.items():
        values = frame[col].to_numpy(float)
        for level in levels:
            onehot = (values == level).astype(float)
            onehot[np.isnan(values)] = np.nan
            cols.append(onehot)
    x = np.stack(cols, axis=1).astype(np.float32)
    y = frame[LABEL].to_numpy(np.float32)
    if preprocessing == "flamby":
        keep = ~np.isnan(x).any(axis=1)
        x, y = x[keep], y[keep]
    return x, y


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
TABULAR_TASKS: dict[str, Task] = {
    "breast-cancer": Task(
        name="breast-cancer",
        read_file=read_breast_cancer_csv,
        load_sites=_breast_sites,
        write_file=write_breast_cancer_csv,
        file_name=lambda site: f"{site}.csv",
        features=_breast_features,
        input_shape=lambda p: (30,),
        natural_split=False,
        preprocessings=("wdbc-ranges",),  # fixed min-max scaling to [-1, 1] (published ranges)
        positive_class="malignant",
        reference_scaling=(_WDBC_CENTER, _WDBC_SCALE),
    ),
    "heart-disease": Task(
        name="heart-disease",
        read_file=read_heart_disease_file,
        load_sites=_heart_sites,
        write_file=write_heart_disease_file,
        file_name=lambda site: f"processed.{site}.data",
        features=_heart_features,
        input_shape=lambda p: (len(_HEART_NUMERIC) + sum(len(v) for v in _HEART_ONEHOT.values()),),
        natural_split=True,
        preprocessings=("flamby", "impute"),
        positive_class="heart disease (num > 0)",
        default_test_fraction=0.34,  # FLamby's per-centre 66/34 split
        reference_scaling=(_HEART_CENTER, _HEART_SCALE),
    ),
}
