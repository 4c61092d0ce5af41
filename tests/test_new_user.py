"""What a new user hit (issue #24), each through the real code path: a task file from anywhere,
missing markers, data-folder mistakes, ICU hospital folders, fast refusals, help and version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from client.client_app import app as client_app
from shared_models.errors import DataWarning
from shared_models.hospitals import simulated_hospital_frames
from shared_models.tasks import TASKS, DataError, TaskFileError, get_task
from shared_models.tasks.images import read_image_folder, read_medmnist
from shared_models.tasks.tabular import task_from_spec
from shared_models.tasks.taskfile import parse_task_text
from simulations import cli
from tests import gbsg2
from tests.handlers import make_context, make_request, run_fedcare_main, use_task_identity

REPO = Path(__file__).resolve().parents[1]


def _fedcare(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    code, out = run_fedcare_main(monkeypatch, capsys, *args)
    return code, " ".join(out.split())


# ----------------------------------------------------------------------------------------------
# 1. a task file from wherever it lives
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def consortium(tmp_path) -> tuple[Path, Path]:
    """``(task file outside the app, data folder with one CSV per hospital)``."""
    folder = tmp_path / "consortium"
    folder.mkdir()
    task_file = folder / "my-task.toml"
    task_file.write_text(gbsg2.TASK.replace('name = "gbsg2"', 'name = "my-task"'))
    data = tmp_path / "data"
    gbsg2.write_hospitals(data)
    return task_file, data


def test_simulate_checks_a_task_file_path_and_ships_its_text(monkeypatch, tmp_path, consortium):
    """``--task PATH``: registered for the command only; its text is the run config's
    ``simulation.task-file`` (what every simulated hospital gets), the checks pass on it."""
    from server.run_config import RunOptions
    from simulations.harness import SimulationRequest, _checked_request, task_argument

    task_file, data = consortium
    monkeypatch.chdir(tmp_path)
    with task_argument("./consortium/my-task.toml") as (name, text):
        assert name == "my-task" and text == task_file.read_text()
        request = SimulationRequest(
            options=RunOptions(task=name, data_dir=str(data), dp=False), hospitals=None,
            out=tmp_path / "run", task_file=text,
        )  # fmt: skip
        cfg, run, hospitals = _checked_request(request)
        assert cfg["simulation.task-file"] == text and run.task.name == "my-task"
        assert [s.name for s in hospitals] == ["bonn", "hamburg", "munich"]
    assert "my-task" not in TASKS  # registered for that command only
    with task_argument(str(REPO / "tasks" / "heart-disease.toml")) as (name, text):
        assert (name, text) == ("heart-disease", "")  # the app's own file: just its name


@pytest.mark.slow
def test_simulate_with_a_task_file_path_on_ray(tmp_path, consortium):
    """The whole command, the hospitals in Ray workers that never saw the task file."""
    task_file, data = consortium
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--task", "./consortium/my-task.toml",
         "--data-dir", str(data), "--no-dp", "--rounds", "1", "--backend", "ray", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "my-task"
    assert [h["name"] for h in summary["hospitals"]] == ["bonn", "hamburg", "munich"]
    sidecar = json.loads((out / "checkpoints" / "round-001.json").read_text())
    assert "my-task" in json.dumps(sidecar)  # the task file's text, saved with the run config


def test_a_simulated_hospital_gets_the_task_file_from_the_run_config(default_cfg, consortium):
    """As in a Ray worker, which never saw the command line: the ClientApp registers the text
    of ``simulation.task-file`` and trains on its partition."""
    task_file, data = consortium
    use_task_identity()
    cfg = {**default_cfg, "task.name": "my-task", "data.dir": str(data),
           "data.partition": "natural", "dp.enabled": False, "train.rounds": 1,
           "simulation.task-file": task_file.read_text()}  # fmt: skip
    ctx = make_context(cfg, {"partition-id": 0, "num-partitions": 3})
    try:
        assert "my-task" not in TASKS  # this process never saw the command line
        from shared_models.models import build_model

        n_features = len(parse_task_text(task_file.read_text()).output_columns("declared"))
        model = build_model("logreg", n_features=n_features)  # the task file's model
        reply = client_app(make_request("train", model), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert reply.content["metrics"]["num-examples"] > 0
    finally:
        TASKS.pop("my-task", None)
        from shared_models import tasks

        tasks._SIMULATION_TASK_TEXTS.pop("my-task", None)


def test_a_deployed_hospital_ignores_a_task_file_in_the_run_config(default_cfg, tmp_path):
    """Hostile coordinator: a deployed hospital (its own data file) runs only its bundle's
    tasks; a task file text in the run config adds none."""
    use_task_identity()
    rows = tmp_path / "bonn.csv"
    gbsg2.gbsg2_frame().to_csv(rows, index=False)
    cfg = {**default_cfg, "task.name": "gbsg2", "dp.enabled": False,
           "simulation.task-file": gbsg2.TASK}  # fmt: skip
    node = {"data-path": str(rows), "hospital": "bonn", "ledger-dir": str(tmp_path / "ledger")}
    from shared_models.models import build_model

    reply = client_app(
        make_request("train", build_model("mlp", n_features=9)), make_context(cfg, node)
    )
    assert reply.has_error() and "unknown task 'gbsg2'" in reply.error.reason
    assert "gbsg2" not in TASKS


def test_client_check_and_task_check_take_a_task_file_anywhere(monkeypatch, capsys, consortium):
    task_file, data = consortium
    code, text = _fedcare(monkeypatch, capsys, "client", "check", "--task", str(task_file),
                          "--data", str(data / "bonn.csv"))  # fmt: skip
    assert code == 0 and "valid task my-task" in text, text
    code, text = _fedcare(monkeypatch, capsys, "task", "check", str(task_file))
    assert (
        code == 0 and f"to simulate: `fedcare simulate --task {task_file} --data-dir DIR`" in text
    )


def test_server_run_refuses_a_task_file_outside_the_bundle(
    monkeypatch, capsys, tmp_path, consortium
):
    task_file, _ = consortium
    code, text = _fedcare(monkeypatch, capsys, "server", "run", "--pki", str(tmp_path / "pki"),
                          "--task", str(task_file))  # fmt: skip
    assert code == 2 and "Traceback" not in text
    assert (
        f"--task {task_file}: a deployment runs only the task files of the approved bundle" in text
    )
    from server.cli import bundle_task_name

    assert bundle_task_name(str(REPO / "tasks" / "heart-disease.toml"), REPO) == "heart-disease"


def test_a_task_file_cannot_take_the_name_of_an_app_task(monkeypatch, capsys, tmp_path):
    copy = tmp_path / "breast-cancer.toml"
    copy.write_text((REPO / "tasks" / "breast-cancer.toml").read_text())
    code, text = _fedcare(monkeypatch, capsys, "simulate", "--task", str(copy),
                          "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 2 and "is a task of the app already; give the task file another name" in text


# ----------------------------------------------------------------------------------------------
# 2. missing markers compare like labels: numbers by value
# ----------------------------------------------------------------------------------------------
_MARKER_TASK = """
[task]
name = "markers"
description = "missing markers"
missing = ["NA"]

