"""Task files (#13): the format's strict validation, CSV dialects, the per-column check, bad
input (one clear error naming file, column and row count, never a value), drafting, the
built-in tasks re-expressed as task files (identical preprocessing), approval of task files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.approval import ApprovalError, ApprovedBundles, fab_bytes, inspect_fab
from shared_models.hospitals import hospital_from_frame, simulated_hospitals
from shared_models.tasks import TASKS, TASKS_DIR, DataError, TaskFileError, get_task
from shared_models.tasks.base import split_key_from_seed
from shared_models.tasks.draft import draft_task_file
from shared_models.tasks.table import read_csv_table
from shared_models.tasks.tabular import (
    EMBEDDED_DATA,
    HEART_COLUMNS,
    TABLE_FORMATS,
    breast_cancer_frame,
    task_from_file,
)
from shared_models.tasks.taskfile import EMBEDDED, FORMATS, MODEL_NAMES, parse_task_text
from tests import gbsg2
from tests.handlers import run_fedcare_main, unpack_app

KEY = split_key_from_seed(3)


def _fedcare(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    code, out = run_fedcare_main(monkeypatch, capsys, *args)
    return code, " ".join(out.split())


# ----------------------------------------------------------------------------------------------
# the built-in tabular tasks as task files: the same arrays as the Python code they replace
# ----------------------------------------------------------------------------------------------
# The Python implementation these task files replace (fedcare 34a953d, shared_models/tasks/
# tabular.py), kept here as the reference: FLamby's Fed-Heart-Disease features and fixed units,
# and WDBC's published ranges.
_HEART_CENTER = (50.0, 0.0, 130.0, 200.0, 0.0, 140.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
_HEART_SCALE = (10.0, 1.0, 20.0, 100.0, 1.0, 25.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
_WDBC_RANGES = (
    (6.981, 28.11), (9.71, 39.28), (43.79, 188.5), (143.5, 2501.0), (0.053, 0.163),
    (0.019, 0.345), (0.0, 0.427), (0.0, 0.201), (0.106, 0.304), (0.05, 0.097),
    (0.112, 2.873), (0.36, 4.885), (0.757, 21.98), (6.802, 542.2), (0.002, 0.031),
    (0.002, 0.135), (0.0, 0.396), (0.0, 0.053), (0.008, 0.079), (0.001, 0.03),
    (7.93, 36.04), (12.02, 49.54), (50.41, 251.2), (185.2, 4254.0), (0.071, 0.223),
    (0.027, 1.058), (0.0, 1.252), (0.0, 0.291), (0.156, 0.664), (0.055, 0.208),
)  # fmt: skip


def _flamby_reference(path: Path, *, drop_incomplete: bool) -> tuple[np.ndarray, np.ndarray]:
    """FLamby's Fed-Heart-Disease features of one upstream file, written with pandas."""
    frame = pd.read_csv(path, header=None, names=HEART_COLUMNS, na_values="?")
    frame = frame.drop(columns=["slope", "ca", "thal"])
    numeric = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak"]
    cols = [frame[c].to_numpy(float) for c in numeric]
    for col, levels in {"cp": (2.0, 3.0, 4.0), "restecg": (1.0, 2.0)}.items():
        for level in levels:  # one-hot, first level dropped; missing stays missing
            cols.append(np.where(frame[col].isna(), np.nan, (frame[col] == level).astype(float)))
    x = np.stack(cols, axis=1).astype(np.float32)
    y = (frame["num"] > 0).to_numpy(np.float32)
    if drop_incomplete:
        keep = ~np.isnan(x).any(axis=1)
        x, y = x[keep], y[keep]
    return x, y


