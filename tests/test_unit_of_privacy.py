"""The unit of privacy is one record: what a hospital computes before training or evaluation
(the train/test assignment, missing-value imputation, scaling, image and ICU preprocessing)
depends on a record and the task's constants alone.

DP-SGD and the evaluation releases are accounted for neighbouring datasets that differ in one
example. A seeded permutation split, or an imputation with the hospital's median, turned one patient
more or less into many changed examples (one removed patient moved 13 to 55 others between the
splits; one changed patient moved the imputed value of 9 test patients). Here, for every task
and preprocessing, removing one record leaves every other record in the same split with the same
preprocessed values.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from client.hospital_data import SPLIT_KEY_FILE, HospitalSettings, hospital_split_key
from shared_models.hospitals import hospital_from_frame
from shared_models.tasks import HospitalData, get_task
from shared_models.tasks.base import assign_test_records, split_key_from_seed
from tests.images_data import write_hospital_folder

KEY = split_key_from_seed(7)


def _records(x: np.ndarray, y: np.ndarray) -> Counter:
    return Counter(
        (row.tobytes(), float(label)) for row, label in zip(x.reshape(len(x), -1), y, strict=True)
    )


def _assert_one_record_apart(hospital: HospitalData, neighbour: HospitalData) -> None:
    """``neighbour`` = ``hospital`` minus one record: every other record in the same split, with
    the same values, bit for bit."""
    train, test = (
        _records(hospital.x_train, hospital.y_train),
        _records(hospital.x_test, hospital.y_test),
    )
    train2, test2 = (
        _records(neighbour.x_train, neighbour.y_train),
        _records(neighbour.x_test, neighbour.y_test),
    )
    assert not train2 - train and not test2 - test  # no record moved or changed
    assert (train - train2).total() + (test - test2).total() == 1  # exactly the removed one


def _check_task(task_name: str, frame: pd.DataFrame, preprocessings: tuple[str, ...]) -> None:
    task = get_task(task_name)
    rows = [0, len(frame) // 2, len(frame) - 1]
    for preprocessing in preprocessings:
        hospital = hospital_from_frame(
            task, "a", frame, preprocessing=preprocessing, test_fraction=0, split_key=KEY
        )
        assert hospital.n_test > 0 and hospital.n_train > 0
        for row in rows:
            neighbour = hospital_from_frame(
                task, "a", frame.drop(index=frame.index[row]), preprocessing=preprocessing,
                test_fraction=0, split_key=KEY,
            )  # fmt: skip
            _assert_one_record_apart(hospital, neighbour)


def test_breast_cancer_records_are_processed_one_by_one():
    task = get_task("breast-cancer")
    [(_, frame)] = task.load_hospitals("")
    _check_task("breast-cancer", frame.iloc[:120], task.preprocessings)


def test_heart_disease_records_are_processed_one_by_one(heart_dir):
    task = get_task("heart-disease")
    frame = task.read_file(heart_dir / "processed.hungarian.data")  # many missing values
    x, _ = task.features(frame, "impute")
    assert np.isnan(x).any(axis=1).sum() > 20
    _check_task("heart-disease", frame, task.preprocessings)  # flamby (drops) and impute


def test_imputation_uses_the_task_constant_whatever_the_other_patients(heart_dir):
    """The attack of the review: change ONE patient's value and see whether any other
    patient's imputed value moves (it did with the hospital's training median)."""
    from shared_models.tasks import prepare_hospital

    task = get_task("heart-disease")
    x, y = task.features(task.read_file(heart_dir / "processed.hungarian.data"), "impute")
    column = int(np.flatnonzero(np.isnan(x).any(axis=0))[0])
    donor = int(np.flatnonzero(~np.isnan(x[:, column]))[0])
    changed = x.copy()
    changed[donor, column] = x[donor, column] * 3 + 100  # an extreme value for one patient
    a, b = (
        prepare_hospital(
            "a",
            np.delete(v, donor, axis=0),
            np.delete(y, donor),
            test_fraction=0.34,
            split_key=KEY,
            reference_scaling=task.scaling("impute"),
        )  # fmt: skip
        for v in (x, changed)
    )
    full = prepare_hospital(
        "a", changed, y, test_fraction=0.34, split_key=KEY, reference_scaling=task.scaling("impute")
    )
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    _assert_one_record_apart(full, b)  # the changed patient alone differs


def test_chest_xray_records_are_processed_one_by_one(tmp_path):
    task = get_task("chest-xray")
    write_hospital_folder(tmp_path / "a", 24, seed=0)
    frame = task.read_file(tmp_path / "a")
    _check_task("chest-xray", frame, ("size-28", "scatter-28"))


def test_icu_records_are_processed_one_by_one(physionet_dir):
    task = get_task("icu-mortality")
    hospitals = task.load_hospitals(str(physionet_dir))
    _check_task("icu-mortality", hospitals[0][1].iloc[:60], task.preprocessings)


def test_a_task_file_with_imputation(tmp_path):
    """A consortium's task file (GBSG2, progrec imputed) on a real clinical table."""
    from shared_models.tasks.tabular import task_from_file
    from tests import gbsg2

    (tmp_path / "gbsg2.toml").write_text(gbsg2.TASK)
    task = task_from_file(tmp_path / "gbsg2.toml")
    frame = task.read_file(gbsg2.write_hospitals(tmp_path / "data")["munich"])
    x, _ = task.features(frame, task.preprocessings[0])
    assert np.isnan(x).any(axis=1).sum() == 15  # munich did not record progrec for 15 patients
    hospital = _split(task, frame)
    for row in (0, 50, len(frame) - 1):
        _assert_one_record_apart(hospital, _split(task, frame.drop(index=frame.index[row])))