[label]
column = "y"
positive = ["1"]
negative = ["0"]

[[feature]]
name = "x"
type = "numeric"
min = 1
max = 10
if-missing = "impute"
missing = [{marker}]
"""


@pytest.mark.parametrize("marker", ['"0"', "0", "0.0", '"-9"'])
def test_missing_markers_match_numerically(marker):
    """``missing = ["0"]`` and ``missing = [0]`` both match a cell ``0.0``, as the label value
    ``"1"`` matches ``1.0``."""
    import pandas as pd

    from shared_models.tasks.table import check_table

    spec = parse_task_text(_MARKER_TASK.format(marker=marker))
    cell = "-9.0" if "9" in marker else "0.0"
    frame = pd.DataFrame({"x": ["2", cell, "3", "4", "5"], "y": ["1.0", "0", "1", "0", "1"]})
    report = check_table(spec, frame, "hospital.csv")
    assert report.ok, report.problems()
    x, _ = task_from_spec(spec).features(frame.assign(label=0.0), "declared")
    assert np.isnan(x[1, 0]) or x[1, 1] == 1.0  # imputed, with its missing indicator


def test_an_out_of_range_value_hints_at_how_markers_match():
    import pandas as pd

    from shared_models.tasks.table import check_table

    spec = parse_task_text(_MARKER_TASK.format(marker='"NA"'))
    frame = pd.DataFrame({"x": ["2", "0", "3", "4", "5"], "y": ["1", "0", "1", "0", "1"]})
    (problem,) = check_table(spec, frame, "hospital.csv").problems()
    assert "column 'x': 1 row(s) outside the valid range [1, 10] (first at data row 2)" in problem
    assert (
        'its missing markers: "NA"; markers are compared as listed: text as written, numbers by value'
        in problem
    )
    assert "\n" not in problem


def test_a_marker_that_is_a_level_is_refused_numerically():
    text = (
        _MARKER_TASK.format(marker="0")
        + '\n[[feature]]\nname = "z"\ntype = "binary"\nmissing = ["0.0"]\n'
    )
    with pytest.raises(
        TaskFileError, match="feature 'z': 'missing' marker '0.0' is also one of the levels"
    ):
        parse_task_text(text)


# ----------------------------------------------------------------------------------------------
# 3. data-folder mistakes: one clear message, every problem at once, nothing dropped silently
# ----------------------------------------------------------------------------------------------
def test_data_dir_pointing_at_a_file_for_an_image_task(monkeypatch, capsys, tmp_path):
    npz = tmp_path / "pneumoniamnist.npz"
    npz.write_bytes(b"not really")
    code, text = _fedcare(monkeypatch, capsys, "simulate", "--task", "chest-xray",
                          "--data-dir", str(npz), "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 2 and "Traceback" not in text
    assert f"{npz} is a file; give the folder that holds it" in text


def test_a_truncated_npz_is_one_message_naming_the_file(tmp_path):
    whole = tmp_path / "whole.npz"
    rng = np.random.default_rng(0)
    arrays = {f"{s}_{k}": (rng.integers(0, 255, (20, 28, 28), dtype=np.uint8) if k == "images"
                           else rng.integers(0, 2, (20, 1))) for s in ("train", "val", "test")
              for k in ("images", "labels")}  # fmt: skip
    np.savez_compressed(whole, **arrays)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(
        DataError, match=rf"^{cut}: not a readable .npz file \(BadZipFile: truncated"
    ):
        read_medmnist(cut)


def test_an_image_folder_check_reports_every_problem_at_once(tmp_path):
    from PIL import Image

    folder = tmp_path / "hospital-b"
    folder.mkdir()
    img = np.full((32, 32), 77, np.uint8)
    for name in ("a.png", "c.png", "extra-1.png", "extra-2.png"):
        Image.fromarray(img).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "labels.csv").write_text(
        "file,label\na.png,0\nbad.png,7\ngone.png,1\nbroken.png,1\na.png,1\nc.png,1\n"
    )
    with pytest.raises(DataError) as err:
        read_image_folder(folder)
    message = str(err.value)
    assert message.startswith("hospital-b: 4 problems: ")
    for part in (
        "hospital-b/labels.csv, line 3 (bad.png): the label is not 0 or 1",
        "hospital-b/labels.csv, line 6: a.png is listed twice",
        "hospital-b/gone.png: listed in labels.csv (line 4) but not found in the folder",
        "hospital-b/broken.png: not a readable image",
    ):
        assert part in message
    assert str(tmp_path) not in message and "\n" not in message
    (folder / "labels.csv").write_text("file,label\na.png,0\nc.png,1\n")
    (folder / "broken.png").unlink()
    with pytest.warns(DataWarning, match=r"hospital-b: 2 file\(s\) not listed in labels.csv are "
                      r"not used \(extra-1.png, extra-2.png\)"):  # fmt: skip
        frame = read_image_folder(folder)
    assert list(frame["file"]) == ["a.png", "c.png"]


def test_client_check_prints_unlisted_images_as_a_warning(monkeypatch, capsys, tmp_path):
    from tests.images_data import write_hospital_folder

    write_hospital_folder(tmp_path / "hospital", 6, seed=0, dicom_every=0)
    (tmp_path / "hospital" / "stray.png").write_bytes(
        (tmp_path / "hospital" / "img-000.png").read_bytes()
    )
    code, text = _fedcare(monkeypatch, capsys, "client", "check", "--task", "chest-xray",
                          "--data", str(tmp_path / "hospital"))  # fmt: skip
    assert code == 0, text
    assert "warning: hospital: 1 file(s) not listed in labels.csv are not used (stray.png)" in text


# ----------------------------------------------------------------------------------------------
# 3 and 4. ICU: hospital folders with the records one level down; outcomes rows without records
# ----------------------------------------------------------------------------------------------
def _real_stays(physionet_dir: Path, n: int) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The first ``n`` record files of set A (name, bytes) and the outcomes header + rows."""
    records = []
    with tarfile.open(physionet_dir / "set-a.tar.gz") as tar:
        outcomes = None
        for member in tar:
            name = Path(member.name).name
            if not member.isfile():
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if name.startswith("Outcomes"):
                outcomes = data.decode().splitlines()
            elif name.endswith(".txt") and len(records) < n:
                records.append((name, data))
            if outcomes is not None and len(records) >= n:
                break
    assert outcomes is not None
    return records, outcomes


