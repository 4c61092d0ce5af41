"""Tabular tasks: one per task file in the app's ``tasks/`` folder (see :mod:`.taskfile`).

The schema, ranges and preprocessing of a tabular task come from its file; this module holds
what a file cannot say -- how to read a dataset's upstream file format and where embedded data
comes from -- and turns each file into a :class:`~shared_models.tasks.base.Task`.

Formats (``[task] format``):

``csv`` (default)
    A CSV export with a header row (:func:`~.table.read_csv_table`). ``fedcare simulate
    --data-dir`` takes a folder with one CSV per hospital (the file names are the hospital
    names) or a single CSV to partition into simulated hospitals.
``uci-heart-disease``
    UCI Heart Disease's upstream ``processed.<hospital>.data`` files (14 comma-separated columns,
    no header), one per real hospital: cleveland, hungarian, switzerland, va.

Embedded data (``[task] embedded``): ``sklearn-breast-cancer`` is Wisconsin Diagnostic Breast
Cancer (569 patients, :func:`sklearn.datasets.load_breast_cancer`), what ``fedcare simulate``
uses without ``--data-dir``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .base import LABEL, DataError, Task, require_file
from .table import (
    TableReport,
    check_table,
    encode_table,
    label_vector,
    read_csv_table,
    reference_scaling,
    require_valid,
    write_csv_table,
)
from .taskfile import MODEL_NAMES, TaskFileError, TaskSpec, parse_task_file

# the app's task files: <app dir>/tasks/*.toml, inside the bundle the hospitals approve
TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"


# ----------------------------------------------------------------------------------------------
# breast-cancer (WDBC), embedded in scikit-learn
# ----------------------------------------------------------------------------------------------
def breast_cancer_frame() -> pd.DataFrame:
    """The embedded WDBC data as a hospital-style table: 30 features + ``diagnosis`` (M/B).

    Source: :func:`sklearn.datasets.load_breast_cancer` (Street, Wolberg, Mangasarian 1993).
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    frame = data.data.copy()
    # scikit-learn codes 0 = malignant, 1 = benign
    frame["diagnosis"] = np.where(data.target.to_numpy() == 0, "M", "B")
    return frame


# ----------------------------------------------------------------------------------------------
# heart-disease (UCI, four hospitals), upstream file format
# ----------------------------------------------------------------------------------------------
HEART_COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
]  # fmt: skip
HEART_HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")


def read_heart_disease_file(path: Path) -> pd.DataFrame:
    """Read one UCI ``processed.<hospital>.data`` file (upstream format, unchanged) as text cells.

    14 comma-separated columns (:data:`HEART_COLUMNS`), no header, ``?`` = missing.

    Raises
    ------
    DataError
        Naming the file and line: not text, wrong number of values, empty file.
    """
    path = Path(path)
    require_file(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: not a text file; expected the UCI comma-separated format"
        ) from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = [v.strip() for v in line.split(",")]
        if len(fields) != len(HEART_COLUMNS):
            raise DataError(
                f"{path}, line {lineno}: expected {len(HEART_COLUMNS)} comma-separated values "
                f"({', '.join(HEART_COLUMNS)}), found {len(fields)}"
            )
        rows.append(fields)
    if not rows:
        raise DataError(f"{path}: the file is empty (0 rows)")
    return pd.DataFrame(rows, columns=HEART_COLUMNS, dtype=str)


def write_heart_disease_file(frame: pd.DataFrame, path: Path) -> None:
    """Write rows in the UCI upstream format (14 columns, no header, ``?`` = missing)."""
    out = frame[HEART_COLUMNS].astype(str).replace({"": "?", "nan": "?"})
    out.to_csv(path, header=False, index=False)


def _heart_hospital_files(data_dir: str) -> list[tuple[str, Path]]:
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found")
    hospitals = []
    for hospital in HEART_HOSPITALS:
        path = folder / f"processed.{hospital}.data"
        if not path.exists():
            raise DataError(
                f"{path}: missing; task heart-disease expects processed.<hospital>.data for "
                f"{', '.join(HEART_HOSPITALS)} (the UCI upstream files)"
            )
        hospitals.append((hospital, path))
    return hospitals


# ----------------------------------------------------------------------------------------------
# formats and embedded data
# ----------------------------------------------------------------------------------------------
def _csv_hospital_files(data_dir: str) -> list[tuple[str, Path]]:
    """One CSV file (to partition) or a folder of hospital CSVs (file stem = hospital name)."""
    path = Path(data_dir)
    if path.is_file():
        return [(path.stem, path)]
    if not path.is_dir():
        raise DataError(f"{path}: data folder or CSV file not found")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".csv" and p.is_file())
    if not files:
        raise DataError(
            f"{path}: no *.csv files; give one CSV per hospital (the file names are the "
            "hospital names) or one CSV to split into simulated hospitals"
        )
    return [(p.stem, p) for p in files]


@dataclass(frozen=True)
class TableFormat:
    """How a format's hospital files are named, found, read and written.

    Attributes
    ----------
    read : Callable[[Path], pd.DataFrame]
        One hospital file -> its table (text cells, the file's column names).
    write : Callable[[pd.DataFrame, Path], None]
        A table -> a hospital file in the format.
    file_name : Callable[[str], str]
        Hospital name -> file name.
    hospital_files : Callable[[str], list[tuple[str, Path]]]
        Simulation: a ``--data-dir`` -> ``[(hospital, file)]``.
    natural_split : bool
        The format's files are real hospitals (never partitioned).
    """

    read: Callable[[Path], pd.DataFrame]
    write: Callable[[pd.DataFrame, Path], None]
    file_name: Callable[[str], str]
    hospital_files: Callable[[str], list[tuple[str, Path]]]
    natural_split: bool = False


