"""A deployed hospital prepares each version of its data once (client.hospital_data's data cache): later
messages load the preprocessed arrays from its state folder, a changed file, preprocessing, split
key or code prepares them again, and the cache is private to the hospital (mode 0700)."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from client import hospital_data as hospital_data_module
from client.hospital_data import (
    DATA_CACHE_DIR,
    DATA_CACHE_KEEP,
    HospitalSettings,
    load_hospital_data,
)
from shared_models.config import RunConfig
from shared_models.hospitals import simulated_hospital_frames
from shared_models.tasks import get_task
from tests.images_data import write_hospital_folder


@pytest.fixture
def hospital_and_path(tmp_path):
    task = get_task("breast-cancer")
    frames = simulated_hospital_frames(
        task, data_dir="", num_hospitals=3, scheme="iid", alpha=0.5, seed=0
    )
    path = tmp_path / "a.csv"
    task.write_file(frames[0][1], path)
    node = {"data-path": str(path), "hospital": "a", "ledger-dir": str(tmp_path / "state")}
    return HospitalSettings.from_node_config(node), path


def _run(default_cfg, **overrides) -> RunConfig:  # type: ignore[no-untyped-def]
    return RunConfig.from_run_config({**default_cfg, **overrides})


def _new_process() -> None:
    """What a fresh ClientApp process has: no arrays in memory."""
    hospital_data_module._load_file.cache_clear()


def _reads(monkeypatch) -> list[str]:  # type: ignore[no-untyped-def]
    """Record every time a task reads a data file."""
    calls: list[str] = []

    def counting(name):  # type: ignore[no-untyped-def]
        task = get_task(name)

        def read_file(path):  # type: ignore[no-untyped-def]
            calls.append(str(path))
            return task.read_file(path)

        return dataclasses.replace(task, read_file=read_file)

    monkeypatch.setattr(hospital_data_module, "get_task", counting)
    return calls


def test_the_second_message_loads_arrays_not_the_file(hospital_and_path, default_cfg, monkeypatch):
    hospital, path = hospital_and_path
    reads = _reads(monkeypatch)
    first = load_hospital_data(hospital, _run(default_cfg))
    _new_process()
    second = load_hospital_data(hospital, _run(default_cfg))
    assert reads == [str(path)]
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert second.name == "a"
    folder = path.parent / "state" / DATA_CACHE_DIR
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (file,) = folder.glob("*.npz")
    assert stat.S_IMODE(file.stat().st_mode) == 0o600


def test_changed_data_preprocessing_or_split_key_prepare_the_data_again(
    hospital_and_path, default_cfg, monkeypatch
):
    hospital, path = hospital_and_path
    reads = _reads(monkeypatch)
    before = load_hospital_data(hospital, _run(default_cfg))
    _new_process()
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-5]))  # five patients fewer
    after = load_hospital_data(hospital, _run(default_cfg))
    assert len(reads) == 2 and after.n_train + after.n_test == before.n_train + before.n_test - 5
    _new_process()
    load_hospital_data(hospital, _run(default_cfg, **{"task.preprocessing": "default"}))
    assert len(reads) == 2  # same preprocessing (the default): cached
    _new_process()
    key = path.parent / "state" / "split.key"
    key.write_bytes(os.urandom(len(key.read_bytes())))
    load_hospital_data(hospital, _run(default_cfg))
    assert len(reads) == 3


def test_a_damaged_cache_file_is_prepared_again_and_old_versions_are_pruned(
    hospital_and_path, default_cfg, monkeypatch
):
    hospital, path = hospital_and_path
    reads = _reads(monkeypatch)
    expected = load_hospital_data(hospital, _run(default_cfg))
    folder = path.parent / "state" / DATA_CACHE_DIR
    (file,) = folder.glob("*.npz")
    file.write_bytes(b"not an npz")
    _new_process()
    again = load_hospital_data(hospital, _run(default_cfg))
    np.testing.assert_array_equal(again.x_train, expected.x_train)
    assert len(reads) == 2 and np.load(file)["x_train"].shape == expected.x_train.shape
    for i in range(DATA_CACHE_KEEP + 2):  # new data versions
        _new_process()
        path.write_text(path.read_text() + "")
        os.utime(path, ns=(i + 1, i + 1))
        load_hospital_data(hospital, _run(default_cfg))
    assert len(list(folder.glob("*.npz"))) == DATA_CACHE_KEEP


def test_an_image_folder_with_scattering_is_transformed_once(tmp_path, default_cfg, monkeypatch):
    """chest-xray with the DP preset's scatter-28: the scattering transform of every image is the
    expensive part of a message; it runs for the first message only."""
    from shared_models.tasks import images

    write_hospital_folder(tmp_path / "a", 24, seed=0)
    node = {
        "data-path": str(tmp_path / "a"),
        "hospital": "a",
        "ledger-dir": str(tmp_path / "state"),
    }
    hospital = HospitalSettings.from_node_config(node)
    calls = []
    original = images.scattering
    monkeypatch.setattr(images, "scattering", lambda x, p: calls.append(p) or original(x, p))
    run = _run(
        default_cfg, **{"task.name": "chest-xray", "task.preprocessing": "scatter-28",
                        "model.name": "scatter-linear"},
    )  # fmt: skip
    first = load_hospital_data(hospital, run)
    _new_process()
    second = load_hospital_data(hospital, run)
    assert calls == ["scatter-28"]
    np.testing.assert_array_equal(first.x_train, second.x_train)
    assert first.x_train.shape[1:] == (81, 7, 7)


def test_the_data_stamp_is_the_same_in_every_process(tmp_path):
    """Each message runs in a new process: a stamp that depended on the process (Python's
    randomised ``hash`` of the file names) would miss the cache every time."""
    import subprocess
    import sys

    write_hospital_folder(tmp_path / "a", 4, seed=0)
    code = f"from pathlib import Path; from client.hospital_data import _stamp; print(_stamp(Path({str(tmp_path / 'a')!r})))"
    stamps = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }  # fmt: skip
    assert len(stamps) == 1 and len(stamps.pop().strip()) == 64


def test_a_killed_writers_partial_file_is_removed_and_a_live_ones_kept(
    hospital_and_path, default_cfg
):
    """A writer killed mid-write leaves ``.<name>.<pid>.tmp`` (patient data): the next write
    removes it; a partial file of a process still writing stays."""
    hospital, path = hospital_and_path
    folder = path.parent / "state" / DATA_CACHE_DIR
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = folder / f".{'0' * 64}.npz.{dead.pid}.tmp"
    writing = folder / f".{'1' * 64}.npz.{os.getpid()}.tmp"
    stray = folder / ".x.tmp"  # no process id: removed, and no message fails on it
    for partial in (killed, writing, stray):
        partial.write_bytes(b"half an npz")
    load_hospital_data(hospital, _run(default_cfg))
    assert not killed.exists() and writing.exists() and not stray.exists()
    assert len(list(folder.glob("*.npz"))) == 1  # and the cache was written


def test_a_daemon_of_an_older_fedcare_is_named_by_its_site_key(tmp_path):
    """`fedcare client start` of an older fedcare writes the hospital's name as node config
    ``site``; the ClientApp comes with the run's bundle, so it reads that key too (else the
    hospital would be named after its data file)."""
    node = {"data-path": str(tmp_path / "x.csv"), "ledger-dir": str(tmp_path / "state")}
    assert HospitalSettings.from_node_config({**node, "site": "a"}).name == "a"
    assert HospitalSettings.from_node_config({**node, "hospital": "b"}).name == "b"
    assert HospitalSettings.from_node_config(node).name == "x"