@pytest.mark.parametrize("preprocessing", ["flamby", "impute"])
def test_heart_disease_task_file_gives_flamby_arrays(heart_dir, preprocessing):
    task = get_task("heart-disease")
    scaling = task.scaling(preprocessing)
    assert scaling == (_HEART_CENTER, _HEART_SCALE)
    for hospital in ("cleveland", "hungarian", "switzerland", "va"):
        path = heart_dir / f"processed.{hospital}.data"
        frame = task.read_file(path)
        x, y = task.features(frame, preprocessing)
        ref_x, ref_y = _flamby_reference(path, drop_incomplete=preprocessing == "flamby")
        np.testing.assert_array_equal(x, ref_x)
        np.testing.assert_array_equal(y, ref_y)
        # the whole hospital (split, imputation, fixed scaling) as the Python task made it
        from shared_models.tasks import prepare_hospital

        ours = hospital_from_frame(
            task, hospital, frame, preprocessing=preprocessing, test_fraction=0, split_key=KEY
        )
        ref = prepare_hospital(hospital, ref_x, ref_y, test_fraction=0.34, split_key=KEY,
                           reference_scaling=(_HEART_CENTER, _HEART_SCALE))  # fmt: skip
        for a, b in zip(
            (ours.x_train, ours.y_train, ours.x_test, ours.y_test),
            (ref.x_train, ref.y_train, ref.x_test, ref.y_test),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)


def test_breast_cancer_task_file_gives_the_published_range_scaling():
    from sklearn.datasets import load_breast_cancer

    from shared_models.tasks import prepare_hospital

    task = get_task("breast-cancer")
    center = np.asarray([(lo + hi) / 2 for lo, hi in _WDBC_RANGES], dtype=np.float32)
    scale = np.asarray([(hi - lo) / 2 for lo, hi in _WDBC_RANGES], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(task.reference_scaling[0], np.float32), center)
    np.testing.assert_array_equal(np.asarray(task.reference_scaling[1], np.float32), scale)
    data = load_breast_cancer()
    ref_x, ref_y = data.data.astype(np.float32), (data.target == 0).astype(np.float32)
    hospitals = simulated_hospitals("breast-cancer", data_dir="", num_hospitals=3, scheme="iid", alpha=0.5,
                            seed=0, preprocessing="default", test_fraction=0.0)  # fmt: skip
    [(_, frame)] = task.load_hospitals("")
    x, y = task.features(frame, "wdbc-ranges")
    np.testing.assert_array_equal(x, ref_x)
    np.testing.assert_array_equal(y, ref_y)
    assert sum(s.n_train + s.n_test for s in hospitals) == 569
    ref = prepare_hospital("a", ref_x, ref_y, test_fraction=0.3, split_key=KEY,
                       reference_scaling=(tuple(center), tuple(scale)))  # fmt: skip
    ours = prepare_hospital("a", x, y, test_fraction=0.3, split_key=KEY,
                        reference_scaling=task.reference_scaling)  # fmt: skip
    np.testing.assert_array_equal(ours.x_train, ref.x_train)


def test_built_in_task_files_live_in_the_app_and_use_tabular_models():
    from shared_models.models import MODELS

    assert sorted(p.name for p in TASKS_DIR.glob("*.toml")) == [
        "breast-cancer.toml", "heart-disease.toml",
    ]  # fmt: skip
    assert set(MODEL_NAMES) <= set(MODELS)
    assert tuple(TABLE_FORMATS) == FORMATS and tuple(EMBEDDED_DATA) == EMBEDDED
    assert get_task("breast-cancer").input_shape("wdbc-ranges") == (30,)
    assert get_task("heart-disease").preprocessings == ("flamby", "impute")