def _icu_hospital(folder: Path, sub: str, records, outcomes, *, extra_rows=()) -> None:
    (folder / sub).mkdir(parents=True)
    ids = {name.removesuffix(".txt") for name, _ in records}
    for name, data in records:
        (folder / sub / name).write_bytes(data)
    rows = [r for r in outcomes[1:] if r.split(",")[0] in ids] + list(extra_rows)
    (folder / f"Outcomes-{folder.name}.txt").write_text("\n".join([outcomes[0], *rows]) + "\n")


@pytest.fixture
def icu_federation(tmp_path, physionet_dir, monkeypatch) -> Path:
    """``data/a/Outcomes-a.txt`` + ``data/a/set-a/*.txt`` (and ``b``), from real set A records;
    ``b``'s outcomes file has one row without a record file."""
    monkeypatch.setenv("FEDCARE_CACHE_DIR", str(tmp_path / "cache"))
    records, outcomes = _real_stays(physionet_dir, 60)
    data = tmp_path / "data"
    _icu_hospital(data / "a", "set-a", records[:30], outcomes)
    spare = next(r for r in outcomes[1:] if r.split(",")[0] not in {n[:-4] for n, _ in records})
    _icu_hospital(data / "b", "set-b", records[30:], outcomes, extra_rows=[spare])
    return data


