"""Per-hospital settings (Flower ``context.node_config``) and loading the hospital's data.

Deployment: ``flower-supernode --node-config 'hospital="cleveland" data-path="/data/x.data"'``.
Simulation: the Simulation Engine injects ``partition-id`` / ``num-partitions``; the hospital is
that partition of the run's data, so one ClientApp serves both modes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared_models.config import RunConfig
from shared_models.files import fsync_folder
from shared_models.hospitals import hospital_from_frame, simulated_hospitals_for
from shared_models.tasks import DataError, HospitalData, get_task
from shared_models.tasks.base import SPLIT_KEY_BYTES

SPLIT_KEY_FILE = "split.key"  # in the hospital's state folder (node config ledger-dir)
DATA_CACHE_DIR = "data-cache"  # in the state folder, mode 0700: preprocessed arrays (see below)
DATA_CACHE_KEEP = 4  # cached data versions kept; the least recently used beyond are deleted


class HospitalSetupError(ValueError):
    """The hospital's own settings (``context.node_config``) are missing or malformed."""


@functools.lru_cache(maxsize=8)
def _parse_run(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_run_config(dict(items))


def simulation_node() -> str | None:
    """The Ray node that runs this simulated hospital's ClientApp (its actor's node id), or None
    outside a Ray worker: the simulation report shows which nodes of a cluster hosted whom."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return str(ray.get_runtime_context().get_node_id())


def run_config_of(context: Any) -> RunConfig:
    """``context.run_config`` parsed once per distinct config: the ClientApp's mods and handlers
    of one message (and the messages of one run) share one parse.

    Raises
    ------
    shared_models.config.ConfigError
        A key is missing, has the wrong type or is out of range.
    """
    return _parse_run(tuple(sorted(context.run_config.items())))


@dataclass(frozen=True)
class HospitalSettings:
    """What one hospital configures for itself (never set by the coordinator).

    Attributes
    ----------
    name : str
        Hospital name shown in reports (deployment: ``hospital``; simulation: from the partition).
    data_path : str
        The hospital's data in the task's format: a file, or a folder (image tasks, ICU record
        files); "" in simulation.
    partition_id, num_partitions : int
        Simulation only (-1 in deployment).
    device : str
        ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ...
    test_fraction : float
        Share of the hospital's data held out for evaluation (0: the task's default). A hospital
        setting: the coordinator cannot choose which patients are tested.
    ledger_dir : str
        The hospital's state folder (privacy ledger, audit log, split key); required at a
        deployed hospital, "" for a simulated one.
    """

    name: str
    data_path: str
    partition_id: int
    num_partitions: int
    device: str
    test_fraction: float = 0.0
    ledger_dir: str = ""

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> HospitalSettings:
        """Parse ``context.node_config``.

        Raises
        ------
        HospitalSetupError
            Neither ``data-path`` nor a simulation ``partition-id`` is set, a deployed hospital
            (``data-path``) has no ``ledger-dir``, or a value has the wrong type.
        """
        try:
            data_path = str(cfg.get("data-path", ""))
            partition_id = int(cfg.get("partition-id", -1))
            num_partitions = int(cfg.get("num-partitions", -1))
            test_fraction = float(cfg.get("test-fraction", 0.0))
        except (TypeError, ValueError) as exc:
            raise HospitalSetupError(f"node config: {exc}") from None
        if not data_path and partition_id < 0:
            raise HospitalSetupError(
                "node config has no 'data-path': start the hospital with "
                '--node-config \'data-path="/path/to/file" hospital="NAME"\''
            )
        if data_path and not cfg.get("ledger-dir"):  # no ledger: no lifetime cap, no replay
            raise HospitalSetupError(  # cache and no secret split key; never run without one
                "node config has no 'ledger-dir': a deployed hospital keeps its privacy ledger, "
                "audit log and split key there (fedcare client start sets it)"
            )
        if test_fraction != 0.0 and not 0.05 <= test_fraction <= 0.9:
            raise HospitalSetupError(
                f"node config test-fraction {test_fraction:g}: use 0.05 to 0.9"
            )
        default_name = Path(data_path).stem if data_path else f"partition-{partition_id}"
        return cls(
            # "site": the key `fedcare client start` of an older fedcare writes
            name=str(cfg.get("hospital", cfg.get("site", default_name))),
            data_path=data_path,
            partition_id=partition_id,
            num_partitions=num_partitions,
            device=str(cfg.get("device", "auto")),
            test_fraction=test_fraction,
            ledger_dir=str(cfg.get("ledger-dir", "")),
        )

    @property
    def simulated(self) -> bool:
        return not self.data_path


def load_hospital_data(hospital: HospitalSettings, run: RunConfig) -> HospitalData:
    """This hospital's preprocessed data (train/test split, scaled with the task's fixed constants).

    A deployed hospital splits with its own ``test-fraction`` and its split key
    (:func:`hospital_split_key`); in simulation the researcher's run config sets them
    (``data.test-fraction``, ``data.split``, and ``data.split-seed`` or else ``train.seed``).

    A deployed hospital prepares each version of its data once: the preprocessed arrays are kept
    in ``<ledger-dir>/data-cache/`` (mode 0700, ``.npz`` read without pickle), keyed by the
    SHA-256 of the task, hospital, data path, the data's stamp (size and mtime of every file), the
    preprocessing, the test fraction, the split key and the source of ``shared_models``; the
    :data:`DATA_CACHE_KEEP` most recently used versions are kept. Later messages load arrays,
    not files (chest-xray with ``scatter-28``: the scattering transform of every image, 5-6 s
    per message on one core, runs once).

    Raises
    ------
    shared_models.tasks.DataError
        The file is missing or malformed (the message names file, line and column), or a
        preprocessed value is not finite.
    HospitalSetupError
        The split key in the state folder is unusable.
    """
    if hospital.simulated:
        hospitals = simulated_hospitals_for(run, hospital.num_partitions)
        return hospitals[hospital.partition_id]
    path = Path(hospital.data_path)
    return _load_file(
        run.task.name, hospital.name, str(path), _stamp(path), run.task.preprocessing,
        hospital.test_fraction, hospital_split_key(hospital), hospital.ledger_dir,
    )  # fmt: skip


def hospital_split_key(hospital: HospitalSettings) -> bytes:
    """The key of a deployed hospital's train/test split (see
    :func:`shared_models.tasks.base.assign_test_records`).

    32 random bytes from the OS CSPRNG, written once to ``<ledger-dir>/split.key`` (mode 0600,
    created atomically: a concurrent first load keeps the first key) and read from there
    afterwards, so each patient stays in the same split for the life of the hospital's data and
    nobody outside the hospital can tell which split a known record is in.

    Raises
    ------
    HospitalSetupError
        The key file exists but does not hold a key (or cannot be read or written).
    """
    if not hospital.ledger_dir:
        raise HospitalSetupError(
            "a deployed hospital needs node config 'ledger-dir' for its split key"
        )
    folder = Path(hospital.ledger_dir)
    path = folder / SPLIT_KEY_FILE
    try:
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{SPLIT_KEY_FILE}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(SPLIT_KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another process made it first: keep theirs
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
            fsync_folder(folder)
        key = path.read_bytes()
    except OSError as exc:
        raise HospitalSetupError(f"the split key {path} cannot be read or written: {exc}") from None
    if len(key) != SPLIT_KEY_BYTES:
        raise HospitalSetupError(
            f"{path} does not hold a {SPLIT_KEY_BYTES}-byte split key; restore it from a backup "
            "(a new key would move patients between the training and test splits)"
        )
    return key


def _stamp(path: Path) -> str:
    """Changes whenever the hospital's data change: a file's size and mtime, or for a data folder
    (image folders, ICU record files) the names, sizes and mtimes of the files in it and one
    level down (a SHA-256, the same in every process)."""
    if not path.exists():
        return "absent"
    files = [path] if path.is_file() else [*path.glob("*"), *path.glob("*/*")]
    entries = sorted(
        (str(p.relative_to(path)) if p != path else "", st.st_size, st.st_mtime_ns)
        for p in files
        if p.is_file() and (st := p.stat())
    )
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


@functools.cache
def _code_digest() -> str:
    """SHA-256 of the source of the code that reads and preprocesses data (``shared_models``,
    as loaded: the approved bundle's copy in a deployment), so that a new bundle never reads
    arrays an older one prepared."""
    import shared_models

    root = Path(shared_models.__file__).parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _load_file(
    task_name: str,
    hospital: str,
    path: str,
    stamp: str,
    preprocessing: str,
    test_fraction: float,
    split_key: bytes,
    state_dir: str,
) -> HospitalData:
    """The hospital's data, from the state folder's data cache when this data version was prepared
    before by the same code with the same preprocessing and split, else read, preprocessed,
    checked and cached (see :func:`load_hospital_data`)."""
    key = hashlib.sha256(
        json.dumps(
            [task_name, hospital, path, stamp, preprocessing, test_fraction, _code_digest()]
        ).encode()
        + split_key
    ).hexdigest()
    folder = Path(state_dir) / DATA_CACHE_DIR
    if (cached := _read_cached(folder / f"{key}.npz", hospital)) is not None:
        return cached
    task = get_task(task_name)
    frame = task.read_file(Path(path))
    data = hospital_from_frame(
        task, hospital, frame, preprocessing=preprocessing, test_fraction=test_fraction,
        split_key=split_key,
    )  # fmt: skip
    for split, x in (("training", data.x_train), ("test", data.x_test)):
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise DataError(
                f"{path}: {int(bad.sum())} example(s) of the {split} split have a non-finite "
                f"value after preprocessing; run `fedcare client check --task {task_name} --data "
                f"{path}`"
            )
    _write_cached(folder, f"{key}.npz", data)
    return data


_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _read_cached(file: Path, hospital: str) -> HospitalData | None:
    """The cached arrays (``np.load`` without pickle), or None when absent or unreadable (then
    the data are prepared again and the file rewritten)."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in _ARRAYS}
        os.utime(file)  # most recently used
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return HospitalData(name=hospital, **arrays)


def _write_cached(folder: Path, name: str, data: HospitalData) -> None:
    """Write ``name`` atomically (a temporary file, then rename) into ``folder`` (created mode
    0700, the file 0600) and keep the :data:`DATA_CACHE_KEEP` most recently used files. A cache
    that cannot be written is skipped: the next message prepares the data again."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **{a: getattr(data, a) for a in _ARRAYS})
            os.replace(tmp, folder / name)
        finally:  # a failed write (disk full) leaves no partial file of patient data
            tmp.unlink(missing_ok=True)
        files = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in files[DATA_CACHE_KEEP:]:
            old.unlink(missing_ok=True)
        for partial in folder.glob(".*.tmp"):  # left by a writer that was killed: patient data
            if not _alive(partial.name.rsplit(".", 2)[-2]):
                partial.unlink(missing_ok=True)
    except OSError:
        return


def _alive(pid: str) -> bool:
    """Whether the process ``pid`` (the text before ``.tmp`` in a temporary file's name) runs;
    False for a name without a process id."""
    try:
        number = int(pid)
        if number <= 0:
            return False
        os.kill(number, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True
