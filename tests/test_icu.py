"""icu-mortality: the PhysioNet 2012 upstream format, its errors, the parse cache, the tensors."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared_models.hospitals import hospital_from_frame, simulated_hospital_frames
from shared_models.tasks import DataError, get_task
from shared_models.tasks import physionet2012 as pn
from shared_models.tasks.base import split_key_from_seed
from shared_models.tasks.icu import (
    N_CHANNELS,
    STATIC_CHANNELS,
    VARIABLES,
    read_icu_data,
    stay_tensors,
    write_icu_data,
)

HR = pn.TIME_SERIES.index("HR")
PH = pn.TIME_SERIES.index("pH")
TEMP = pn.TIME_SERIES.index("Temp")

# Three stays in the upstream format (made up, same structure as set A).
RECORDS = {
    "140001": """Time,Parameter,Value
00:00,RecordID,140001
00:00,Age,70
00:00,Gender,1
00:00,Height,-1
00:00,ICUType,3
00:00,Weight,80
00:30,HR,126
00:45,Temp,25
02:10,HR,86
02:10,pH,735
03:00,HR,96
""",
    "140002": """Time,Parameter,Value
00:00,RecordID,140002
00:00,Age,45
00:00,Gender,0
00:00,Height,165
00:00,ICUType,2
00:00,Weight,-1
00:00,Weight,62
01:05,pH,7.30
""",
    "140003": """Time,Parameter,Value