# ----------------------------------------------------------------------------------------------
# strict validation of the task file
# ----------------------------------------------------------------------------------------------
BASE = """\
[task]
name = "readmission"
description = "30-day readmission"
missing = ["NA"]

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

[[feature]]
name = "admission"
type = "categorical"
levels = ["elective", "emergency"]
"""


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('description = "30-day readmission"', 'description = "x"\ncolour = "red"',
         "'task.colour' is not a task-file key here"),
        ('unit = "years"', 'unit = "years"\nrange = [1, 2]', "feature 'age': 'range' is not a task-file key here"),
        ("min = 18", 'min = "eighteen"', "feature 'age': 'min' must be a number, got a string"),
        ('levels = ["elective", "emergency"]', "levels = []", "feature 'admission': 'levels' must not be empty"),
        ("min = 18", "min = 110", "feature 'age': 'min' = 110 must be below 'max' = 110"),
        ('name = "admission"', 'name = "age"', "'feature[1]' names column 'age' a second time (first at 'feature[0]')"),
        ('name = "admission"', 'name = "readmitted"', "'label.column' names column 'readmitted' a second time"),
        ('missing = ["NA"]', 'missing = ["NA"]\nignore = ["id", "id"]', "'task.ignore[1]' names column 'id' a second time"),
        ("min = 18\n", "", "feature 'age': 'min' is missing: give the valid range from the data dictionary"),
        ('negative = ["no"]', 'negative = ["yes"]', "'label.negative' repeats 'yes'"),
        ('type = "numeric"', 'type = "number"', "feature 'age': 'type' is 'number'; choose one of"),
        ('name = "readmission"', 'name = "Readmission 30"', "'task.name' 'Readmission 30' must be lower-case"),
        ("[label]", "[labels]", "'labels' is not a task-file section"),
        ("max = 110", "max = 110\ncenter = 60", "feature 'age': 'scale' is needed with the other"),
        ('levels = ["elective", "emergency"]', 'levels = ["elective"]', "needs at least two categories"),
        ('levels = ["elective", "emergency"]', 'levels = ["elective", "emergency"]\nif-missing = "ignore"',
         "'if-missing' is 'ignore'; choose one of ['drop-row', 'impute']"),
        ('positive = ["yes"]', "positive = [true]", "'label.positive[0]' must be a string or a number"),
        ("[task]", "[task", "not valid TOML"),
    ],
)  # fmt: skip
def test_invalid_task_file_is_one_error_naming_file_and_key(tmp_path, old, new, message):
    assert old in BASE
    path = tmp_path / "readmission.toml"
    path.write_text(BASE.replace(old, new, 1))
    with pytest.raises(TaskFileError) as exc:
        task_from_file(path)
    assert str(exc.value).startswith(f"{path}:")
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("subgroup", "message"),
    [
        ('column = "ward"\nlevels = [1, 2]', "'subgroup[0].column' is 'ward', not a feature or ignored column"),
        ('column = "age"', "'subgroup[0]' needs either 'levels' (categories) or 'bands'"),
        ('column = "age"\nbands = [65, 50]', "'subgroup[0].bands' must increase"),
        ('column = "age"\nbands = ["old"]', "'subgroup[0].bands' must be a non-empty list of numbers"),
        ('column = "admission"\nlevels = ["elective"]\nlabels = ["a", "b"]',
         "'subgroup[0].labels' has 2 names for 1 levels"),
        ('column = "age"\nbands = [65]\nsize = 3', "'subgroup[0].size' is not a task-file key here"),
    ],
)  # fmt: skip
def test_invalid_subgroup_is_one_error_naming_the_key(tmp_path, subgroup, message):
    path = tmp_path / "readmission.toml"
    path.write_text(f"{BASE}\n[[subgroup]]\n{subgroup}\n")
    with pytest.raises(TaskFileError) as exc:
        task_from_file(path)
    assert str(exc.value).startswith(f"{path}:") and message in str(exc.value)


