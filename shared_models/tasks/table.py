"""Hospital tables against a task file: reading CSV exports, checking, encoding.

* :func:`read_csv_table` reads the CSV dialects hospitals export (comma, semicolon or tab;
  decimal comma; quoted headers; UTF-8 with or without BOM) with pandas, every cell as text.
* :func:`check_table` counts, per column, missing values, values of the wrong type, values
  outside the task's range and label values it does not declare -- and never keeps a value.
  Its :class:`TableReport` is what ``fedcare client check`` prints and what a refused file's
  error says.
* :func:`encode_table` turns a checked table into model input ``x [N, F]`` and labels ``y [N]``
  (one-hot levels, missing indicators, dropped rows); the fixed scaling and the
  imputation with the feature's fixed centre are :func:`~shared_models.tasks.base.prepare_hospital`'s.

No message of this module contains a cell value: only file, column, counts and row numbers.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .base import DataError, require_file
from .taskfile import FeatureSpec, TaskSpec, Value, as_number

_DELIMITERS = (",", ";", "\t")
_DECIMAL_COMMA = re.compile(r"^[+-]?\d*,\d+([eE][+-]?\d+)?$")
_PLAIN_NUMBER = re.compile(r"^[+-]?\d+$")


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def read_csv_table(path: Path) -> pd.DataFrame:
    """Read a hospital's CSV export; every cell as stripped text (``""`` when empty).

    The delimiter (``,`` ``;`` or tab) is found with :class:`csv.Sniffer`, falling back to the
    one that splits the header line most; a UTF-8 byte-order mark is dropped; quoted headers
    and cells are unquoted; in a file not separated by commas, a column whose numbers use a
    decimal comma (``12,5``) is rewritten with a decimal point.

    Raises
    ------
    DataError
        Missing or empty file, not UTF-8, no header, a column named twice in the header, a row
        with more fields than the header. The message names the file (and line), no values.
    """
    path = Path(path)
    require_file(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte {exc.start}); export the table as 'CSV UTF-8'"
        ) from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty (0 rows); export the table with its header")
    lines = text.splitlines()
    header_line = next(line for line in lines if line.strip())
    delimiter = _sniff_delimiter(text, header_line)
    header = next(csv.reader([header_line], delimiter=delimiter))
    names = [h.strip() for h in header]
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not name:
            raise DataError(
                f"{path}: header column {i + 1} has no name; the first line must name every column"
            )
        if name in seen:
            raise DataError(f"{path}: the header names column '{name}' twice")
        seen.add(name)
    try:
        frame = pd.read_csv(
            io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False,
            na_filter=False, skip_blank_lines=True, skipinitialspace=True, engine="c",
        )  # fmt: skip
    except pd.errors.ParserError as exc:  # "Expected 5 fields in line 7, saw 6": no values
        found = re.search(r"Expected \d+ fields in line \d+, saw \d+", str(exc))
        raise DataError(
            f"{path}: not a regular table ({found.group(0) if found else 'unbalanced quotes'}); "
            "every row needs as many fields as the header"
        ) from None
    frame.columns = names
    frame = frame.fillna("")  # short rows are padded by pandas: their cells count as missing
    frame = frame.apply(lambda col: col.str.strip())
    if delimiter != ",":
        for col in frame.columns:
            cells = frame[col]
            filled = cells[cells != ""]
            if len(filled) and filled.str.match(_DECIMAL_COMMA.pattern).any():
                plain = filled.str.match(_DECIMAL_COMMA.pattern) | filled.str.match(
                    _PLAIN_NUMBER.pattern
                )
                if plain.all():
                    frame[col] = cells.str.replace(",", ".", regex=False)
    return frame


def _sniff_delimiter(text: str, header_line: str) -> str:
    """The delimiter that splits the header into the most columns; on a tie, the one
    :class:`csv.Sniffer` finds in the first lines (else comma)."""
    counts = {d: len(next(csv.reader([header_line], delimiter=d))) for d in _DELIMITERS}
    best = max(counts.values())
    try:
        sniffed = csv.Sniffer().sniff(text[:20_000], delimiters="".join(_DELIMITERS)).delimiter
    except csv.Error:
        sniffed = ","
    if counts.get(sniffed) == best:
        return sniffed
    return next(d for d in _DELIMITERS if counts[d] == best)


def write_csv_table(frame: pd.DataFrame, path: Path) -> None:
    """Write a table read by :func:`read_csv_table` (or an embedded one) back as a CSV file
    (comma, UTF-8, header; floats in their shortest exact form)."""
    frame.to_csv(path, index=False)


# ----------------------------------------------------------------------------------------------
# parsing cells against the spec
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Parsed:
    """One feature's cells: ``values`` float (NaN where missing or invalid), ``missing`` and
    ``invalid`` masks, ``out_of_range`` mask (numeric)."""

    values: np.ndarray
    missing: np.ndarray
    invalid: np.ndarray
    out_of_range: np.ndarray


def _cells(series: pd.Series, markers: tuple[Value, ...]) -> tuple[pd.Series, np.ndarray]:
    """``(cells, missing mask)``: empty cells, NaN and the declared markers are missing, a
    marker matching as :func:`match_values` matches (``"0"`` and ``0`` match a cell ``0.0``).
    Text cells come back stripped; numeric columns (embedded data) as they are."""
    if pd.api.types.is_numeric_dtype(series):
        missing = series.isna().to_numpy()
        return series, missing | (match_values(series, markers) >= 0) if markers else missing
    text = series.fillna("").astype(str).str.strip()
    missing = (text == "").to_numpy()
    if markers:
        missing |= match_values(text, markers) >= 0
    return text, missing


def _numbers(series: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype=float, na_value=np.nan)
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def match_values(series: pd.Series, values: tuple[Value, ...]) -> np.ndarray:
    """Index into ``values`` of each cell (``-1``: none). Numbers, and text that reads as a
    number (``"1"``), compare as numbers (``"1"`` matches ``1.0``); other text as stripped
    text."""
    out = np.full(len(series), -1, dtype=np.int64)
    text = series.astype(str).str.strip() if not pd.api.types.is_numeric_dtype(series) else None
    numbers = _numbers(series)
    for i, v in enumerate(values):
        hit = np.zeros(len(series), bool)
        if isinstance(v, str) and text is not None:
            hit |= (text == v).to_numpy()
        number = as_number(v)
        if number is not None:
            hit |= numbers == number
        out[(out < 0) & hit] = i
    return out


def _parse_feature(f: FeatureSpec, series: pd.Series) -> _Parsed:
    text, missing = _cells(series, f.missing)
    n = len(series)
    if f.type == "numeric":
        numbers = _numbers(text)
        invalid = ~missing & ~np.isfinite(numbers)
        ok = ~missing & ~invalid
        assert f.min is not None and f.max is not None
        with np.errstate(invalid="ignore"):
            out = ok & ((numbers < f.min) | (numbers > f.max))
        values = np.where(ok, numbers, np.nan)
        return _Parsed(values, missing, invalid, out)
    index = match_values(text, f.levels)
    invalid = ~missing & (index < 0)
    values = np.where(missing | invalid, np.nan, index.astype(float))
    return _Parsed(values, missing, invalid, np.zeros(n, dtype=bool))


# ----------------------------------------------------------------------------------------------
# checking
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnReport:
    """Counts for one column of a hospital's table (never a value).

    Attributes
    ----------
    column, kind : str
        Column name; ``numeric`` / ``binary`` / ``categorical`` / ``label`` / ``ignored``.
    missing : int
        Missing cells (empty or a declared marker).
    wrong_type : int
        Not a number (numeric), not a declared level (binary, categorical), not a declared
        label value (label).
    out_of_range : int
        Numeric values outside the task's ``[min, max]``.
    first_bad_row : int or None
        1-based data row (the header is not counted) of the first wrong or out-of-range cell.
    """

    column: str
    kind: str
    missing: int = 0
    wrong_type: int = 0
    out_of_range: int = 0
    first_bad_row: int | None = None
    detail: str = ""  # the declared range or levels, from the task file
    markers: tuple[Value, ...] = ()  # the column's missing-value markers, from the task file


@dataclass(frozen=True)
class TableReport:
    """A hospital's table checked against a task file.

    Attributes
    ----------
    source : str
        The file (or embedded data) checked.
    task : str
        The task's name.
    rows : int
        Data rows.
    columns : list[ColumnReport]
        Features in task order, then the label, then ignored columns.
    missing_columns, extra_columns : list[str]
        Columns the task declares that the file lacks; columns of the file the task does not
        declare.
    positives, negatives : int
        Rows whose label is a positive / negative value.
    dropped_rows : int
        Rows that ``drop-row`` features leave out of training and evaluation.
    format_error : str
        The file could not be read as a table at all ("" otherwise).
    """

    source: str
    task: str
    rows: int
    columns: list[ColumnReport] = field(default_factory=list)
    missing_columns: list[str] = field(default_factory=list)
    extra_columns: list[str] = field(default_factory=list)
    positives: int = 0
    negatives: int = 0
    dropped_rows: int = 0
    format_error: str = ""

    @property
    def usable_rows(self) -> int:
        return self.rows - self.dropped_rows

    def problems(self) -> list[str]:
        """One sentence per problem, each naming the file, the column and the row count."""
        where = f"{self.source} ({self.rows} rows)"
        if self.format_error:
            return [self.format_error]
        out = [
            f"{where}: column '{c}' is missing (task {self.task} declares it)"
            for c in self.missing_columns
        ]
        out += [
            f"{where}: column '{c}' is not in task {self.task}; remove it, or list it in the "
            "task file's [task] ignore"
            for c in self.extra_columns
        ]
        for c in self.columns:
            at = f" (first at data row {c.first_bad_row})" if c.first_bad_row else ""
            if c.kind == "label" and (c.wrong_type or c.missing):
                bad = c.wrong_type + c.missing
                out.append(
                    f"{where}: label column '{c.column}': {bad} row(s) with a value that is "
                    f"neither positive nor negative{at}; the task declares {c.detail}"
                )
                continue
            if c.wrong_type:
                what = (
                    "not a finite number"
                    if c.kind == "numeric"
                    else "not one of the declared levels"
                )
                out.append(
                    f"{where}: column '{c.column}': {c.wrong_type} row(s) {what}{at}; "
                    f"the task declares {c.detail}{_marker_hint(c)}"
                )
            if c.out_of_range:
                out.append(
                    f"{where}: column '{c.column}': {c.out_of_range} row(s) outside the valid "
                    f"range {c.detail}{at}; correct them or mark them missing{_marker_hint(c)}"
                )
        if self.rows == 0:
            out.append(f"{where}: the file has a header but no data rows")
        elif not self.missing_columns and not out and self.usable_rows < 4:
            out.append(
                f"{where}: only {self.usable_rows} row(s) remain after dropping rows with a "
                "missing value; a hospital needs at least 4"
            )
        return out

    @property
    def ok(self) -> bool:
        return not self.problems()


def _marker_hint(c: ColumnReport) -> str:
    """How missing markers match, for a message about values that may be unmatched markers."""
    how = "markers are compared as listed: text as written, numbers by value"
    if not c.markers:
        return f" (no missing marker is declared for it; {how})"
    listed = ", ".join(f'"{m}"' if isinstance(m, str) else f"{m:g}" for m in c.markers)
    return f" (its missing markers: {listed}; {how})"


def _detail(f: FeatureSpec) -> str:
    if f.type == "numeric":
        unit = f" {f.unit}" if f.unit else ""
        return f"[{f.min:g}, {f.max:g}]{unit}"
    return "levels " + ", ".join(str(v) for v in f.levels)


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) + 1 if len(hits) else None


def check_table(spec: TaskSpec, frame: pd.DataFrame, source: str) -> TableReport:
    """Check a hospital's table against ``spec``: counts per column, no values kept.

    Parameters
    ----------
    spec : TaskSpec
        The task file.
    frame : pd.DataFrame
        The table as read (text cells, or numbers for embedded data), one row per patient.
    source : str
        File name for the messages.
    """
    n = len(frame)
    present = set(frame.columns)
    missing_cols = [c for c in spec.columns if c not in present]
    extra = [c for c in frame.columns if c not in set(spec.columns)]
    columns: list[ColumnReport] = []
    dropped = np.zeros(n, dtype=bool)
    for f in spec.features:
        if f.name not in present:
            continue
        p = _parse_feature(f, frame[f.name])
        columns.append(
            ColumnReport(
                column=f.name,
                kind=f.type,
                missing=int(p.missing.sum()),
                wrong_type=int(p.invalid.sum()),
                out_of_range=int(p.out_of_range.sum()),
                first_bad_row=_first(p.invalid | p.out_of_range),
                detail=_detail(f),
                markers=f.missing,
            )
        )
        if f.if_missing == "drop-row":
            dropped |= p.missing
    positives = negatives = 0
    lab = spec.label
    if lab.column in present:
        _, missing = _cells(frame[lab.column], spec.missing)
        pos = match_values(frame[lab.column], lab.positive) >= 0
        neg = match_values(frame[lab.column], lab.negative) >= 0
        bad = ~missing & ~pos & ~neg  # a missing label is reported with these
        positives, negatives = int(pos.sum()), int(neg.sum())
        declared = (
            f"positive {', '.join(map(str, lab.positive))}; "
            f"negative {', '.join(map(str, lab.negative))}"
        )
        columns.append(
            ColumnReport(
                column=lab.column,
                kind="label",
                missing=int(missing.sum()),
                wrong_type=int(bad.sum()),
                first_bad_row=_first(bad | missing),
                detail=declared,
            )
        )
    for c in spec.ignore:
        if c in present:
            _, missing = _cells(frame[c], spec.missing)
            columns.append(ColumnReport(column=c, kind="ignored", missing=int(missing.sum())))
    return TableReport(
        source=source,
        task=spec.name,
        rows=n,
        columns=columns,
        missing_columns=missing_cols,
        extra_columns=extra,
        positives=positives,
        negatives=negatives,
        dropped_rows=int(dropped.sum()),
    )


def require_valid(report: TableReport) -> None:
    """Raise :class:`DataError` listing every problem of ``report`` (no values), if any."""
    problems = report.problems()
    if problems:
        more = f" (and {len(problems) - 3} more problem(s))" if len(problems) > 3 else ""
        raise DataError(
            "; ".join(problems[:3])
            + more
            + f". `fedcare client check --task {report.task} --data FILE` shows every column"
        )


# ----------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------
def label_vector(spec: TaskSpec, frame: pd.DataFrame) -> np.ndarray:
    """``[N] float32``: 1 for a positive label value, 0 otherwise (the table is checked)."""
    return (match_values(frame[spec.label.column], spec.label.positive) >= 0).astype(np.float32)


def encode_table(
    spec: TaskSpec, frame: pd.DataFrame, preprocessing: str
) -> tuple[np.ndarray, np.ndarray]:
    """Model input of a checked table, before the fixed scaling and the imputation.

    Per feature, in the task file's order: numeric -> its value; binary -> 0/1 (first / second
    level); categorical -> one 0/1 column per level (the first left out with ``drop-first``).
    A missing value is NaN in its columns (imputed later by
    :func:`~shared_models.tasks.base.prepare_hospital` with the feature's fixed centre) and, with a
    missing indicator, 1 in the indicator column that follows; rows missing a ``drop-row``
    feature are removed.

    Returns
    -------
    x : np.ndarray
        ``[N_kept, F] float32`` with ``F = len(spec.output_columns(preprocessing))``.
    y : np.ndarray
        ``[N_kept] float32`` in {0, 1}.
    """
    columns: list[np.ndarray] = []
    drop = np.zeros(len(frame), dtype=bool)
    for f in spec.features_for(preprocessing):
        p = _parse_feature(f, frame[f.name])
        if f.type == "categorical":
            for level in f.encoded_levels():
                k = f.levels.index(level)
                onehot = (p.values == k).astype(float)
                onehot[p.missing] = np.nan
                columns.append(onehot)
        else:
            columns.append(p.values)
        if f.if_missing == "drop-row":
            drop |= p.missing
        elif f.missing_indicator:
            columns.append(p.missing.astype(float))
    x = np.stack(columns, axis=1).astype(np.float32)
    y = label_vector(spec, frame)
    return x[~drop], y[~drop]


def reference_scaling(
    spec: TaskSpec, preprocessing: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per output column ``(center, scale)``: a numeric feature's fixed scaling, ``(0, 1)``
    for 0/1 columns."""
    center: list[float] = []
    scale: list[float] = []
    for f in spec.features_for(preprocessing):
        width = len(f.encoded_levels()) if f.type == "categorical" else 1
        c, s = f.scaling if f.type == "numeric" else (0.0, 1.0)
        center += [c] * width
        scale += [s] * width
        if f.if_missing == "impute" and f.missing_indicator:
            center.append(0.0)
            scale.append(1.0)
    return tuple(center), tuple(scale)
