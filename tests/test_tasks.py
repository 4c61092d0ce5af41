"""Task registry, upstream-format loaders and per-hospital preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from shared_models.hospitals import hospital_from_frame, simulated_hospital_frames
from shared_models.tasks import LABEL, TASKS, DataError, get_task, prepare_hospital
from shared_models.tasks.base import split_key_from_seed
from shared_models.tasks.tabular import (
    HEART_HOSPITALS,
    breast_cancer_frame,
    read_heart_disease_file,
)

KEY = split_key_from_seed(0)


def read_breast_cancer_csv(path):
    return get_task("breast-cancer").read_file(path)


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError, match=f"known tasks: {', '.join(sorted(TASKS))}$"):
        get_task("nope")


def test_every_model_is_some_tasks_and_the_registry_imports_no_torch():
    """`fedcare server run` checks model names against the tasks' model lists, and imports the
    task registry without torch, scikit-learn or Opacus; so does `fedcare client start` with the
    hospital policy (a fresh interpreter: this one has them)."""
    import subprocess
    import sys

    from shared_models.models import MODELS

    assert {name for task in TASKS.values() for name in task.models} == set(MODELS)
    probe = (
        "import sys, shared_models.tasks, server.run_config, server.strategies, client.policy; "
        "print(sorted(m for m in ('torch', 'sklearn', 'opacus') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_breast_cancer_embedded_frame_matches_wdbc():
    frame = breast_cancer_frame()
    assert frame.shape == (569, 31)
    assert (frame["diagnosis"] == "M").sum() == 212  # 212 malignant, 357 benign


def test_breast_cancer_csv_roundtrip(tmp_path):
    path = tmp_path / "hospital.csv"
    breast_cancer_frame().iloc[:50].to_csv(path, index=False)
    frame = read_breast_cancer_csv(path)
    assert len(frame) == 50
    assert frame["label"].sum() == (breast_cancer_frame().iloc[:50]["diagnosis"] == "M").sum()


def test_breast_cancer_csv_missing_column(tmp_path):
    path = tmp_path / "hospital.csv"
    breast_cancer_frame().drop(columns=["mean radius"]).iloc[:20].to_csv(path, index=False)
    with pytest.raises(
        DataError, match=r"hospital.csv \(20 rows\): column 'mean radius' is missing"
    ):
        read_breast_cancer_csv(path)


def test_breast_cancer_csv_bad_values_name_the_row_never_the_value(tmp_path):
    frame = breast_cancer_frame().iloc[:20].copy()
    frame["mean area"] = frame["mean area"].astype(object)
    frame.loc[4, "mean area"] = "big"
    path = tmp_path / "hospital.csv"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as exc:
        read_breast_cancer_csv(path)
    assert "column 'mean area': 1 row(s) not a finite number (first at data row 5)" in str(
        exc.value
    )
    assert "big" not in str(exc.value)
    frame = breast_cancer_frame().iloc[:20].copy()
    frame.loc[2, "diagnosis"] = "X"
    frame.to_csv(path, index=False)
    with pytest.raises(DataError) as exc:
        read_breast_cancer_csv(path)
    message = str(exc.value)
    assert (
        "label column 'diagnosis': 1 row(s) with a value that is neither positive nor " in message
    )
    assert "(first at data row 3)" in message and "'X'" not in message


def test_heart_upstream_files_row_counts(heart_dir):
    counts = {
        s: len(read_heart_disease_file(heart_dir / f"processed.{s}.data")) for s in HEART_HOSPITALS
    }
    assert counts == {"cleveland": 303, "hungarian": 294, "switzerland": 123, "va": 200}


def test_heart_flamby_preprocessing_matches_flamby_counts(heart_dir):
    """FLamby's Fed-Heart-Disease keeps 303 / 261 / 46 / 130 = 740 rows with 13 features."""
    task = get_task("heart-disease")
    hospitals = simulated_hospital_frames(
        task, data_dir=str(heart_dir), num_hospitals=4, scheme="iid", alpha=1, seed=0
    )
    sizes = {}
    for name, frame in hospitals:
        x, y = task.features(frame, "flamby")
        assert (x.shape[1],) == task.input_shape("flamby") == (13,)
        assert not np.isnan(x).any()
        sizes[name] = len(y)
    assert sizes == {"cleveland": 303, "hungarian": 261, "switzerland": 46, "va": 130}
    # impute keeps every row
    x, _ = task.features(hospitals[3][1], "impute")
    assert x.shape[0] == 200