def test_declared_subgroups_split_the_rows():
    text = (
        f'{BASE}\n[[subgroup]]\ncolumn = "age"\nbands = [50, 65]\nunit = "years"\n'
        '\n[[subgroup]]\nname = "route"\ncolumn = "admission"\nlevels = ["elective"]\n'
    )
    age, route = parse_task_text(text).subgroups
    frame = pd.DataFrame({"age": ["30", "50", "64.9", "80", "NA"],
                          "admission": ["elective", "emergency", "elective", "", "elective"]})  # fmt: skip
    masks = {k: v.tolist() for k, v in age.masks(frame).items()}
    assert masks == {
        "< 50 years": [True, False, False, False, False],
        "50 to < 65 years": [False, True, True, False, False],
        ">= 65 years": [False, False, False, True, False],
        "missing or other": [False, False, False, False, True],
    }
    assert route.name == "route"
    assert {k: v.tolist() for k, v in route.masks(frame).items()} == {
        "elective": [True, False, True, False, True],
        "missing or other": [False, True, False, True, False],
    }
    assert [g.name for g in get_task("heart-disease").subgroups] == ["sex", "age"]
    assert [g.name for g in get_task("icu-mortality").subgroups] == ["sex", "age"]


def test_task_check_command(monkeypatch, capsys, tmp_path):
    path = tmp_path / "readmission.toml"
    path.write_text(BASE)
    code, out = _fedcare(monkeypatch, capsys, "task", "check", str(path))
    assert code == 0, out
    assert "valid task file for task readmission" in out and "age: numeric [18, 110] years" in out
    assert "'declared': 3 model inputs" in out and "tasks/readmission.toml" in out
    path.write_text(BASE.replace('name = "admission"', 'name = "age"'))  # a column named twice
    code, out = _fedcare(monkeypatch, capsys, "task", "check", str(path))
    assert code == 2 and "Traceback" not in out
    assert f"error: {path}: 'feature[1]' names column 'age' a second time" in out


# ----------------------------------------------------------------------------------------------
# CSV dialects
# ----------------------------------------------------------------------------------------------
def _wdbc_rows(n: int = 40) -> pd.DataFrame:
    return breast_cancer_frame().iloc[:n]


@pytest.mark.parametrize("dialect", ["comma", "semicolon-decimal-comma-bom", "quoted-crlf", "tab"])
def test_csv_dialects_give_the_same_arrays(tmp_path, dialect):
    frame = _wdbc_rows()
    path = tmp_path / "hospital.csv"
    if dialect == "comma":
        frame.to_csv(path, index=False)
    elif dialect == "semicolon-decimal-comma-bom":  # a German / French spreadsheet export
        text = frame.to_csv(index=False, sep=";", decimal=",")
        assert "," in text.splitlines()[1]
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    elif dialect == "quoted-crlf":
        path.write_text(frame.to_csv(index=False, quoting=1, lineterminator="\r\n"))
    else:
        frame.to_csv(path, index=False, sep="\t")
    task = get_task("breast-cancer")
    x, y = task.features(task.read_file(path), "wdbc-ranges")
    ref_x, ref_y = task.features(task.read_file(_comma(frame, tmp_path)), "wdbc-ranges")
    np.testing.assert_array_equal(x, ref_x)
    np.testing.assert_array_equal(y, ref_y)
    assert x.shape == (40, 30)


def _comma(frame: pd.DataFrame, folder: Path) -> Path:
    path = folder / "reference.csv"
    frame.to_csv(path, index=False)
    return path


def test_unreadable_csv_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("âge;diagnosis\n12;M\n".encode("latin-1"))
    with pytest.raises(
        DataError, match=r"latin1.csv: not UTF-8 text .*export the table as 'CSV UTF-8'"
    ):
        read_csv_table(path)
    path = tmp_path / "ragged.csv"
    path.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(
        DataError, match=r"ragged.csv: not a regular table \(Expected 2 fields in line 3, saw 3\)"
    ):
        read_csv_table(path)
    path = tmp_path / "twice.csv"
    path.write_text("a,b,a\n1,2,3\n")
    with pytest.raises(DataError, match=r"twice.csv: the header names column 'a' twice"):
        read_csv_table(path)