def test_icu_hospital_folders_with_records_one_level_down_simulate(icu_federation, tmp_path):
    from server.run_config import RunOptions
    from simulations.harness import SimulationRequest, _checked_request

    task = get_task("icu-mortality")
    with pytest.warns(DataWarning, match=r"b: 1 row\(s\) of Outcomes-b.txt have no record file"):
        frames = simulated_hospital_frames(task, data_dir=str(icu_federation), num_hospitals=2,
                                       scheme="natural", alpha=0.5, seed=0)  # fmt: skip
    assert [(name, len(f)) for name, f in frames] == [("a", 30), ("b", 30)]
    request = SimulationRequest(
        options=RunOptions(task="icu-mortality", data_dir=str(icu_federation), dp=False),
        hospitals=None, out=tmp_path / "run",
    )  # fmt: skip
    with pytest.warns(DataWarning):
        _, run, hospitals = _checked_request(request)
    assert [s.name for s in hospitals] == ["a", "b"] and run.data.partition == "natural"


def test_client_check_warns_about_outcomes_rows_without_a_record(
    monkeypatch, capsys, icu_federation
):
    code, text = _fedcare(monkeypatch, capsys, "client", "check", "--task", "icu-mortality",
                          "--data", str(icu_federation / "b"))  # fmt: skip
    assert code == 0, text
    assert "warning: b: 1 row(s) of Outcomes-b.txt have no record file (RecordID" in text
    assert "those stays are not used (30 are)" in text


