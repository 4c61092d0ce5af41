"""Task files: a consortium's tabular task as a declarative TOML file instead of Python.

A task file says what every hospital's table must look like and how it becomes model input:
the label column and which of its values mean positive; per feature its type (numeric, binary,
categorical with its levels), unit, valid range from the data dictionary (which is also the
fixed, data-independent scaling), missing-value markers and what to do with a missing value
(drop the row, or impute the feature's fixed centre and add a missing-indicator column).
The files live in the app's ``tasks/`` folder, so they travel in the app bundle the hospitals
approve and the bundle's hash covers the schema and the ranges.

Example (``tasks/readmission.toml``)::

    [task]
    name = "readmission"
    description = "30-day readmission after discharge"
    missing = ["NA", -9]             # missing-value markers in every column ("" always is)

    [label]
    column = "readmitted"
    positive = ["yes"]
    negative = ["no"]

    [[feature]]
    name = "age"
    type = "numeric"
    unit = "years"
    min = 18
    max = 110
    if-missing = "impute"

    [[feature]]
    name = "admission"
    type = "categorical"
    levels = ["elective", "emergency", "transfer"]

    [[subgroup]]                     # optional: reported separately by `fedcare evaluate`
    column = "age"
    bands = [50, 65, 80]             # < 50, 50 to < 65, 65 to < 80, >= 80 (numeric columns)

    [[subgroup]]
    column = "sex"
    levels = [0, 1]                  # one group per value (categorical columns)
    labels = ["female", "male"]

    [run.dp]                         # optional: the consortium's run settings (its recipe)
    "train.rounds" = 15              # ([run] for both privacy settings, [run.dp], [run.no-dp])
    "train.lr" = 1.0

Without a ``[run]`` table, :func:`shared_models.recipes.rule` picks the settings.

Parsing is strict (:func:`parse_task_text`): an unknown key, a wrong type, empty levels,
``min >= max`` or a column named twice is one :class:`TaskFileError` naming the file and the key.
This module only reads TOML; the tables themselves are checked by :mod:`.table`.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .base import DataError, Subgroup

FEATURE_TYPES = ("numeric", "binary", "categorical")
IF_MISSING = ("drop-row", "impute")
MODEL_NAMES = ("mlp", "logreg")  # the tabular models of shared_models.models.MODELS
DEFAULT_PREPROCESSING = "declared"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

Value = str | int | float  # a cell value as a task file declares it (a level, a label value)


class TaskFileError(DataError):
    """A task file is unreadable or invalid; the message names the file and the key."""


@dataclass(frozen=True)
class FeatureSpec:
    """One input column of a task file.

    Attributes
    ----------
    name : str
        Column name in the hospitals' files (header text).
    type : str
        ``numeric``, ``binary`` or ``categorical``.
    unit : str
        Unit of a numeric column (documentation; ``""`` when none).
    description : str
        What the column means (documentation).
    min, max : float or None
        Numeric: the valid range (inclusive) from the data dictionary; a value outside it is an
        error. Also the fixed scaling: ``[min, max]`` maps to ``[-1, 1]`` unless ``center`` and
        ``scale`` are given.
    center, scale : float or None
        Numeric, optional: fixed scaling ``(x - center) / scale`` in the column's unit.
    levels : tuple
        Binary: ``(value coded 0, value coded 1)`` (default ``(0, 1)``). Categorical: the levels,
        one-hot encoded in this order.
    drop_first : bool
        Categorical: leave out the first level's one-hot column (it is implied by the others).
    missing : tuple[str | int | float, ...]
        Markers meaning "missing" besides the empty cell: text matches a cell as text, a number
        (or text that reads as one, ``"0"``) matches a cell of the same value (``0.0``).
    if_missing : str
        ``drop-row`` (the row is not used) or ``impute`` (the feature's fixed centre, a constant of
        the task; see :func:`~shared_models.tasks.base.prepare_hospital`).
    missing_indicator : bool
        ``impute`` only: add a 0/1 column that is 1 where the value was missing.
    """

    name: str
    type: str
    unit: str = ""
    description: str = ""
    min: float | None = None
    max: float | None = None
    center: float | None = None
    scale: float | None = None
    levels: tuple[Value, ...] = ()
    drop_first: bool = False
    missing: tuple[Value, ...] = ()
    if_missing: str = "drop-row"
    missing_indicator: bool = True

    @property
    def scaling(self) -> tuple[float, float]:
        """``(center, scale)`` of a numeric feature: explicit, else ``[min, max] -> [-1, 1]``."""
        if self.center is not None and self.scale is not None:
            return self.center, self.scale
        assert self.min is not None and self.max is not None
        return (self.min + self.max) / 2, (self.max - self.min) / 2

    def encoded_levels(self) -> tuple[Value, ...]:
        """The levels that get a one-hot column (categorical, after ``drop-first``)."""
        return self.levels[1:] if self.drop_first else self.levels


@dataclass(frozen=True)
class LabelSpec:
    """The label column: ``positive`` values become 1, ``negative`` values 0."""

    column: str
    positive: tuple[Value, ...]
    negative: tuple[Value, ...]
    meaning: str = ""


@dataclass(frozen=True)
class Variant:
    """A named alternative missing-value handling (``[preprocessing.NAME]``): it replaces
    ``if-missing`` (and ``missing-indicator``) of every feature."""

    name: str
    if_missing: str
    missing_indicator: bool


@dataclass(frozen=True)
class TaskSpec:
    """A parsed, validated task file.

    Attributes
    ----------
    name, description : str
        Registry name (``task.name`` in the run config) and what the task predicts.
    label : LabelSpec
    features : tuple[FeatureSpec, ...]
        In model-input order.
    ignore : tuple[str, ...]
        Columns present in the hospitals' files that the task does not use.
    missing : tuple[str | int | float, ...]
        The task's missing-value markers (``[task] missing``; a feature may have its own).
    model : str or None
        Default model (``model.name = "default"``).
    test_fraction : float or None
        Default test share of each hospital.
    format : str
        Hospital file format: ``csv`` (a header row; see :func:`~.table.read_csv_table`) or an
        upstream format with a reader in code (``uci-heart-disease``).
    embedded : str
        Data shipped with an installed package that ``fedcare simulate`` uses without
        ``--data-dir`` (``sklearn-breast-cancer``), or ``""``.
    preprocessing : str
        The name of the handling the features declare (run config ``task.preprocessing``).
    variants : tuple[Variant, ...]
        Other named handlings.
    source : str
        Where the spec was read from (for messages).
    run, run_dp, run_no_dp : Mapping[str, Any]
        The ``[run]`` table (the consortium's recipe for both privacy settings) and its
        ``[run.dp]`` / ``[run.no-dp]`` tables: run-config keys of
        :data:`shared_models.recipes.RECIPE_KEYS`.
    subgroups : tuple[Subgroup, ...]
        The ``[[subgroup]]`` tables: patient subgroups ``fedcare evaluate`` reports separately.
    """

    name: str
    description: str
    label: LabelSpec
    features: tuple[FeatureSpec, ...]
    ignore: tuple[str, ...] = ()
    missing: tuple[Value, ...] = ()
    model: str | None = None
    test_fraction: float | None = None
    format: str = "csv"
    embedded: str = ""
    preprocessing: str = DEFAULT_PREPROCESSING
    variants: tuple[Variant, ...] = ()
    source: str = ""
    run: Mapping[str, Any] = field(default_factory=dict, hash=False)
    run_dp: Mapping[str, Any] = field(default_factory=dict, hash=False)
    run_no_dp: Mapping[str, Any] = field(default_factory=dict, hash=False)
    subgroups: tuple[Subgroup, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column a hospital's file must have: features, label, ignored columns."""
        return (*[f.name for f in self.features], self.label.column, *self.ignore)

    @property
    def preprocessings(self) -> tuple[str, ...]:
        return (self.preprocessing, *[v.name for v in self.variants])

    def features_for(self, preprocessing: str) -> tuple[FeatureSpec, ...]:
        """The features with a variant's missing-value handling applied (``preprocessing`` is
        one of :attr:`preprocessings`)."""
        if preprocessing == self.preprocessing:
            return self.features
        variant = next(v for v in self.variants if v.name == preprocessing)
        return tuple(
            replace(f, if_missing=variant.if_missing, missing_indicator=variant.missing_indicator)
            for f in self.features
        )

    def output_columns(self, preprocessing: str) -> list[str]:
        """Names of the model-input columns, in order (``age``, ``cp=2``, ``age missing``)."""
        names: list[str] = []
        for f in self.features_for(preprocessing):
            if f.type == "categorical":
                names += [f"{f.name}={level}" for level in f.encoded_levels()]
            else:
                names.append(f.name)
            if f.if_missing == "impute" and f.missing_indicator:
                names.append(f"{f.name} missing")
        return names


# ----------------------------------------------------------------------------------------------
# strict parsing
# ----------------------------------------------------------------------------------------------
_TASK_KEYS = {
    "name", "description", "model", "test-fraction", "format", "embedded", "preprocessing",
    "missing", "if-missing", "ignore",
}  # fmt: skip
_LABEL_KEYS = {"column", "positive", "negative", "meaning"}
_FEATURE_KEYS = {
    "name", "type", "unit", "description", "min", "max", "center", "scale", "levels",
    "drop-first", "missing", "if-missing", "missing-indicator",
}  # fmt: skip
_ONLY_FOR = {  # keys that make sense for one feature type only
    "unit": ("numeric",), "min": ("numeric",), "max": ("numeric",), "center": ("numeric",),
    "scale": ("numeric",), "levels": ("binary", "categorical"), "drop-first": ("categorical",),
}  # fmt: skip
_VARIANT_KEYS = {"if-missing", "missing-indicator"}
_SUBGROUP_KEYS = {"name", "column", "levels", "labels", "bands", "unit"}
# the names tabular.TABLE_FORMATS and tabular.EMBEDDED_DATA register (a test checks they agree)
FORMATS = ("csv", "uci-heart-disease")
EMBEDDED = ("sklearn-breast-cancer",)


class _Reader:
    """Typed access to one TOML table; every error names the file and the dotted key."""

    def __init__(self, source: str, where: str, table: Any) -> None:
        self.source, self.where = source, where
        if not isinstance(table, dict):
            raise self.error("", f"must be a table, got {_kind(table)}")
        self.table = table

    def error(self, key: str, problem: str) -> TaskFileError:
        if self.where.startswith("feature '"):  # a named feature: "feature 'age': 'min' ..."
            where = f"{self.where}: '{key}'" if key else self.where
        else:
            where = f"'{self.where}.{key}'" if key else f"'{self.where}'"
        return TaskFileError(f"{self.source}: {where} {problem}")

    def unknown(self, allowed: set[str]) -> None:
        extra = sorted(set(self.table) - allowed)
        if extra:
            raise self.error(
                extra[0], f"is not a task-file key here; allowed: {', '.join(sorted(allowed))}"
            )

    def get(self, key: str, kind: type | tuple[type, ...], *, required: bool = False) -> Any:
        if key not in self.table:
            if required:
                raise self.error(key, "is missing")
            return None
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"must be {_names(kinds)}, got a boolean")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            raise self.error(key, f"must be {_names(kinds)}, got {_kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(key, "must be a finite number")
        if isinstance(value, str) and kinds == (str,) and required and not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str)
        if value is None:
            return default
        if value not in choices:
            raise self.error(key, f"is {value!r}; choose one of {list(choices)}")
        return str(value)

    def values(self, key: str, *, required: bool = False, allow_empty: bool = False) -> tuple:
        """A list of cell values (strings or numbers), each once."""
        raw = self.get(key, list, required=required)
        if raw is None:
            return ()
        if not raw and not allow_empty:
            raise self.error(key, "must not be empty")
        out: list[Value] = []
        for i, v in enumerate(raw):
            v = self._cell_value(key, i, v)
            if v == "":
                raise self.error(f"{key}[{i}]", "must not be empty")
            if any(same_value(v, w) for w in out):
                raise self.error(key, f"lists {v!r} twice")
            out.append(v)
        return tuple(out)

    def _cell_value(self, key: str, i: int, v: Any) -> Value:
        """Item ``i`` of list ``key``: a string (stripped) or a finite number."""
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise self.error(f"{key}[{i}]", f"must be a string or a number, got {_kind(v)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise self.error(f"{key}[{i}]", "must be a finite number")
        return v.strip() if isinstance(v, str) else v

    def markers(self, key: str) -> tuple[Value, ...]:
        """Missing-value markers: strings or numbers (``""``, always a marker, is dropped)."""
        raw = self.get(key, list)
        if raw is None:
            return ()
        out: list[Value] = []
        for i, v in enumerate(raw):
            v = self._cell_value(key, i, v)
            if v != "" and not any(same_value(v, w) for w in out):
                out.append(v)
        return tuple(out)

    def strings(self, key: str) -> tuple[str, ...]:
        raw = self.get(key, list)
        if raw is None:
            return ()
        for i, v in enumerate(raw):
            if not isinstance(v, str):
                raise self.error(f"{key}[{i}]", f"must be a string, got {_kind(v)}")
        return tuple(v.strip() for v in raw)


def as_number(value: Value) -> float | None:
    """A declared value as a number: a number, or a string that reads as a finite number
    (``"0"``, ``"-9"``, ``"1.0"``); ``None`` for other text. Cells are compared with it, so
    ``"0"`` matches a cell ``0.0``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def same_value(a: Value, b: Value) -> bool:
    """Whether two declared values denote the same cell: numbers (and text that reads as a
    number) compare as numbers, other text as text."""
    x, y = as_number(a), as_number(b)
    if x is not None and y is not None:
        return x == y
    return isinstance(a, str) and isinstance(b, str) and a.strip() == b.strip()


def _kind(value: Any) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "a list", dict: "a table",
    }.get(type(value), type(value).__name__)  # fmt: skip


def _names(kinds: tuple[type, ...]) -> str:
    words = {str: "a string", float: "a number", int: "an integer", bool: "true or false",
             list: "a list", dict: "a table"}  # fmt: skip
    return " or ".join(words.get(k, k.__name__) for k in kinds)


def parse_task_file(path: Path, *, source: str | None = None) -> TaskSpec:
    """Read and validate a task file; messages name it as ``source`` (default: its path).

    Raises
    ------
    TaskFileError
        The file is missing, not UTF-8 TOML, or invalid (the message names the key).
    """
    path = Path(path)
    source = source or str(path)
    return parse_task_text(read_task_file_text(path, source=source), source=source)


def read_task_file_text(path: Path, *, source: str | None = None) -> str:
    """A task file's text (a UTF-8 byte-order mark dropped); messages name it as ``source``.

    Raises
    ------
    TaskFileError
        The file is missing, a folder, or not UTF-8 text.
    """
    path = Path(path)
    source = source or str(path)
    if path.is_dir():
        raise TaskFileError(f"{source}: is a folder; give the task file (*.toml) itself")
    if not path.is_file():
        raise TaskFileError(f"{source}: task file not found")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise TaskFileError(f"{source}: not UTF-8 text; save the task file as UTF-8") from None


def parse_task_text(text: str, *, source: str = "<task file>") -> TaskSpec:
    """Validate a task file's text (see the module docstring for the format).

    Raises
    ------
    TaskFileError
        Invalid TOML, an unknown key, a wrong type, a missing required key, empty levels,
        ``min >= max``, a column named twice, and the like: the message names the key.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TaskFileError(f"{source}: not valid TOML ({exc})") from None
    extra = sorted(set(doc) - {"task", "label", "feature", "preprocessing", "run", "subgroup"})
    if extra:
        raise TaskFileError(
            f"{source}: '{extra[0]}' is not a task-file section; "
            "use [task], [label], [[feature]], [preprocessing.NAME], [[subgroup]] and [run]"
        )
    if "task" not in doc:
        raise TaskFileError(f"{source}: the [task] section is missing")
    task = _Reader(source, "task", doc["task"])
    task.unknown(_TASK_KEYS)
    name = task.get("name", str, required=True)
    if not _NAME.match(name):
        raise task.error("name", f"{name!r} must be lower-case letters, digits and '-'")
    description = task.get("description", str, required=True)
    model = task.get("model", str)
    if model is not None and model not in MODEL_NAMES:
        raise task.error("model", f"is {model!r}; choose one of {list(MODEL_NAMES)}")
    test_fraction = task.get("test-fraction", float)
    if test_fraction is not None and not 0.05 <= test_fraction <= 0.9:
        raise task.error("test-fraction", f"= {test_fraction:g} is outside [0.05, 0.9]")
    preprocessing = task.get("preprocessing", str) or DEFAULT_PREPROCESSING
    if not _NAME.match(preprocessing):
        raise task.error("preprocessing", "must be lower-case letters, digits and '-'")
    default_missing = task.markers("missing")
    default_if_missing = task.choice("if-missing", IF_MISSING, "drop-row")
    ignore = task.strings("ignore")

    if "label" not in doc:
        raise TaskFileError(f"{source}: the [label] section is missing")
    lab = _Reader(source, "label", doc["label"])
    lab.unknown(_LABEL_KEYS)
    label = LabelSpec(
        column=lab.get("column", str, required=True).strip(),
        positive=lab.values("positive", required=True),
        negative=lab.values("negative", required=True),
        meaning=lab.get("meaning", str) or "",
    )
    both = [v for v in label.positive if any(same_value(v, w) for w in label.negative)]
    if both:
        raise lab.error("negative", f"repeats {both[0]!r}, which is also in 'label.positive'")

    raw_features = doc.get("feature")
    if not isinstance(raw_features, list) or not raw_features:
        raise TaskFileError(
            f"{source}: no [[feature]] entries; declare each input column with a [[feature]] table"
        )
    features = tuple(
        _parse_feature(_Reader(source, f"feature[{i}]", raw), default_missing, default_if_missing)
        for i, raw in enumerate(raw_features)
    )
    _check_unique_columns(source, features, label, ignore)

    variants = []
    raw_variants = doc.get("preprocessing", {})
    if not isinstance(raw_variants, dict):
        raise TaskFileError(f"{source}: 'preprocessing' must be tables [preprocessing.NAME]")
    for vname, raw in raw_variants.items():
        v = _Reader(source, f"preprocessing.{vname}", raw)
        v.unknown(_VARIANT_KEYS)
        if not _NAME.match(vname) or vname in (preprocessing, "default"):
            raise v.error(
                "", f"needs another name than '{preprocessing}' and 'default' (lower-case, '-')"
            )
        indicator = v.get("missing-indicator", bool)
        variants.append(
            Variant(
                name=vname,
                if_missing=v.choice("if-missing", IF_MISSING, default_if_missing),
                missing_indicator=True if indicator is None else indicator,
            )
        )
    run, run_dp, run_no_dp = _parse_run(source, doc.get("run", {}))
    subgroups = _parse_subgroups(
        source, doc.get("subgroup", []), {*(f.name for f in features), *ignore}
    )
    return TaskSpec(
        name=name,
        description=description,
        label=label,
        features=features,
        ignore=ignore,
        missing=default_missing,
        model=model,
        test_fraction=test_fraction,
        format=task.choice("format", FORMATS, "csv"),
        embedded=task.choice("embedded", ("", *EMBEDDED), ""),
        preprocessing=preprocessing,
        variants=tuple(variants),
        source=source,
        run=run,
        run_dp=run_dp,
        run_no_dp=run_no_dp,
        subgroups=subgroups,
    )


def _parse_subgroups(source: str, raw: Any, columns: set[str]) -> tuple[Subgroup, ...]:
    """The ``[[subgroup]]`` tables: each on a feature or ignored column, with ``levels`` (and
    optional ``labels``) or increasing ``bands``, not both."""
    if not isinstance(raw, list):
        raise TaskFileError(f"{source}: 'subgroup' must be tables [[subgroup]]")
    out: list[Subgroup] = []
    for i, table in enumerate(raw):
        r = _Reader(source, f"subgroup[{i}]", table)
        r.unknown(_SUBGROUP_KEYS)
        column = r.get("column", str, required=True).strip()
        if column not in columns:
            raise r.error("column", f"is {column!r}, not a feature or ignored column of the task")
        levels = r.values("levels")
        labels = r.strings("labels")
        raw_bands = r.get("bands", list)
        if bool(levels) == (raw_bands is not None):
            raise r.error("", "needs either 'levels' (categories) or 'bands' (cut points)")
        if labels and len(labels) != len(levels):
            raise r.error("labels", f"has {len(labels)} names for {len(levels)} levels")
        bands: tuple[float, ...] = ()
        if raw_bands is not None:
            if not raw_bands or any(
                isinstance(b, bool) or not isinstance(b, int | float) for b in raw_bands
            ):
                raise r.error("bands", "must be a non-empty list of numbers (cut points)")
            bands = tuple(float(b) for b in raw_bands)
            if any(b >= c for b, c in zip(bands[:-1], bands[1:], strict=True)):
                raise r.error("bands", "must increase")
        name = (r.get("name", str) or column).strip()
        if any(g.name == name for g in out):
            raise r.error("name", f"{name!r} names a second subgroup; give each its own name")
        out.append(
            Subgroup(name, column, levels=levels, labels=labels, bands=bands,
                     unit=(r.get("unit", str) or "").strip())
        )  # fmt: skip
    return tuple(out)


def _parse_run(source: str, raw: Any) -> tuple[dict, dict, dict]:
    """The ``[run]`` table: the consortium's recipe (run settings for both privacy settings),
    with ``[run.dp]`` and ``[run.no-dp]`` for one of them (see :mod:`shared_models.recipes`)."""
    from shared_models.recipes import check_recipe

    if not isinstance(raw, dict):
        raise TaskFileError(f"{source}: 'run' must be a table [run]")
    tables = {}
    for name in ("dp", "no-dp"):
        sub = raw.get(name, {})
        if not isinstance(sub, dict):
            raise TaskFileError(f"{source}: 'run.{name}' must be a table [run.{name}]")
        tables[name] = sub
    common = {k: v for k, v in raw.items() if k not in tables}
    try:
        return (
            check_recipe(f"{source} [run]", common),
            check_recipe(f"{source} [run.dp]", tables["dp"]),
            check_recipe(f"{source} [run.no-dp]", tables["no-dp"]),
        )
    except ValueError as exc:
        raise TaskFileError(str(exc)) from None


def _parse_feature(r: _Reader, default_missing: tuple[Value, ...], default_if: str) -> FeatureSpec:
    name = r.get("name", str, required=True).strip()
    r.where = f"feature '{name}'"  # from here on, errors name the feature
    r.unknown(_FEATURE_KEYS)
    kind = r.choice("type", FEATURE_TYPES, "")
    if not kind:
        raise r.error("type", f"is missing; choose one of {list(FEATURE_TYPES)}")
    for key, kinds in _ONLY_FOR.items():
        if key in r.table and kind not in kinds:
            raise r.error(key, f"applies to {' and '.join(kinds)} features, not {kind}")
    lo, hi = r.get("min", float), r.get("max", float)
    center, scale = r.get("center", float), r.get("scale", float)
    levels: tuple[Value, ...] = ()
    if kind == "numeric":
        for key, value in (("min", lo), ("max", hi)):
            if value is None:
                raise r.error(
                    key, "is missing: give the valid range from the data dictionary (min, max)"
                )
        if lo >= hi:
            raise r.error("min", f"= {lo:g} must be below 'max' = {hi:g}")
        if (center is None) != (scale is None):
            raise r.error("center" if center is None else "scale", "is needed with the other")
        if scale is not None and scale <= 0:
            raise r.error("scale", f"= {scale:g} must be positive")
    elif kind == "binary":
        levels = r.values("levels") or (0, 1)
        if len(levels) != 2:
            raise r.error("levels", "of a binary feature must be [value coded 0, value coded 1]")
    else:
        if "levels" not in r.table:
            raise r.error("levels", "is missing: list the categories")
        levels = r.values("levels", required=True)
        if len(levels) < 2:
            raise r.error("levels", "needs at least two categories")
    if_missing = r.choice("if-missing", IF_MISSING, default_if)
    indicator = r.get("missing-indicator", bool)
    if indicator is not None and if_missing != "impute":
        raise r.error("missing-indicator", 'applies only with if-missing = "impute"')
    missing = r.markers("missing") if "missing" in r.table else default_missing
    clash = [m for m in missing if any(same_value(m, v) for v in levels)]
    if clash:
        raise r.error("missing", f"marker {clash[0]!r} is also one of the levels")
    return FeatureSpec(
        name=name,
        type=kind,
        unit=r.get("unit", str) or "",
        description=r.get("description", str) or "",
        min=lo,
        max=hi,
        center=center,
        scale=scale,
        levels=levels,
        drop_first=bool(r.get("drop-first", bool)),
        missing=missing,
        if_missing=if_missing,
        missing_indicator=True if indicator is None else indicator,
    )


def _check_unique_columns(
    source: str, features: tuple[FeatureSpec, ...], label: LabelSpec, ignore: tuple[str, ...]
) -> None:
    seen: dict[str, str] = {}
    named = [
        *[(f.name, f"feature[{i}]") for i, f in enumerate(features)],
        (label.column, "label.column"),
        *[(c, f"task.ignore[{i}]") for i, c in enumerate(ignore)],
    ]
    for column, key in named:
        if not column:
            raise TaskFileError(f"{source}: '{key}' is an empty column name")
        if column in seen:
            raise TaskFileError(
                f"{source}: '{key}' names column '{column}' a second time (first at "
                f"'{seen[column]}'); each column is declared once"
            )
        seen[column] = key