# ----------------------------------------------------------------------------------------------
# bad input: one clear error each, naming file, column and row count, never a value
# ----------------------------------------------------------------------------------------------
SENTINEL = 97.531  # patient values derived from it: no message may contain them
FORBIDDEN = ("97.53", "975.3", "48.76")  # SENTINEL, SENTINEL * 10, SENTINEL / 2


def _hospital_file(tmp_path: Path, change) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    task_file = tmp_path / "gbsg2.toml"
    task_file.write_text(gbsg2.TASK)
    frame = gbsg2.gbsg2_frame().iloc[:50].copy()
    frame["age"] = frame["age"].astype(float)
    frame.loc[7, "age"] = SENTINEL / 2  # an in-range value in a row that also carries the error
    frame = change(frame)
    data = tmp_path / "hospital.csv"
    if frame is not None:
        frame.to_csv(data, index=False)
    else:
        data.write_text("")
    return task_file, data


def _out_of_range(f: pd.DataFrame) -> pd.DataFrame:
    f["tsize"] = f["tsize"].astype(float)
    f.loc[7, "tsize"] = SENTINEL * 10  # 975.31 mm
    return f


def _label_outside(f: pd.DataFrame) -> pd.DataFrame:
    f["cens"] = f["cens"].astype(object)
    f.loc[7, "cens"] = f"{SENTINEL}"
    return f


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda f: f.drop(columns=["tsize"]), "hospital.csv (50 rows): column 'tsize' is missing"),
        (lambda f: f.assign(ward=f"{SENTINEL}"),
         "hospital.csv (50 rows): column 'ward' is not in task gbsg2; remove it, or list it in"),
        (_out_of_range, "hospital.csv (50 rows): column 'tsize': 1 row(s) outside the valid range "
                        "[0, 200] mm (first at data row 8)"),
        (_label_outside, "hospital.csv (50 rows): label column 'cens': 1 row(s) with a value that "
                         "is neither positive nor negative (first at data row 8)"),
        (lambda f: None, "hospital.csv: the file is empty (0 rows)"),
        (lambda f: f.iloc[:0], "hospital.csv (0 rows): the file has a header but no data rows"),
    ],
)  # fmt: skip
def test_bad_hospital_file_is_one_clear_error(monkeypatch, capsys, tmp_path, change, expected):
    task_file, data = _hospital_file(tmp_path, change)
    code, out = _fedcare(monkeypatch, capsys, "client", "check", "--task", str(task_file),
                         "--data", str(data))  # fmt: skip
    assert code == 2 and "Traceback" not in out
    assert expected in out
    assert not [v for v in FORBIDDEN if v in out]  # no patient value, ever
    with pytest.raises(DataError) as exc:  # what a hospital's ClientApp raises (then sanitised)
        task_from_file(task_file).read_file(data)
    assert expected in str(exc.value) and not [v for v in FORBIDDEN if v in str(exc.value)]


def test_client_check_reports_per_column_counts(monkeypatch, capsys, tmp_path):
    paths = gbsg2.write_hospitals(tmp_path / "data")
    task_file = tmp_path / "gbsg2.toml"
    task_file.write_text(gbsg2.TASK)
    code, out = _fedcare(monkeypatch, capsys, "client", "check", "--task", str(task_file),
                         "--data", str(paths["munich"]))  # fmt: skip
    assert code == 0, out
    assert "munich.csv: 229 rows, valid task gbsg2" in out
    assert "label: 88 positive (38%), 141 negative" in out
    cells = out.split("│ progrec", 1)[1].split("│")  # the column's row of the table
    assert "numeric" in cells[1] and "15 (7%)" in cells[2]  # its missing rate