def test_heart_label_is_num_positive(heart_dir):
    frame = get_task("heart-disease").read_file(heart_dir / "processed.switzerland.data")
    assert frame["label"].mean() == pytest.approx((frame["num"].astype(float) > 0).mean())
    assert 0.9 < frame["label"].mean() < 0.95  # 93 % positive (shared/data README)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("63,1,1,145,233,1,2,150,0,2.3,3,0,6\n", r"line 1: expected 14 comma-separated values"),
        ("63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n63,1,1,145,233,1,2,150,0,2.3,3,0,6,0,1\n", "line 2: expected 14"),
        ("63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n63,xyz,1,145,233,1,2,150,0,2.3,3,0,6,0\n",
         r"column 'sex': 1 row\(s\) not one of the declared levels \(first at data row 2\)"),
        ("", "the file is empty"),
    ],
)  # fmt: skip
def test_heart_malformed_files(tmp_path, content, match):
    path = tmp_path / "processed.x.data"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as exc:
        get_task("heart-disease").read_file(path)
    assert "xyz" not in str(exc.value)  # never a cell value


def test_heart_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="processed.cleveland.data: missing"):
        get_task("heart-disease").load_hospitals(str(tmp_path))


def test_prepare_hospital_scales_with_the_fixed_constants_only():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(200, 4)).astype(np.float32)
    y = (rng.random(200) > 0.5).astype(np.float32)
    center, scale = (5.0, 0.0, 1.0, 2.0), (3.0, 1.0, 2.0, 4.0)
    hospital = prepare_hospital(
        "a", x, y, test_fraction=0.25, split_key=KEY, reference_scaling=(center, scale)
    )
    assert (
        hospital.n_train + hospital.n_test == 200 and 30 <= hospital.n_test <= 70
    )  # binomial(200, 0.25)
    raw = np.concatenate([hospital.x_train, hospital.x_test]) * np.float32(scale) + np.float32(
        center
    )
    np.testing.assert_allclose(np.sort(raw, axis=0), np.sort(x, axis=0), rtol=1e-5)
    # no statistic of the hospital enters: the training split is NOT centred on its own mean
    assert np.abs(hospital.x_train.mean(axis=0)[1:]).max() > 0.5
    unscaled = prepare_hospital("a", x, y, test_fraction=0.25, split_key=KEY)
    np.testing.assert_allclose(
        np.sort(np.concatenate([unscaled.x_train, unscaled.x_test]), axis=0), np.sort(x, axis=0)
    )


def test_prepare_hospital_imputes_with_the_fixed_centre_not_a_hospital_statistic():
    values = [1.0, np.nan, 3.0, 5.0, 7.0, 9.0, np.nan, 11.0, 13.0, 15.0, 17.0, 19.0]
    x = np.array([[i, v] for i, v in enumerate(values)], dtype=np.float32)  # column 0: row id
    y = np.array([0, 1] * 6, dtype=np.float32)
    center, scale = (0.0, 8.0), (1.0, 2.0)
    hospital = prepare_hospital(
        "a", x, y, test_fraction=0.25, split_key=KEY, reference_scaling=(center, scale)
    )
    for part in (hospital.x_train, hospital.x_test):
        for row_id, value in part:
            expected = values[int(row_id)]
            assert value == (0.0 if np.isnan(expected) else (expected - 8.0) / 2.0)
    unscaled = prepare_hospital("a", x, y, test_fraction=0.25, split_key=KEY)
    assert not np.isnan(unscaled.x_train).any() and 0.0 in unscaled.x_train[:, 1]


def test_heart_hospital_from_file_is_reproducible(heart_dir):
    task = get_task("heart-disease")
    frame = read_heart_disease_file(heart_dir / "processed.cleveland.data")
    a = hospital_from_frame(
        task, "cleveland", frame, preprocessing="default", test_fraction=0, split_key=KEY
    )
    b = hospital_from_frame(
        task, "cleveland", frame, preprocessing="flamby", test_fraction=0, split_key=KEY
    )
    assert a.n_train + a.n_test == 303
    assert 80 <= a.n_test <= 126  # the task's 34 % test share, record by record
    np.testing.assert_array_equal(a.x_test, b.x_test)
    flamby = hospital_from_frame(
        task, "cleveland", frame, preprocessing="flamby", test_fraction=0, stratified_seed=43
    )
    assert flamby.n_test == 104  # FLamby's own split (benchmarks): 34 %, stratified


