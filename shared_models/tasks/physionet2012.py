"""Reading the PhysioNet/CinC Challenge 2012 upstream format, with a per-source parse cache.

Format (Silva et al., "Predicting in-hospital mortality of ICU patients: the PhysioNet/Computing
in Cardiology Challenge 2012", CinC 2012; physionet.org/content/challenge-2012/1.0.0):

- one ``<RecordID>.txt`` per ICU stay: the header ``Time,Parameter,Value``, then one observation
  per line; ``Time`` is ``hh:mm`` since ICU admission (first 48 hours). The general descriptors
  ``RecordID, Age, Gender, Height, ICUType, Weight`` come at ``00:00``; ``-1`` means unknown.
  ``Weight`` is also a time series; the other 36 parameters (:data:`TIME_SERIES`) only are.
- an outcomes file (``Outcomes-a.txt``): CSV with a header holding at least ``RecordID`` and
  ``In-hospital_death`` (0 survivor, 1 died in hospital).

A *source* is what a hospital points fedcare at: a folder with the outcomes file(s)
``Outcomes*.txt`` and the record files (in the folder or one sub-folder down, as the upstream
archive unpacks: ``set-a/`` next to ``Outcomes-a.txt``), or the upstream ``.tar.gz`` archive
itself (read with :mod:`tarfile`, nothing extracted). Errors name the file (relative to the
source) and line, never a value from the record, and never the local path of the source.

Parsing 4000 stays takes a few seconds; :func:`read_source` keeps the result in a cache file
per source (:func:`cache_dir`), keyed by the source files' names, sizes and modification times
(folders) or the archive's SHA-256, so later runs load it in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import examples, warn_data
from .base import DataError

# The 37 time-series parameters of the challenge (36 + Weight), in the order of the channels.
TIME_SERIES = (
    "ALP", "ALT", "AST", "Albumin", "BUN", "Bilirubin", "Cholesterol", "Creatinine", "DiasABP",
    "FiO2", "GCS", "Glucose", "HCO3", "HCT", "HR", "K", "Lactate", "MAP", "MechVent", "Mg",
    "NIDiasABP", "NIMAP", "NISysABP", "Na", "PaCO2", "PaO2", "Platelets", "RespRate", "SaO2",
    "SysABP", "Temp", "TroponinI", "TroponinT", "Urine", "WBC", "Weight", "pH",
)  # fmt: skip
DESCRIPTORS = ("Age", "Gender", "Height", "ICUType", "Weight")  # plus RecordID
LABEL_COLUMN = "In-hospital_death"
HEADER = "Time,Parameter,Value"
WINDOW_MINUTES = 48 * 60  # observations after 48:00 are not used
PARSER_VERSION = 2  # bump when the parse result changes: old cache files are then ignored

_VAR_INDEX = {name: i for i, name in enumerate(TIME_SERIES)}
_DESC_INDEX = {name: i for i, name in enumerate(DESCRIPTORS)}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")  # shown in errors; anything else may be a value


@dataclass(frozen=True)
class Stays:
    """Parsed ICU stays of one source (raw units; nothing normalised yet).

    Attributes
    ----------
    record_id : np.ndarray
        ``[N] int64``.
    descriptors : np.ndarray
        ``[N, 5] float32``: Age (years), Gender (0 female, 1 male), Height (cm), ICUType (1-4),
        Weight (kg) at admission; NaN = unknown (``-1`` upstream).
    label : np.ndarray
        ``[N] float32``: in-hospital death (1) or survival (0).
    offsets : np.ndarray
        ``[N + 1] int64``: the observations of stay ``i`` are ``offsets[i]:offsets[i + 1]``.
    minute : np.ndarray
        ``[E] int16``: minutes since ICU admission (0..2880).
    variable : np.ndarray
        ``[E] int8``: index into :data:`TIME_SERIES`.
    value : np.ndarray
        ``[E] float32``: the observed value in the challenge's units.
    without_record : np.ndarray
        ``[K] int64``: RecordIDs of outcomes rows that have no record file (not used).
    """

    record_id: np.ndarray
    descriptors: np.ndarray
    label: np.ndarray
    offsets: np.ndarray
    minute: np.ndarray
    variable: np.ndarray
    value: np.ndarray
    without_record: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.record_id.shape[0])

    def observations(self, i: int) -> np.ndarray:
        """Stay ``i``'s observations as ``[n_i, 3] float32`` rows (minute, variable, value)."""
        sl = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return np.stack(
            [self.minute[sl].astype(np.float32), self.variable[sl].astype(np.float32),
             self.value[sl]], axis=1,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# sources: a folder or the upstream archive
# ----------------------------------------------------------------------------------------------
def _is_outcomes(name: str) -> bool:
    return Path(name).name.startswith("Outcomes") and name.endswith(".txt")


def _is_record(name: str) -> bool:
    base = Path(name).name
    return base.endswith(".txt") and not base.startswith(("Outcomes", "."))


@dataclass(frozen=True)
class _Source:
    """Where one hospital's stays live; ``files`` are (name shown in errors, how to read)."""

    root: Path
    archive: bool
    outcomes: tuple[str, ...]
    records: tuple[str, ...]

    def read_bytes(self) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of every outcomes file, then every record file, in name order."""
        wanted = [*self.outcomes, *self.records]
        if not self.archive:
            for name in wanted:
                yield name, (self.root / name).read_bytes()
            return
        found: dict[str, bytes] = {}
        with tarfile.open(self.root) as tar:
            for member in tar:
                if member.isfile() and (_is_outcomes(member.name) or _is_record(member.name)):
                    fh = tar.extractfile(member)
                    if fh is not None:
                        found[member.name] = fh.read()
        for name in wanted:
            yield name, found[name]

    def fingerprint(self) -> str:
        """Cache key: SHA-256 of the archive, or of the folder's file names, sizes, mtimes."""
        digest = hashlib.sha256(f"physionet2012 parser {PARSER_VERSION}\n".encode())
        if self.archive:
            with open(self.root, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        else:
            for name in (*self.outcomes, *self.records):
                st = (self.root / name).stat()
                digest.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:32]


def locate_source(path: Path) -> _Source:
    """Find the outcomes and record files of a folder or ``.tar.gz`` archive.

    A folder holds ``Outcomes*.txt`` and record files ``*.txt`` (directly or one sub-folder
    down), or else exactly one ``*.tar.gz`` archive of that layout.

    Raises
    ------
    DataError
        Nothing found, several archives, no outcomes file or no record file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path.name or path}: not found; give the folder of <RecordID>.txt "
                        "files and their outcomes file, or the upstream set-*.tar.gz archive")  # fmt: skip
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise DataError(
                f"{path.name}: not a tar archive; task icu-mortality reads a folder of "
                "<RecordID>.txt files with their Outcomes*.txt, or the upstream set-*.tar.gz"
            )
        with tarfile.open(path) as tar:
            names = sorted(m.name for m in tar if m.isfile())
        return _checked(path, True, names, shown=path.name)
    names = sorted(
        str(p.relative_to(path))
        for p in [*path.glob("*.txt"), *path.glob("*/*.txt")]
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not any(_is_outcomes(n) for n in names):
        archives = sorted(path.glob("*.tar.gz")) + sorted(path.glob("*.tgz"))
        if len(archives) == 1:
            return locate_source(archives[0])
        if len(archives) > 1:
            raise DataError(
                f"{path.name}: holds {len(archives)} archives "
                f"({', '.join(a.name for a in archives)}); point at one of them"
            )
    return _checked(path, False, names, shown=path.name or str(path))


def _checked(root: Path, archive: bool, names: list[str], *, shown: str) -> _Source:
    outcomes = tuple(n for n in names if _is_outcomes(n))
    records = tuple(n for n in names if _is_record(n))
    if not outcomes:
        raise DataError(
            f"{shown}: no outcomes file (Outcomes*.txt with the columns RecordID and "
            f"{LABEL_COLUMN}) found; put it next to the record files"
        )
    if not records:
        raise DataError(f"{shown}: no record files (<RecordID>.txt) found next to {outcomes[0]}")
    return _Source(root=root, archive=archive, outcomes=outcomes, records=records)


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
def read_outcomes(name: str, data: bytes) -> dict[int, tuple[float, int]]:
    """``{RecordID: (label, line)}`` of one outcomes file.

    Raises
    ------
    DataError
        Not a CSV, no ``RecordID`` / ``In-hospital_death`` column, a RecordID that is not an
        integer or appears twice, a label other than 0/1 (naming the file and line).
    """
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=str, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        raise DataError(f"{name}: not a readable CSV outcomes file (header "
                        f"RecordID,...,{LABEL_COLUMN})") from None  # fmt: skip
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in ("RecordID", LABEL_COLUMN) if c not in frame.columns]
    if missing:
        raise DataError(
            f"{name}: no column {' or '.join(repr(c) for c in missing)} in the header "
            f"({', '.join(frame.columns)}); the outcomes file needs RecordID and {LABEL_COLUMN}"
        )
    out: dict[int, tuple[float, int]] = {}
    for row, (rid, label) in enumerate(zip(frame["RecordID"], frame[LABEL_COLUMN], strict=True)):
        line = row + 2
        rid_text = str(rid).strip()
        if not rid_text.isdigit():
            raise DataError(f"{name}, line {line}: RecordID is not a whole number")
        if str(label).strip() not in ("0", "1"):
            raise DataError(f"{name}, line {line}: {LABEL_COLUMN} must be 0 or 1")
        key = int(rid_text)
        if key in out:
            raise DataError(f"{name}, line {line}: RecordID {key} appears twice (also line "
                            f"{out[key][1]})")  # fmt: skip
        out[key] = (float(str(label).strip()), line)
    return out


def parse_record(
    name: str, data: bytes
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse one ``<RecordID>.txt`` record.

    Returns
    -------
    (record_id, descriptors [5] float32 (NaN unknown), minute [n] int16, variable [n] int8,
    value [n] float32); observations after 48:00 are dropped.

    Raises
    ------
    DataError
        Naming the file and line: empty record, wrong header, not three fields, a time that is
        not ``hh:mm``, an unknown parameter, a value that is not a number, a descriptor after
        00:00, no RecordID. The message never contains a value of the record.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{name}: not a text file; expected the PhysioNet 2012 record format "
                        f"({HEADER})") from None  # fmt: skip
    lines = text.splitlines()
    if not lines or not any(line.strip() for line in lines[1:]):
        raise DataError(f"{name}: the record is empty (no observation after the header "
                        f"{HEADER!r}); remove the file or export the stay again")  # fmt: skip
    if lines[0].strip().replace(" ", "") != HEADER:
        raise DataError(f"{name}, line 1: expected the header {HEADER!r}")
    record_id: int | None = None
    desc = np.full(len(DESCRIPTORS), np.nan, dtype=np.float32)
    seen_desc = [False] * len(DESCRIPTORS)
    minutes: list[int] = []
    variables: list[int] = []
    values: list[float] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != 3:
            raise DataError(f"{name}, line {lineno}: expected 3 comma-separated fields "
                            f"({HEADER}), found {len(fields)}")  # fmt: skip
        time, param, raw = (f.strip() for f in fields)
        hours, colon, mins = time.partition(":")
        if not (colon and hours.isdigit() and mins.isdigit() and len(mins) == 2 and int(mins) < 60):
            raise DataError(f"{name}, line {lineno}: the time is not hh:mm (hours and minutes "
                            "since ICU admission, e.g. 07:05)")  # fmt: skip
        minute = int(hours) * 60 + int(mins)
        d = _DESC_INDEX.get(param)
        v = _VAR_INDEX.get(param)
        if v is None and d is None and param != "RecordID":
            shown = repr(param) if _NAME.fullmatch(param) else "(not a parameter name)"
            raise DataError(
                f"{name}, line {lineno}: unknown parameter {shown}; the PhysioNet 2012 "
                f"parameters are RecordID, {', '.join(DESCRIPTORS)} and "
                f"{', '.join(TIME_SERIES)}"
            )
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value):
            raise DataError(f"{name}, line {lineno}: the value of {param} is not a number")
        if param == "RecordID":
            if minute != 0 or record_id is not None or not value.is_integer() or value < 0:
                raise DataError(f"{name}, line {lineno}: RecordID must be given once, at 00:00, "
                                "as a whole number")  # fmt: skip
            record_id = int(value)
            continue
        if d is not None and minute == 0 and not seen_desc[d]:
            seen_desc[d] = True
            desc[d] = np.nan if value == -1 else value
            continue
        if v is None:
            raise DataError(f"{name}, line {lineno}: the general descriptor {param} must come "
                            "once, at 00:00")  # fmt: skip
        if minute > WINDOW_MINUTES:
            continue
        minutes.append(minute)
        variables.append(v)
        values.append(value)
    if record_id is None:
        raise DataError(f"{name}: no RecordID line (00:00,RecordID,<id>) in the record")
    return (
        record_id,
        desc,
        np.asarray(minutes, dtype=np.int16),
        np.asarray(variables, dtype=np.int8),
        np.asarray(values, dtype=np.float32),
    )


def _parse_source(source: _Source) -> Stays:
    """Parse every file of ``source`` (outcomes first) into :class:`Stays`, in RecordID order."""
    labels: dict[int, tuple[float, int]] = {}
    outcome_names: dict[int, str] = {}
    parsed = []
    record_file: dict[int, str] = {}
    for name, data in source.read_bytes():
        if name in source.outcomes:
            for rid, entry in read_outcomes(name, data).items():
                if rid in labels:
                    raise DataError(f"{name}, line {entry[1]}: RecordID {rid} also appears in "
                                    f"{outcome_names[rid]}")  # fmt: skip
                labels[rid] = entry
                outcome_names[rid] = name
            continue
        rid, desc, minute, var, value = parse_record(name, data)
        if rid in record_file:
            raise DataError(f"{name}: RecordID {rid} is also the record in {record_file[rid]}")
        if rid not in labels:
            raise DataError(
                f"{name}: RecordID {rid} has no row in the outcomes file "
                f"({', '.join(source.outcomes)}); add its {LABEL_COLUMN} or remove the record"
            )
        record_file[rid] = name
        parsed.append((rid, desc, minute, var, value))
    parsed.sort(key=lambda p: p[0])
    lengths = np.array([len(p[2]) for p in parsed], dtype=np.int64)
    return Stays(
        record_id=np.array([p[0] for p in parsed], dtype=np.int64),
        descriptors=np.stack([p[1] for p in parsed]).astype(np.float32),
        label=np.array([labels[p[0]][0] for p in parsed], dtype=np.float32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        minute=np.concatenate([p[2] for p in parsed]).astype(np.int16),
        variable=np.concatenate([p[3] for p in parsed]).astype(np.int8),
        value=np.concatenate([p[4] for p in parsed]).astype(np.float32),
        without_record=np.array(sorted(set(labels) - set(record_file)), dtype=np.int64),
    )


# ----------------------------------------------------------------------------------------------
# cache
# ----------------------------------------------------------------------------------------------
def cache_dir() -> Path | None:
    """Folder for parsed sources: ``$FEDCARE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedcare``,
    else ``~/.cache/fedcare``; ``FEDCARE_CACHE_DIR=none`` turns the cache off.

    The cache holds parsed patient data: it is created with mode 0700 and belongs in the
    hospital's own storage, like the data themselves.
    """
    configured = os.environ.get("FEDCARE_CACHE_DIR", "")
    if configured.lower() in ("none", "off", "0"):
        return None
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedcare"


_FIELDS = (
    "record_id", "descriptors", "label", "offsets", "minute", "variable", "value", "without_record",
)  # fmt: skip


def _load_cached(path: Path) -> Stays | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return Stays(**{k: npz[k] for k in _FIELDS})
    except (OSError, KeyError, ValueError, EOFError):  # missing, partial or foreign: parse again
        return None


def _store_cached(path: Path, stays: Stays) -> None:
    """Write atomically (temporary file + rename); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez_compressed(fh, **{k: getattr(stays, k) for k in _FIELDS})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass


def read_source(path: Path) -> Stays:
    """All ICU stays of a folder or archive (see the module docstring), parsed once and cached.

    Raises
    ------
    DataError
        Any problem with the files, naming the file (relative to the source) and line.
    """
    source = locate_source(Path(path))
    folder = cache_dir()
    cached = folder / "physionet2012" / f"{source.fingerprint()}.npz" if folder else None
    stays = _load_cached(cached) if cached is not None else None
    if stays is None:
        stays = _parse_source(source)
        if cached is not None:
            _store_cached(cached, stays)
    if len(stays.without_record):
        shown = Path(path).name or str(path)
        warn_data(
            f"{shown}: {len(stays.without_record)} row(s) of {', '.join(source.outcomes)} have no "
            f"record file (RecordID {examples([str(r) for r in stays.without_record])}); those "
            f"stays are not used ({len(stays)} are)"
        )
    return stays


def write_records(
    folder: Path,
    records: Iterable[tuple[int, np.ndarray, np.ndarray, float]],
) -> None:
    """Write stays in the upstream format: ``folder/<RecordID>.txt`` and ``folder/Outcomes.txt``
    (RecordID, In-hospital_death). ``folder`` must not exist yet.

    Parameters
    ----------
    records : iterable of (record_id, descriptors [5] (NaN unknown), observations [n, 3]
        (minute, variable index, value), label)
    """
    folder.mkdir(parents=True)
    rows = []
    for rid, descriptors, observations, label in records:
        lines = [HEADER, f"00:00,RecordID,{rid}"]
        for name, value in zip(DESCRIPTORS, descriptors, strict=True):
            lines.append(f"00:00,{name},{-1 if np.isnan(value) else f'{value:g}'}")
        for minute, var, value in observations:
            m = int(minute)
            lines.append(f"{m // 60:02d}:{m % 60:02d},{TIME_SERIES[int(var)]},{value:g}")
        (folder / f"{rid}.txt").write_text("\n".join(lines) + "\n")
        rows.append((rid, int(label)))
    pd.DataFrame(rows, columns=["RecordID", LABEL_COLUMN]).to_csv(
        folder / "Outcomes.txt", index=False
    )