# ----------------------------------------------------------------------------------------------
# 5. mistakes refused before the heavy imports; paths echoed as typed
# ----------------------------------------------------------------------------------------------
_IMPORTS_AFTER_REFUSAL = """
import sys
from simulations import cli
sys.argv = ["fedcare", "simulate", *sys.argv[1:]]
try:
    cli.main()
except SystemExit as exc:
    heavy = [m for m in ("torch", "flwr", "ray", "opacus") if m in sys.modules]
    print("exit", exc.code, "heavy", heavy, file=sys.stderr)
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "breast-cancr"], "unknown task 'breast-cancr'; known tasks: breast-cancer, "),
        (["--task", "heart-disease", "--data-dir", "no/such/link"], "no/such/link: data folder not found"),
        (["--task", "./nowhere/my-task.toml"], "./nowhere/my-task.toml: task file not found"),
    ],
)  # fmt: skip
def test_a_mistake_is_refused_without_importing_torch_or_flower(args, message):
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER_REFUSAL, *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    err = " ".join(result.stderr.split())
    assert "exit 2 heavy []" in err, err
    assert message in err
    if "breast-cancr" in args:
        assert "did you mean 'breast-cancer'?" in err


def test_a_wrong_data_dir_is_echoed_as_typed(monkeypatch, capsys, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    code, text = _fedcare(monkeypatch, capsys, "simulate", "--task", "heart-disease",
                          "--data-dir", str(link / "missing"), "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 2 and f"{link / 'missing'}: data folder not found" in text
    (link / "empty").mkdir()
    code, text = _fedcare(monkeypatch, capsys, "simulate", "--task", "heart-disease",
                          "--data-dir", str(link / "empty"), "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 2 and str(link / "empty") in text and str(real) not in text


# ----------------------------------------------------------------------------------------------
# 6. what label 1 means comes from the data
# ----------------------------------------------------------------------------------------------
def test_positive_class_names_what_label_1_means(tmp_path, pneumonia_dir):
    chest = get_task("chest-xray")
    assert chest.positive_class_for(str(pneumonia_dir)) == "pneumonia"
    other = tmp_path / "breastmnist"
    other.mkdir()
    (other / "breastmnist.npz").write_bytes(b"")
    assert chest.positive_class_for(str(other)) == (
        "class 1 of breastmnist.npz (the file names no classes)"
    )
    assert chest.positive_class_for(str(tmp_path)) == "pneumonia"  # hospital image folders
    breast = get_task("breast-cancer")
    assert breast.positive_class_for("") == "malignant"
    from sklearn.datasets import load_breast_cancer

    ((_, frame),) = breast.load_hospitals("")
    target = load_breast_cancer().target  # scikit-learn: 0 = malignant, 1 = benign
    assert load_breast_cancer().target_names[0] == "malignant"
    np.testing.assert_array_equal(frame["label"].to_numpy(), (target == 0).astype(float))


# ----------------------------------------------------------------------------------------------
# 7. help, defaults, version
# ----------------------------------------------------------------------------------------------
def _help(*args: str) -> str:
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, [*args, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_simulate_help_shows_the_defaults():
    text = _help("simulate")
    assert "Federated rounds (default: the task's recipe; train.rounds = 5 where the task" in text
    assert "(default: fedavg)" in text
    assert "Target ε per hospital for the whole run. (default: 2.0)" in text
    assert "(default: 1e-05)" in text


@pytest.mark.parametrize(
    "command",
    [("client", "start"), ("client", "check"), ("client",), ("server", "run"), ("task", "draft")],
)
def test_help_has_no_sphinx_markup(command):
    text = _help(*command)
    assert ":mod:" not in text and ":func:" not in text and "``" not in text
    if command == ("client", "start"):
        assert "fedcare's launcher (client.launcher) is its SuperExec" in text


def test_version():
    from importlib.metadata import version

    from typer.testing import CliRunner

    result = CliRunner().invoke(cli.app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fedcare {version('fedcare')}"


# ----------------------------------------------------------------------------------------------
# 8. the README shows the fast suite next to the main test command
# ----------------------------------------------------------------------------------------------
def test_readme_shows_the_fast_suite_next_to_the_ci_commands():
    """The Quick start's first two commands are what CI runs (.ci/run), unchanged; the third,
    right after, is the fast suite."""
    quick = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0].strip() for b in quick.split("```bash\n")[1:]]
    ci = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if "&&" in line and not line.startswith(" ")  # not the browser install CI adds if missing
    ]
    assert blocks[:2] == ci
    assert blocks[2] == '. .venv/bin/activate && python -m pytest -m "not slow"'