def test_partitions_are_disjoint_and_cover_the_data():
    task = get_task("breast-cancer")
    frames = simulated_hospital_frames(
        task, data_dir="", num_hospitals=4, scheme="dirichlet", alpha=0.5, seed=1
    )
    assert [name for name, _ in frames] == [f"hospital-{i}" for i in range(1, 5)]
    assert sum(len(f) for _, f in frames) == 569
    allrows = pd.concat([f for _, f in frames])
    assert not allrows.duplicated().any()
    again = simulated_hospital_frames(
        task, data_dir="", num_hospitals=4, scheme="dirichlet", alpha=0.5, seed=1
    )
    assert all(a.equals(b) for (_, a), (_, b) in zip(frames, again, strict=True))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_the_partition_cache_gives_the_same_hospitals_and_survives_a_bad_entry(
    tmp_path, monkeypatch, scheme
):
    """The harness shares one partition with the hospitals' actors through a folder: an entry
    gives exactly the partition Flower Datasets computes, and a corrupt or inconsistent entry is
    recomputed (and rewritten), never trusted."""
    from shared_models import partition
    from shared_models.runtime import PARTITION_CACHE_ENV

    frame = get_task("breast-cancer").load_hospitals("")[0][1]
    kwargs = dict(label=LABEL, num_partitions=4, scheme=scheme, alpha=0.5, seed=3)
    monkeypatch.delenv(PARTITION_CACHE_ENV, raising=False)
    expected = partition.partition_frame(frame, **kwargs)
    monkeypatch.setenv(PARTITION_CACHE_ENV, str(tmp_path))
    first = partition.partition_frame(frame, **kwargs)
    (entry,) = tmp_path.glob("*.json")
    assert all(a.equals(b) for a, b in zip(first, expected, strict=True))
    good = entry.read_text()
    rows = json.loads(good)
    # a consistent entry is read as it stands: hospitals 1 and 2 swapped in it come out swapped
    entry.write_text(json.dumps([rows[1], rows[0], *rows[2:]]))
    cached = partition.partition_frame(frame, **kwargs)
    assert cached[0].equals(expected[1]) and cached[1].equals(expected[0])
    for bad in ("not json", json.dumps(rows[:-1]), json.dumps([rows[0] + rows[1][:1], *rows[1:]])):
        entry.write_text(bad)
        again = partition.partition_frame(frame, **kwargs)
        assert all(a.equals(b) for a, b in zip(again, expected, strict=True))
        assert entry.read_text() == good  # recomputed and rewritten


def test_too_many_hospitals_is_a_data_error():
    with pytest.raises(DataError, match="use at most 56"):
        simulated_hospital_frames(
            get_task("breast-cancer"), data_dir="", num_hospitals=57, scheme="iid", alpha=1, seed=0
        )


def test_breast_cancer_scaling_does_not_depend_on_the_hospital():
    """The same patient gets the same features at every hospital, whatever the hospital's label
    mix (per-hospital standardisation would centre an all-malignant hospital like an all-benign one)."""
    task = get_task("breast-cancer")
    x, y = task.features(read_breast_cancer_frame(), "wdbc-ranges")
    malignant, benign = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    patient = malignant[0]
    rows_a = np.r_[patient, malignant[1:40]]  # an all-malignant hospital
    rows_b = np.r_[patient, benign[:39]]  # an all-benign hospital
    a = prepare_hospital(
        "a",
        x[rows_a],
        y[rows_a],
        test_fraction=0.25,
        split_key=KEY,
        reference_scaling=task.reference_scaling,
    )
    b = prepare_hospital(
        "b",
        x[rows_b],
        y[rows_b],
        test_fraction=0.25,
        split_key=KEY,
        reference_scaling=task.reference_scaling,
    )
    center, scale = (np.asarray(v, dtype=np.float32) for v in task.reference_scaling)
    expected = (x[patient] - center) / scale
    for hospital in (a, b):
        allrows = np.concatenate([hospital.x_train, hospital.x_test])
        assert np.isclose(allrows, expected, atol=1e-6).all(axis=1).any()
    assert (
        np.abs(np.concatenate([a.x_train, b.x_train])).max() <= 1.05
    )  # published (rounded) ranges
    assert a.x_train.mean() > b.x_train.mean()  # the malignant hospital's signal survives


def read_breast_cancer_frame() -> pd.DataFrame:
    [(_, frame)] = get_task("breast-cancer").load_hospitals("")
    return frame