def _split(task, frame):  # type: ignore[no-untyped-def]
    return hospital_from_frame(
        task, "a", frame, preprocessing="default", test_fraction=0, split_key=KEY
    )


def test_the_assignment_is_a_keyed_hash_of_the_record():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 5)).astype(np.float32)
    y = (rng.random(4000) < 0.3).astype(np.float32)
    is_test = assign_test_records(x, y, test_fraction=0.25, key=KEY)
    assert abs(is_test.mean() - 0.25) < 0.03
    assert abs(is_test[y == 1].mean() - 0.25) < 0.05  # independent of the label
    shuffled = rng.permutation(4000)  # the order of the rows plays no part
    np.testing.assert_array_equal(
        assign_test_records(x[shuffled], y[shuffled], test_fraction=0.25, key=KEY),
        is_test[shuffled],
    )
    other = assign_test_records(x, y, test_fraction=0.25, key=split_key_from_seed(8))
    assert 0.3 < (other != is_test).mean() < 0.45  # another key, another split (2pq = 0.375)


def test_a_deployed_hospital_keeps_a_secret_split_key_in_its_state_folder(tmp_path):
    hospital = HospitalSettings.from_node_config(
        {"data-path": "x.csv", "ledger-dir": str(tmp_path / "ledger")}
    )
    key = hospital_split_key(hospital)
    path = tmp_path / "ledger" / SPLIT_KEY_FILE
    assert path.read_bytes() == key and len(key) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert hospital_split_key(hospital) == key  # kept, not redrawn
    assert key != split_key_from_seed(0)  # not derivable from anything the coordinator knows
    other = HospitalSettings.from_node_config(
        {"data-path": "x.csv", "ledger-dir": str(tmp_path / "other")}
    )
    assert hospital_split_key(other) != key
    path.write_bytes(b"short")
    from client.hospital_data import HospitalSetupError

    with pytest.raises(HospitalSetupError, match="restore it from a backup"):
        hospital_split_key(hospital)
    with pytest.raises(HospitalSetupError, match="no 'ledger-dir'"):  # no seed-derived fallback
        HospitalSettings.from_node_config({"data-path": "x.csv", "split-seed": 5})