def test_client_start_refuses_a_file_that_fails_the_check(monkeypatch, capsys, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    task_file, data = _hospital_file(tmp_path, _out_of_range)
    key = tmp_path / "a.key"
    key.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )  # fmt: skip
    (tmp_path / "ca.pem").write_text("x")
    code, out = _fedcare(
        monkeypatch, capsys, "client", "start", "--superlink", "127.0.0.1:1", "--ca",
        str(tmp_path / "ca.pem"), "--key", str(key), "--hospital", "a", "--data", str(data),
        "--state", str(tmp_path / "state"), "--task", str(task_file),
    )  # fmt: skip
    assert code == 2 and "Traceback" not in out
    assert "column 'tsize': 1 row(s) outside the valid range" in out  # the same report
    assert f"error: {data} does not match task gbsg2 (1 problem(s) above)" in out
    assert not (tmp_path / "state").exists()  # nothing started


# ----------------------------------------------------------------------------------------------
# drafting
# ----------------------------------------------------------------------------------------------
def test_draft_infers_columns_and_leaves_ranges_to_the_consortium(monkeypatch, capsys, tmp_path):
    paths = gbsg2.write_hospitals(tmp_path / "data")
    out_file = tmp_path / "draft.toml"
    code, out = _fedcare(monkeypatch, capsys, "task", "draft", "--data", str(paths["munich"]),
                         "--label", "cens", "--out", str(out_file))  # fmt: skip
    assert code == 0, out
    assert "'min' is missing: give the valid range from the data dictionary" in out
    text = out_file.read_text()
    with pytest.raises(TaskFileError, match="feature 'age': 'min' is missing"):
        parse_task_text(text)
    filled = draft_task_file(read_csv_table(paths["munich"]), label="cens", name="draft",
                             source="munich.csv", fill_ranges=True)  # fmt: skip
    spec = parse_task_text(filled)
    kinds = {f.name: (f.type, f.levels) for f in spec.features}
    assert kinds["horTh"] == ("binary", ("no", "yes"))
    assert kinds["tgrade"] == ("categorical", ("I", "II", "III"))
    assert kinds["age"][0] == "numeric" and spec.missing == ("NA",)
    assert next(f for f in spec.features if f.name == "progrec").if_missing == "impute"
    assert (spec.label.positive, spec.label.negative) == ((1,), (0,))
    code, out = _fedcare(monkeypatch, capsys, "task", "draft", "--data", str(paths["munich"]),
                         "--label", "cens", "--out", str(tmp_path / "f.toml"), "--fill-ranges")  # fmt: skip
    assert code == 0 and "warning: the ranges in" in out and "reveal its extreme patients" in out
    code, out = _fedcare(monkeypatch, capsys, "task", "draft", "--data", str(paths["munich"]),
                         "--label", "cens", "--out", str(out_file))  # fmt: skip
    assert code == 2 and "exists" in out and out_file.read_text() == text  # never overwritten


def test_draft_sends_identifiers_to_ignore():
    frame = pd.DataFrame(
        {
            "id": [f"P{i:04d}" for i in range(40)],
            "x": [str(i) for i in range(40)],
            "y": ["0", "1"] * 20,
        }
    )
    spec_text = draft_task_file(frame, label="y", name="t", source="s.csv", fill_ranges=True)
    spec = parse_task_text(spec_text)
    assert spec.ignore == ("id",) and [f.name for f in spec.features] == ["x"]


# ----------------------------------------------------------------------------------------------
# simulation input and the app bundle
# ----------------------------------------------------------------------------------------------
def test_one_csv_is_split_into_simulated_hospitals(monkeypatch, capsys, tmp_path):
    single = tmp_path / "all.csv"
    breast_cancer_frame().to_csv(single, index=False)
    code, out = _fedcare(monkeypatch, capsys, "simulate", "--data-dir", str(single),
                         "--hospitals", "4", "--export-hospitals", str(tmp_path / "out"))  # fmt: skip
    assert code == 0, out
    files = sorted((tmp_path / "out").glob("*.csv"))
    assert [f.name for f in files] == [f"hospital-{i}.csv" for i in range(1, 5)]
    assert sum(len(pd.read_csv(f)) for f in files) == 569