00:00,RecordID,140003
00:00,Age,81
00:00,Gender,1
00:00,Height,-1
00:00,ICUType,3
00:00,Weight,-1
""",
}
OUTCOMES = """RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death
140001,20,10,5,3,1
140002,8,2,9,-1,0
140003,15,5,4,-1,0
"""


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDCARE_CACHE_DIR", str(tmp_path / "cache"))


def _hospital(folder: Path, records: dict[str, str] = RECORDS, outcomes: str = OUTCOMES) -> Path:
    (folder / "set-x").mkdir(parents=True)
    for rid, text in records.items():
        (folder / "set-x" / f"{rid}.txt").write_text(text)
    (folder / "Outcomes-x.txt").write_text(outcomes)
    return folder


def test_a_hospital_folder_reads_as_one_row_per_stay(tmp_path):
    frame = read_icu_data(_hospital(tmp_path / "h"))
    assert list(frame["RecordID"]) == [140001, 140002, 140003]
    assert list(frame["label"]) == [1.0, 0.0, 0.0]
    assert np.isnan(frame["Height"][0]) and frame["Height"][1] == 165  # -1 = unknown
    assert frame["Weight"][1] != frame["Weight"][1]  # admission weight unknown (-1) ...
    assert frame["mean Weight"][1] == 62  # ... the second Weight at 00:00 is a measurement
    assert frame["mean HR"][0] == pytest.approx((126 + 86 + 96) / 3)
    assert np.isnan(frame["mean HR"][2])  # never observed
    assert frame["observations"][0].shape == (5, 3)


def test_the_archive_reads_like_the_folder(tmp_path):
    folder = _hospital(tmp_path / "h")
    archive = tmp_path / "set-x.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder / "set-x", arcname="set-x")
        tar.add(folder / "Outcomes-x.txt", arcname="Outcomes-x.txt")
    a, b = read_icu_data(folder), read_icu_data(archive)
    pd.testing.assert_frame_equal(a.drop(columns="observations"), b.drop(columns="observations"))
    # a folder holding only the archive is read through it
    only = tmp_path / "only"
    only.mkdir()
    archive.rename(only / archive.name)
    assert list(read_icu_data(only)["RecordID"]) == list(a["RecordID"])


def test_tensors_carry_forward_with_masks_and_time_since_observed(tmp_path):
    frame = read_icu_data(_hospital(tmp_path / "h"))
    x, y = stay_tensors(frame, "hourly")
    assert (
        x.shape == (3, 48, N_CHANNELS, 3) == (3, *get_task("icu-mortality").input_shape("hourly"))
    )
    assert list(y) == [1.0, 0.0, 0.0]
    value, mask, delta = x[0, :, HR, 0], x[0, :, HR, 1], x[0, :, HR, 2]
    # HR 126 at 00:30 (bin 0), 86 at 02:10 (bin 2), 96 at 03:00 (bin 3); normal 86, width 40
    np.testing.assert_allclose(value[:5], [1.0, 1.0, 0.0, 0.25, 0.25], atol=1e-6)
    np.testing.assert_array_equal(mask[:5], [1, 0, 1, 1, 0])
    np.testing.assert_allclose(delta[:5], np.array([0, 1, 0, 0, 1]) / 48, atol=1e-6)
    assert delta[-1] == pytest.approx(44 / 48)  # bin 47 is 44 h after the last observation
    # pH 735 is outside the published outlier range: not an observation
    assert x[0, :, PH, 1].sum() == 0 and x[0, :, PH, 0].max() == 0
    # Temp 25 is between outlier (14.2) and valid (26) bounds: clipped to 26 degC
    assert x[0, 0, TEMP, 0] == pytest.approx((26 - 37) / (37.8 - 36.1), rel=1e-5)
    # never observed: value 0 (= normal), mask 0, delta counts from admission
    assert x[2, :, HR, 0].max() == 0 and x[2, :, HR, 1].max() == 0
    assert x[2, 9, HR, 2] == pytest.approx(10 / 48)
    # static channels: always observed when known; Height of stay 0 is unknown
    static = {name: len(pn.TIME_SERIES) + i for i, name in enumerate(STATIC_CHANNELS)}
    assert x[0, :, static["Height"], 1].max() == 0 and x[1, 0, static["Height"], 1] == 1
    assert x[0, 0, static["micu"], 0] == 1 and x[1, 0, static["csru"], 0] == 1
    assert x[0, 0, static["Sex"], 0] == 1 and x[1, 0, static["Sex"], 0] == -1
    np.testing.assert_allclose(x[0, :, static["hour"], 0], np.arange(48) / 48)
    half = stay_tensors(frame, "half-hourly")[0]
    assert half.shape == (3, 96, N_CHANNELS, 3)
    assert half[0, 1, HR, 1] == 1 and half[0, 0, HR, 1] == 0  # 00:30 is in the second bin


def test_a_stays_tensor_depends_on_that_stay_only(tmp_path):
    """No statistic of other stays (or hospitals) enters the preprocessing."""
    frame = read_icu_data(_hospital(tmp_path / "h"))
    together = stay_tensors(frame, "hourly")[0]
    for i in range(len(frame)):
        alone = stay_tensors(frame.iloc[[i]].reset_index(drop=True), "hourly")[0]
        np.testing.assert_array_equal(alone[0], together[i])


def test_every_variable_has_published_ranges_in_order():
    assert [v.name for v in VARIABLES] == list(pn.TIME_SERIES)
    for v in VARIABLES:
        assert v.outlier[0] <= v.valid[0] <= v.normal <= v.valid[1] <= v.outlier[1], v.name
        assert v.reference[0] < v.reference[1], v.name
        assert v.normalise(np.array([v.normal]))[0] == pytest.approx(0.0, abs=1e-9), v.name


def _error(tmp_path, records=RECORDS, outcomes=OUTCOMES) -> str:
    with pytest.raises(DataError) as exc:
        read_icu_data(_hospital(tmp_path / "h", records, outcomes))
    return str(exc.value)


def test_unknown_parameter_names_file_and_line(tmp_path):
    bad = RECORDS["140001"].replace("02:10,HR,86", "02:10,HeartRate,86")
    message = _error(tmp_path, {**RECORDS, "140001": bad})
    assert message.startswith("set-x/140001.txt, line 10: unknown parameter 'HeartRate'")
    assert "86" not in message.split("known")[0] and str(tmp_path) not in message


def test_a_value_in_the_parameter_column_is_not_echoed(tmp_path):
    bad = RECORDS["140001"].replace("02:10,HR,86", "02:10,86.5,HR")
    message = _error(tmp_path, {**RECORDS, "140001": bad})
    assert "line 10: unknown parameter (not a parameter name)" in message
    assert "86.5" not in message


@pytest.mark.parametrize("time", ["2:1", "02:75", "0210", "02:10:00", "xx:10"])
def test_malformed_time_names_file_and_line_not_the_value(tmp_path, time):
    bad = RECORDS["140002"].replace("01:05,pH", f"{time},pH")
    message = _error(tmp_path, {**RECORDS, "140002": bad})
    assert message.startswith("set-x/140002.txt, line 9: the time is not hh:mm")
    assert time not in message


def test_non_numeric_value_names_the_parameter_not_the_value(tmp_path):
    bad = RECORDS["140002"].replace("01:05,pH,7.30", "01:05,pH,seven")
    message = _error(tmp_path, {**RECORDS, "140002": bad})
    assert message == "set-x/140002.txt, line 9: the value of pH is not a number"


def test_record_missing_from_outcomes(tmp_path):
    outcomes = "\n".join(line for line in OUTCOMES.splitlines() if not line.startswith("140002"))
    message = _error(tmp_path, outcomes=outcomes + "\n")
    assert message.startswith(
        "set-x/140002.txt: RecordID 140002 has no row in the outcomes file (Outcomes-x.txt)"
    )


def test_outcomes_without_the_label_column(tmp_path):
    outcomes = OUTCOMES.replace("In-hospital_death", "Died")
    message = _error(tmp_path, outcomes=outcomes)
    assert message.startswith("Outcomes-x.txt: no column 'In-hospital_death' in the header")


def test_outcomes_with_a_bad_label_names_the_line(tmp_path):
    outcomes = OUTCOMES.replace("140002,8,2,9,-1,0", "140002,8,2,9,-1,yes")
    message = _error(tmp_path, outcomes=outcomes)
    assert message == "Outcomes-x.txt, line 3: In-hospital_death must be 0 or 1"


@pytest.mark.parametrize("text", ["", "Time,Parameter,Value\n", "Time,Parameter,Value\n\n\n"])
def test_empty_record(tmp_path, text):
    message = _error(tmp_path, {**RECORDS, "140003": text})
    assert message.startswith("set-x/140003.txt: the record is empty")


def test_descriptor_outside_admission_and_missing_record_id(tmp_path):
    late = RECORDS["140003"] + "05:00,Age,82\n"
    assert "line 8: the general descriptor Age must come once, at 00:00" in _error(
        tmp_path / "a", {**RECORDS, "140003": late}
    )
    no_id = RECORDS["140003"].replace("00:00,RecordID,140003\n", "")
    assert "set-x/140003.txt: no RecordID line" in _error(
        tmp_path / "b", {**RECORDS, "140003": no_id}
    )


def test_a_folder_without_outcomes_is_refused(tmp_path):
    folder = _hospital(tmp_path / "h")
    (folder / "Outcomes-x.txt").unlink()
    with pytest.raises(DataError, match=r"^h: no outcomes file \(Outcomes\*.txt"):
        read_icu_data(folder)


def test_the_parse_is_cached_and_invalidated_by_a_changed_file(tmp_path):
    """The cache is keyed by the files' names, sizes and modification times: an edit that keeps
    all three is not seen (so the second read came from the cache), any other edit is."""
    folder = _hospital(tmp_path / "h")
    first = read_icu_data(folder)
    assert list((tmp_path / "cache" / "physionet2012").glob("*.npz"))
    record = folder / "set-x" / "140002.txt"
    stat = record.stat()
    record.write_text(record.read_text().replace("00:00,Age,45", "00:00,Age,54"))
    os.utime(record, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = read_icu_data(folder)
    assert again["Age"][1] == 45  # loaded from the cache
    pd.testing.assert_frame_equal(
        first.drop(columns="observations"), again.drop(columns="observations")
    )
    record.write_text(record.read_text() + "02:00,HR,70\n")
    changed = read_icu_data(folder)
    assert changed["mean HR"][1] == 70 and changed["Age"][1] == 54  # parsed again


def test_cache_off_and_unwritable_cache_still_read(tmp_path, monkeypatch):
    folder = _hospital(tmp_path / "h")
    monkeypatch.setenv("FEDCARE_CACHE_DIR", "none")
    assert len(read_icu_data(folder)) == 3
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FEDCARE_CACHE_DIR", str(blocker))
    assert len(read_icu_data(folder)) == 3


def test_export_writes_the_upstream_format_back(tmp_path):
    frame = read_icu_data(_hospital(tmp_path / "h"))
    write_icu_data(frame, tmp_path / "export")
    back = read_icu_data(tmp_path / "export")
    pd.testing.assert_frame_equal(
        frame.drop(columns="observations"), back.drop(columns="observations")
    )
    np.testing.assert_array_equal(stay_tensors(frame, "hourly")[0], stay_tensors(back, "hourly")[0])


def test_client_check_reads_a_hospital_folder(tmp_path, monkeypatch, capsys):
    import sys

    from simulations import cli

    folder = _hospital(tmp_path / "h")
    monkeypatch.setattr(sys, "argv", ["fedcare", "client", "check", "--task", "icu-mortality",
                                      "--data", str(folder)])  # fmt: skip
    cli.main()
    out = " ".join(capsys.readouterr().out.split())
    assert "3 rows, valid icu-mortality data" in out
    assert "1 positive (33%), 2 negative" in out
    assert "mean HR │ 2 (67%)" in out  # two stays without any heart rate


# ----------------------------------------------------------------------------------------------
# set A (../shared/data/physionet2012/set-a.tar.gz)
# ----------------------------------------------------------------------------------------------
def test_set_a_splits_into_the_four_icu_types(physionet_dir):
    task = get_task("icu-mortality")
    hospitals = simulated_hospital_frames(task, data_dir=str(physionet_dir), num_hospitals=4,
                                  scheme="natural", alpha=1, seed=0)  # fmt: skip
    sizes = {name: len(frame) for name, frame in hospitals}
    assert sizes == {"ccu": 577, "csru": 874, "micu": 1481, "sicu": 1068}
    mortality = {name: frame["label"].mean() for name, frame in hospitals}
    assert mortality["csru"] == pytest.approx(0.049, abs=0.001)
    assert mortality["micu"] == pytest.approx(0.186, abs=0.001)
    assert sum(f["label"].sum() for _, f in hospitals) == 554
    hospital = hospital_from_frame(task, "ccu", hospitals[0][1], preprocessing="default", test_fraction=0,
                           split_key=split_key_from_seed(0))  # fmt: skip
    assert hospital.n_train + hospital.n_test == 577
    assert 90 <= hospital.n_test <= 140  # the task's 20 % test share, record by record
    assert hospital.y_test.mean() == pytest.approx(hospital.y_train.mean(), abs=0.05)
    iid = simulated_hospital_frames(task, data_dir=str(physionet_dir), num_hospitals=5, scheme="iid",
                                alpha=1, seed=0)  # fmt: skip
    assert [len(f) for _, f in iid] == [800] * 5
    assert {icu for _, f in iid for icu in f["ICUType"]} == {1.0, 2.0, 3.0, 4.0}


def test_simulate_keeps_the_icu_types_unless_hospitals_are_asked_for(physionet_dir, tmp_path):
    from server.run_config import RunOptions, UsageError
    from simulations.harness import SimulationRequest, build_run_config, preflight

    def request(hospitals=None, partition="iid"):
        options = RunOptions(task="icu-mortality", data_dir=str(physionet_dir),
                             partition=partition, alpha=0.5)  # fmt: skip
        return SimulationRequest(options=options, hospitals=hospitals, out=tmp_path / "run")

    req = request()
    run, hospitals = preflight(*build_run_config(req), req)
    assert run.data.partition == "natural" and run.simulated_hospitals == 4
    assert [s.name for s in hospitals] == ["ccu", "csru", "micu", "sicu"]
    req = request(hospitals=3, partition="dirichlet")
    run, hospitals = preflight(*build_run_config(req), req)
    assert run.data.partition == "dirichlet" and [s.name for s in hospitals] == [
        "hospital-1",
        "hospital-2",
        "hospital-3",
    ]
    assert sum(s.n_train + s.n_test for s in hospitals) == 4000
    with pytest.raises(UsageError, match="--partition dirichlet needs --hospitals N"):
        req = request(partition="dirichlet")
        preflight(*build_run_config(req), req)
