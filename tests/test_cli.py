"""`fedcare simulate` on bad input: one clear message, exit code 2, no traceback."""

from __future__ import annotations

import sys

import pytest

from shared_models.tasks import TASKS
from simulations import cli


def _run(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["fedcare", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    captured = capsys.readouterr()
    return int(exc.value.code), captured.out + captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nope"], f"unknown task 'nope'; known tasks: {', '.join(sorted(TASKS))}"),
        (["--task", "heart-disease"], "task heart-disease needs --data-dir"),
        (["--task", "heart-disease", "--data-dir", "/does/not/exist"], "/does/not/exist: data folder not found"),
        (["--epsilon", "0"], "--epsilon must be a positive number (got 0)"),
        (["--epsilon", "-1"], "--epsilon must be a positive number (got -1)"),
        (["--hospitals", "0"], "--hospitals must be at least 1 (got 0)"),
        (["--hospitals", "600"], "600 hospitals for 569 patients"),
        (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'"),
        (["--run-config", "train.nope=1"], "unknown key(s) ['train.nope']"),
        # the options set these whatever --run-config says: refused instead of silently dropped
        (["--run-config", "task.name='chest-xray'"], "--run-config sets task.name (use --task)"),
        (["--run-config", "dp.enabled=false train.seed=3"], "sets dp.enabled (use --no-dp to switch DP off), train.seed (use --seed)"),
        (["--run-config", "train.lr=-1"], "'train.lr' = -1.0 is outside (0.0, 100.0]"),
        (["--delta", "0.01"], "is not below 1/n"),
        (["--epsilon", "1", "--no-dp"], "--epsilon and --no-dp exclude each other"),
        (["--backend", "ray", "--delta", "0.01"], "is not below 1/n"),  # Ray starts, then stops
        (["--backend", "in-process", "--cpus-per-hospital", "2"], "--cpus-per-hospital needs --backend ray"),
    ],
)  # fmt: skip
def test_bad_input_gives_one_clear_message(monkeypatch, capsys, tmp_path, args, message):
    code, output = _run(monkeypatch, capsys, "simulate", *args, "--out", str(tmp_path / "run"))
    assert code == 2
    assert message in " ".join(output.split())
    assert "Traceback" not in output
    assert not (tmp_path / "run").exists()  # nothing half-written
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()  # a Ray started beside the checks is stopped


def test_malformed_heart_file_names_file_and_line(monkeypatch, capsys, tmp_path, heart_dir):
    data = tmp_path / "data"
    data.mkdir()
    for hospital in ("cleveland", "hungarian", "switzerland", "va"):
        text = (heart_dir / f"processed.{hospital}.data").read_text()
        if hospital == "va":
            lines = text.splitlines()
            lines[9] = lines[9].replace(",", ",abc,", 1)  # 15 columns on line 10
            text = "\n".join(lines) + "\n"
        (data / f"processed.{hospital}.data").write_text(text)
    code, output = _run(monkeypatch, capsys, "simulate", "--task", "heart-disease",
                        "--data-dir", str(data), "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 2
    flat = " ".join(output.split())
    assert "processed.va.data, line 10: expected 14 comma-separated values" in flat
    assert "found 15" in flat and "Traceback" not in output


def test_existing_run_folder_is_never_overwritten(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    code, output = _run(monkeypatch, capsys, "simulate", "--out", str(out))
    assert code == 2 and "exists and is not empty" in output
    assert (out / "summary.json").read_text() == "{}"


def test_a_command_ending_in_failure_exits_nonzero(monkeypatch, capsys, tmp_path):
    """A command that stops with typer.Exit(n) exits n (typer, run with standalone_mode=False,
    returns n instead of raising it): here an approval declined at a terminal, which records
    nothing."""
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    code, output = _run(
        monkeypatch, capsys, "client", "approve", "--ledger", str(tmp_path / "ledger")
    )
    assert code == 1 and "not approved" in output
    assert not (tmp_path / "ledger" / "approved.json").exists()


def test_gpu_share_is_checked_before_anything_starts(monkeypatch, capsys, tmp_path):
    import torch

    code, output = _run(monkeypatch, capsys, "simulate", "--gpus-per-hospital", "2",
                        "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 2 and "--gpus-per-hospital must be in [0, 1] (got 2)" in output
    if not torch.cuda.is_available():
        code, output = _run(monkeypatch, capsys, "simulate", "--gpus-per-hospital", "0.25",
                            "--out", str(tmp_path / "run"))  # fmt: skip
        assert code == 2 and "--gpus-per-hospital needs a CUDA GPU" in " ".join(output.split())
    assert not (tmp_path / "run").exists()


def test_chest_xray_without_data_dir_says_what_to_give(monkeypatch, capsys, tmp_path):
    code, output = _run(monkeypatch, capsys, "simulate", "--task", "chest-xray",
                        "--out", str(tmp_path / "run"))  # fmt: skip
    assert code == 2
    assert "task chest-xray needs --data-dir: a folder with one MedMNIST .npz file" in " ".join(
        output.split()
    )