TABLE_FORMATS: dict[str, TableFormat] = {
    "csv": TableFormat(
        read=read_csv_table,
        write=write_csv_table,
        file_name=lambda hospital: f"{hospital}.csv",
        hospital_files=_csv_hospital_files,
    ),
    "uci-heart-disease": TableFormat(
        read=read_heart_disease_file,
        write=write_heart_disease_file,
        file_name=lambda hospital: f"processed.{hospital}.data",
        hospital_files=_heart_hospital_files,
        natural_split=True,
    ),
}

# embedded data: name -> (hospital name, loader)
EMBEDDED_DATA: dict[str, tuple[str, Callable[[], pd.DataFrame]]] = {
    "sklearn-breast-cancer": ("wdbc", breast_cancer_frame),
}


# ----------------------------------------------------------------------------------------------
# task files -> tasks
# ----------------------------------------------------------------------------------------------
def task_from_spec(spec: TaskSpec) -> Task:
    """The :class:`Task` a parsed task file describes (format, checks, encoding, scaling)."""
    fmt = TABLE_FORMATS[spec.format]

    def checked(frame: pd.DataFrame, source: str) -> pd.DataFrame:
        require_valid(check_table(spec, frame, source))
        out = frame.copy()
        out[LABEL] = label_vector(spec, frame).astype(float)
        return out

    def read_file(path: Path) -> pd.DataFrame:
        return checked(fmt.read(Path(path)), str(path))

    def check_file(path: Path) -> TableReport:
        try:
            frame = fmt.read(Path(path))
        except DataError as exc:
            return TableReport(source=str(path), task=spec.name, rows=0, format_error=str(exc))
        return check_table(spec, frame, str(path))

    def load_hospitals(data_dir: str) -> list[tuple[str, pd.DataFrame]]:
        if not data_dir:
            if spec.embedded:
                hospital, load = EMBEDDED_DATA[spec.embedded]
                return [(hospital, checked(load(), f"embedded {spec.embedded} data"))]
            where = (
                "the folder with its upstream files"
                if fmt.natural_split
                else "a folder with one CSV per hospital, or one CSV to split"
            )
            raise DataError(f"task {spec.name} needs --data-dir: {where}")
        return [(hospital, read_file(path)) for hospital, path in fmt.hospital_files(data_dir)]

    def write_file(frame: pd.DataFrame, path: Path) -> None:
        fmt.write(frame.drop(columns=[LABEL], errors="ignore"), path)

    models = (spec.model, *[m for m in MODEL_NAMES if m != spec.model]) if spec.model else None
    label = spec.label
    return Task(
        name=spec.name,
        read_file=read_file,
        load_hospitals=load_hospitals,
        features=lambda frame, preprocessing: encode_table(spec, frame, preprocessing),
        input_shape=lambda preprocessing: (len(spec.output_columns(preprocessing)),),
        write_file=write_file,
        file_name=fmt.file_name,
        natural_split=fmt.natural_split,
        preprocessings=spec.preprocessings,
        positive_class=label.meaning
        or f"{label.column} = {' or '.join(str(v) for v in label.positive)}",
        default_test_fraction=spec.test_fraction or 0.3,
        reference_scaling=reference_scaling(spec, spec.preprocessing),
        scaling_for=lambda preprocessing: reference_scaling(spec, preprocessing),
        models=models or MODEL_NAMES,
        check_file=check_file,
        run_defaults=dict(spec.run),
        run_defaults_dp=dict(spec.run_dp),
        run_defaults_no_dp=dict(spec.run_no_dp),
        subgroups=spec.subgroups,
        feature_names=spec.output_columns,
    )


def task_from_file(path: Path) -> Task:
    """The task of one task file (e.g. ``fedcare client check --task FILE.toml``).

    Raises
    ------
    TaskFileError
        The file is missing or invalid.
    """
    return task_from_spec(parse_task_file(Path(path)))


def load_task_folder(folder: Path) -> tuple[dict[str, Task], dict[str, str]]:
    """Every ``*.toml`` task file of ``folder``: ``(tasks by name, problems by file name)``.

    A file whose task name is not its file name or that is invalid is left out, with its
    problem (shown when an unknown task is asked for). Messages name ``tasks/FILE``, never the
    folder's location.
    """
    tasks: dict[str, Task] = {}
    problems: dict[str, str] = {}
    for path in sorted(Path(folder).glob("*.toml")) if Path(folder).is_dir() else []:
        source = f"tasks/{path.name}"
        try:
            spec = parse_task_file(path, source=source)
        except TaskFileError as exc:
            problems[path.name] = str(exc)
            continue
        if spec.name != path.stem:
            problems[path.name] = (
                f"{source}: [task] name is '{spec.name}'; a task file in tasks/ is named after "
                f"its task: rename the file to {spec.name}.toml"
            )
            continue
        tasks[spec.name] = task_from_spec(spec)
    return tasks, problems


TABULAR_TASKS, TASK_FILE_PROBLEMS = load_task_folder(TASKS_DIR)