@pytest.fixture(scope="module")
def app_copy(tmp_path_factory) -> Path:
    """The files of the fedcare FAB, unpacked once into a fresh folder."""
    return unpack_app(tmp_path_factory.mktemp("app") / "fedcare")


def _app_with_task(app_copy: Path, dst: Path, text: str) -> Path:
    """A copy of the app with the task file ``tasks/gbsg2.toml`` added."""
    shutil.copytree(app_copy, dst)
    (dst / "tasks" / "gbsg2.toml").write_text(text)
    return dst


def test_task_files_are_in_the_bundle_and_its_hash(tmp_path, app_copy):
    """The approval screen lists a bundle's task files; changing one range changes the hash,
    and a hospital that approved the old bundle does not approve the new one."""
    from client.launcher import bundle_refusal

    app = _app_with_task(app_copy, tmp_path / "v1", gbsg2.TASK)
    info = inspect_fab(fab_bytes(app))
    assert info.tasks == sorted({*TASKS, "gbsg2"})
    assert any(f.startswith("tasks/gbsg2.toml (") for f in info.files)
    approved = ApprovedBundles(tmp_path / "ledger")
    approved.approve(info, source="v1")
    changed = gbsg2.TASK.replace("max = 200", "max = 250")
    assert changed != gbsg2.TASK
    app2 = _app_with_task(app_copy, tmp_path / "v2", changed)
    info2 = inspect_fab(fab_bytes(app2))
    assert info2.sha256 != info.sha256
    assert approved.is_approved(info.sha256) and not approved.is_approved(info2.sha256)
    assert "is not approved here" in bundle_refusal("a", info2.sha256)
    stored = json.loads((tmp_path / "ledger" / "approved.json").read_text())["approved"][0]
    assert "gbsg2" in stored["tasks"]


def test_an_invalid_task_file_makes_the_bundle_unapprovable(tmp_path, app_copy):
    app = _app_with_task(app_copy, tmp_path / "bad", gbsg2.TASK.replace("max = 200", "max = -1"))
    with pytest.raises(
        ApprovalError, match=r"tasks/gbsg2.toml: feature 'tsize': 'min' = 0 must be below"
    ):
        inspect_fab(fab_bytes(app))
    shutil.move(app / "tasks" / "gbsg2.toml", app / "tasks" / "other.toml")
    (app / "tasks" / "other.toml").write_text(gbsg2.TASK)
    with pytest.raises(ApprovalError, match="tasks/other.toml names task 'gbsg2'"):
        inspect_fab(fab_bytes(app))


def test_unknown_task_names_a_broken_task_file(monkeypatch, capsys, tmp_path):
    from shared_models.tasks.tabular import load_task_folder

    (tmp_path / "gbsg2.toml").write_text(gbsg2.TASK.replace("max = 200", "max = -1"))
    (tmp_path / "ok.toml").write_text(gbsg2.TASK)  # named after another task
    tasks, problems = load_task_folder(tmp_path)
    assert tasks == {}
    assert "feature 'tsize': 'min' = 0 must be below" in problems["gbsg2.toml"]
    assert "rename the file to gbsg2.toml" in problems["ok.toml"]


def test_the_readme_example_is_a_valid_task_file():
    from server.run_config import APP_DIR

    readme = (APP_DIR / "docs" / "own-task.md").read_text()
    section = readme.split("# Your own task", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    spec = parse_task_text(example, source="docs/own-task.md")
    assert spec.name == "readmission" and spec.preprocessings == ("declared", "impute")
    assert spec.output_columns("declared") == [
        "age", "age missing", "creatinine", "sex",
        "admission=elective", "admission=emergency", "admission=transfer",
    ]  # fmt: skip
    assert spec.output_columns("impute") == [
        "age", "creatinine", "sex", "admission=elective", "admission=emergency",
        "admission=transfer",
    ]  # fmt: skip
