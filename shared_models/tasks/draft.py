"""Drafting a task file from one hospital's table (``fedcare task draft``).

The draft names every column, infers its type (numeric, binary, categorical with its levels;
identifiers and free text go to ``ignore``), the missing-value markers it sees and the label's
values. The valid ranges are left for the consortium to fill from its data dictionary: a draft
without them fails ``fedcare task check``. With ``fill_ranges`` they are taken from the table,
which reveals this hospital's smallest and largest values -- the caller must say so.
"""

from __future__ import annotations

import json
import re

import pandas as pd

from .taskfile import MODEL_NAMES, Value

MAX_LEVELS = 20  # more distinct texts than this: an identifier or free text, not a category
MARKERS = ("NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "?", "-", ".")
_POSITIVE_WORDS = {"1", "yes", "y", "true", "positive", "pos", "m", "malignant", "dead", "died"}


def _toml(value: Value) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _values(cells: pd.Series) -> list[Value]:
    """Distinct non-missing cells, sorted; numbers as numbers when every cell is one."""
    numbers = pd.to_numeric(cells, errors="coerce")
    if numbers.notna().all():
        return [int(v) if float(v).is_integer() else float(v) for v in sorted(numbers.unique())]
    return sorted(cells.unique().tolist())


def task_name_from(text: str) -> str:
    """A valid task name from a file name (lower case, ``-`` for other characters)."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63]
    return name or "my-task"


def draft_task_file(
    frame: pd.DataFrame, *, label: str, name: str, source: str, fill_ranges: bool = False
) -> str:
    """The text of a task file for ``frame`` (text cells as :func:`~.table.read_csv_table`
    returns them).

    Parameters
    ----------
    frame : pd.DataFrame
        One hospital's table.
    label : str
        The label column.
    name : str
        Task name.
    source : str
        File name, for the header comment.
    fill_ranges : bool
        Fill ``min``/``max`` with the table's own extremes (they reveal this hospital's values).

    Raises
    ------
    ValueError
        ``label`` is not a column of ``frame``, or the table has no rows.
    """
    if label not in frame.columns:
        raise ValueError(f"--label {label!r} is not a column of {source}: {list(frame.columns)}")
    if frame.empty:
        raise ValueError(f"{source}: no data rows to draft from")
    text = frame.astype(str).apply(lambda c: c.str.strip())
    markers = [m for m in MARKERS if (text == m).any().any()]
    missing = text.eq("") | text.isin(markers)
    lines = [
        f"# Drafted by `fedcare task draft` from {source}. Review every entry against the",
        "# consortium's data dictionary: fill in each numeric feature's valid range (min, max),",
        "# units and descriptions; check types, levels and the label's values. Then run",
        "# `fedcare task check FILE` and put the file in the app's tasks/ folder as NAME.toml.",
        "",
        "[task]",
        f"name = {_toml(name)}",
        'description = "TODO: what the task predicts, for whom"',
        f"# model = {_toml(MODEL_NAMES[0])}  # or {_toml(MODEL_NAMES[1])}",
        "# test-fraction = 0.3",
    ]
    if markers:
        lines.append(f"missing = [{', '.join(_toml(m) for m in markers)}]  # besides empty cells")
    lines.append('if-missing = "drop-row"  # default for every feature: drop-row | impute')
    features: list[list[str]] = []
    ignored: list[tuple[str, str]] = []
    for col in frame.columns:
        if col == label:
            continue
        cells = text[col][~missing[col]]
        if cells.empty:
            ignored.append((col, "every cell is missing"))
            continue
        values = _values(cells)
        numeric = all(not isinstance(v, str) for v in values)
        entry = ["", "[[feature]]", f"name = {_toml(col)}"]
        if numeric and set(values) <= {0, 1}:
            entry += ['type = "binary"', "levels = [0, 1]  # [value coded 0, value coded 1]"]
        elif numeric:
            entry += ['type = "numeric"', '# unit = ""']
            if fill_ranges:
                entry += [
                    f"min = {_toml(values[0])}  # this hospital's smallest value: replace with the "
                    "data dictionary's",
                    f"max = {_toml(values[-1])}  # this hospital's largest value: replace likewise",
                ]
            else:
                entry += [
                    "# min =   # TODO: the valid range from the data dictionary (also the "
                    "fixed scaling)",
                    "# max =",
                ]
        elif len(values) == 2:
            entry += [
                'type = "binary"',
                f"levels = [{', '.join(_toml(v) for v in values)}]  # [coded 0, coded 1]",
            ]
        elif len(values) <= MAX_LEVELS:
            entry += [
                'type = "categorical"',
                f"levels = [{', '.join(_toml(v) for v in values)}]",
            ]
        else:
            ignored.append((col, f"{len(values)} distinct texts: an identifier or free text?"))
            continue
        if missing[col].any():
            entry.append('if-missing = "impute"  # the fixed centre + a missing-indicator column')
        features.append(entry)
    if ignored:
        lines.append("ignore = [")
        lines += [f"    {_toml(col)},  # {why}" for col, why in ignored]
        lines.append("]")
    values = _values(text[label][~missing[label]])
    if all(not isinstance(v, str) for v in values):  # numbers: the smallest means negative
        negative, positive = values[:1], values[1:]
    else:
        positive = [v for v in values if str(v).lower() in _POSITIVE_WORDS][:1] or values[-1:]
        negative = [v for v in values if v not in positive]
    lines += [
        "",
        "[label]",
        f"column = {_toml(label)}",
        f"positive = [{', '.join(_toml(v) for v in positive)}]  # TODO: check",
        f"negative = [{', '.join(_toml(v) for v in negative)}]",
        '# meaning = "what a positive label means"',
    ]
    for entry in features:
        lines += entry
    return "\n".join(lines) + "\n"
