"""Approved app bundles: `fedcare client approve`, the approved list, the launcher's refusal text.

The bundles are built with Flower's own builder from a copy of the fedcare app (exactly the files
its FAB contains); nothing here executes a bundle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from client.approval import ApprovalError, ApprovedBundles, fab_bytes, inspect_fab, task_names
from server.run_config import APP_DIR
from shared_models.tasks import TASKS
from tests.handlers import run_fedcare_main, unpack_app


@pytest.fixture(scope="module")
def app_copy(tmp_path_factory) -> Path:
    """The files of the fedcare FAB, unpacked into a fresh folder (a second copy of the app)."""
    return unpack_app(tmp_path_factory.mktemp("app") / "fedcare")


def _fedcare(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    return run_fedcare_main(monkeypatch, capsys, *args)


def _change_one_line(app: Path, dst: Path) -> Path:
    """A copy of ``app`` with one line of client/training.py changed."""
    import shutil

    shutil.copytree(app, dst)
    path = dst / "client" / "training.py"
    lines = path.read_text().splitlines(keepends=True)
    lines[0] = lines[0].rstrip("\n") + "  # changed\n"
    path.write_text("".join(lines))
    return dst


def test_approve_records_the_hash_and_is_idempotent(monkeypatch, capsys, tmp_path, app_copy):
    expected = inspect_fab(fab_bytes(app_copy)).sha256
    ledger = tmp_path / "ledger"
    code, out = _fedcare(monkeypatch, capsys, "client", "approve", "--ledger", str(ledger),
                         str(app_copy), "--yes")  # fmt: skip
    assert code == 0, out
    assert expected in out and ", ".join(sorted(TASKS)) in out and "client/client_app.py" in out
    entries = json.loads((ledger / "approved.json").read_text())["approved"]
    assert [e["sha256"] for e in entries] == [expected]
    assert entries[0]["tasks"] == sorted(TASKS)
    code, out = _fedcare(monkeypatch, capsys, "client", "approve", "--ledger", str(ledger),
                         str(app_copy), "--yes")  # fmt: skip
    assert code == 0 and "already approved" in out
    assert len(json.loads((ledger / "approved.json").read_text())["approved"]) == 1
    code, out = _fedcare(
        monkeypatch, capsys, "client", "approve", "--ledger", str(ledger), "--list"
    )
    assert code == 0 and expected in out


def test_approve_without_a_terminal_needs_yes(monkeypatch, capsys, tmp_path, app_copy):
    """In a script (stdin not a terminal), approve without --yes approves nothing and says how:
    it once asked [y/N], read end-of-file, printed "aborted" and exited 130."""
    import io

    ledger = tmp_path / "ledger"
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # a pipe, even one that says y
    code, out = _fedcare(
        monkeypatch, capsys, "client", "approve", "--ledger", str(ledger), str(app_copy)
    )
    out = " ".join(out.split())
    assert code == 2 and "not approved: there is no terminal to ask on" in out, out
    assert f"`fedcare client approve --ledger {ledger} {app_copy} --yes`" in out
    assert "sha256" in out and not (ledger / "approved.json").exists()
    code, out = _fedcare(
        monkeypatch, capsys, "client", "approve", "--ledger", str(ledger), str(app_copy), "--yes"
    )
    assert code == 0 and (ledger / "approved.json").exists(), out


def test_a_copy_of_the_app_has_the_app_hash(app_copy):
    """The FAB is deterministic: the same files give the same hash (what `flwr run` submits)."""
    assert fab_bytes(app_copy) == fab_bytes(APP_DIR)


def test_the_fab_is_flowers_own_build_of_the_checkout():
    """fedcare builds the FAB without walking .venv (shared_models.fab): the bytes are those of
    Flower's ``build_fab_from_disk``, which ``flwr run`` uses, on the checkout as installed."""
    from flwr.cli.build import build_fab_from_disk

    assert fab_bytes(APP_DIR) == build_fab_from_disk(APP_DIR)


def test_app_files_are_flowers_files_after_its_exclude_patterns(tmp_path, app_copy):
    """Every kind of path Flower's walk meets: folders excluded whatever their content (.venv,
    .flwr at the top; __pycache__ anywhere), a nested .venv (kept by Flower), symlinked files
    and folders (skipped), a .gitignore'd folder (walked, then dropped by Flower's filter)."""
    import shutil

    from flwr.cli.utils import build_pathspec, collect_files
    from flwr.supercore.constant import APP_PUBLISH_EXCLUDE_PATTERNS

    from shared_models.fab import app_files, build_fab

    app = tmp_path / "app"
    shutil.copytree(app_copy, app)
    for rel in (".venv/lib/hospital.py", ".flwr/config.toml", "__pycache__/x.py",
                "client/__pycache__/y.py", "client/.venv/kept.py", "runs/r1/summary.json",
                "client/deep/er/z.py"):  # fmt: skip
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text("x = 1\n")
    (app / ".gitignore").write_text("runs/\n")
    (app / "linked.py").symlink_to(app / "client" / "deep" / "er" / "z.py")
    (app / "client" / "linked-dir").symlink_to(app / "client" / "deep", target_is_directory=True)
    (app / "outside").symlink_to(tmp_path, target_is_directory=True)
    excluded = build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS)
    flower = {k: v for k, v in collect_files(app.resolve()).items() if not excluded.match_file(k)}
    ours = app_files(app)
    assert ours == flower
    assert "client/.venv/kept.py" in ours and "runs/r1/summary.json" in ours
    assert not any(k.startswith((".venv/", ".flwr/", "__pycache__/")) for k in ours)
    from flwr.cli.build import build_fab_from_disk

    assert build_fab(app) == build_fab_from_disk(app)


def test_the_bundle_holds_only_the_apps_code_and_defaults():
    """Tests, benchmarks, the simulation harness, README and CI files stay out of what hospitals
    approve and run (``fab-include`` in pyproject.toml, applied by Flower's builder); the task
    files are in, so the tasks hospitals approve are the tasks that run."""
    files = [f.split(" (")[0] for f in inspect_fab(fab_bytes(APP_DIR)).files]
    assert "pyproject.toml" in files and "client/client_app.py" in files
    assert "server/server_app.py" in files and "shared_models/tasks/tabular.py" in files
    assert {f.split("/")[0] for f in files} == {
        "pyproject.toml",
        "client",
        "server",
        "shared_models",
        "tasks",
    }
    assert {"tasks/breast-cancer.toml", "tasks/heart-disease.toml"} <= set(files)
    assert all(
        f == "pyproject.toml" or f.endswith(".py") or f.startswith("tasks/") for f in files
    ), files


def test_one_changed_line_changes_the_hash(tmp_path, app_copy):
    changed = _change_one_line(app_copy, tmp_path / "changed")
    assert inspect_fab(fab_bytes(changed)).sha256 != inspect_fab(fab_bytes(app_copy)).sha256


def test_approval_keeps_earlier_entries(tmp_path, app_copy):
    approved = ApprovedBundles(tmp_path)
    first = inspect_fab(fab_bytes(app_copy))
    second = inspect_fab(fab_bytes(_change_one_line(app_copy, tmp_path / "changed")))
    assert approved.approve(first, source="a") and approved.approve(second, source="b")
    assert [e["sha256"] for e in approved.entries()] == [first.sha256, second.sha256]
    assert approved.is_approved(first.sha256) and not approved.is_approved("0" * 64)


@pytest.mark.parametrize("content", ['{"approved": [', '{"approved": [{"sha256": "abc"}]}', "[]"])
def test_corrupted_list_is_an_error_naming_the_file_and_never_reset(
    monkeypatch, capsys, tmp_path, app_copy, content
):
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    (ledger / "approved.json").write_text(content)
    code, out = _fedcare(monkeypatch, capsys, "client", "approve", "--ledger", str(ledger),
                         str(app_copy), "--yes")  # fmt: skip
    assert code == 2
    assert f"{ledger / 'approved.json'} is unreadable" in " ".join(out.split())
    assert "never reset" in out and "Traceback" not in out
    assert (ledger / "approved.json").read_text() == content
    with pytest.raises(ApprovalError, match="approved.json is unreadable"):
        ApprovedBundles(ledger).is_approved("0" * 64)


def test_task_list_comes_out_without_importing_the_bundle(tmp_path, app_copy):
    import shutil

    evil = tmp_path / "evil"
    shutil.copytree(app_copy, evil)
    tasks = evil / "shared_models" / "tasks" / "tabular.py"
    marker = tmp_path / "imported"
    tasks.write_text(f"open({str(marker)!r}, 'w').write('x')\n" + tasks.read_text())
    info = inspect_fab(fab_bytes(evil))
    assert info.tasks == sorted(TASKS)
    assert not marker.exists()  # the module was parsed, never executed
    assert task_names("TASKS: dict = {'a': 1, 'b': 2}\n") == ["a", "b"]
    assert task_names("x = 1\n") == []


def test_not_a_bundle_is_one_clear_message(monkeypatch, capsys, tmp_path):
    bogus = tmp_path / "app.fab"
    bogus.write_bytes(b"not a zip")
    code, out = _fedcare(monkeypatch, capsys, "client", "approve", "--ledger", str(tmp_path / "l"),
                         str(bogus), "--yes")  # fmt: skip
    assert code == 2 and "not a Flower app bundle" in out and "Traceback" not in out
    assert not (tmp_path / "l" / "approved.json").exists()


def test_start_refuses_without_an_approved_bundle(monkeypatch, capsys, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = tmp_path / "a.key"
    key.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    for name in ("ca.pem", "data.csv"):
        (tmp_path / name).write_text("x")
    code, out = _fedcare(
        monkeypatch, capsys, "client", "start", "--superlink", "127.0.0.1:1", "--ca",
        str(tmp_path / "ca.pem"), "--key", str(key), "--hospital", "a", "--data",
        str(tmp_path / "data.csv"), "--state", str(tmp_path / "state"),
    )  # fmt: skip
    flat = " ".join(out.split())
    assert code == 2 and "no approved app bundle in" in flat
    assert "fedcare client approve --ledger" in flat and "Traceback" not in out


def test_refusal_reason_is_what_the_coordinator_parses():
    from client.launcher import bundle_refusal
    from shared_models.protocol import parse_refusal

    reason = bundle_refusal("a", "f" * 64)
    hospital, why = parse_refusal(reason)
    assert hospital == "a" and "f" * 64 in why and "not approved" in why
    assert parse_refusal("something else: refused") is None
    # the launcher of a hospital on an older fedcare said "site"; its name is still read
    assert parse_refusal("site b refused: app bundle x is not approved here") == (
        "b",
        "app bundle x is not approved here",
    )
    assert (
        parse_refusal("hospital  refused: x") is None
        and parse_refusal("site a b refused: x") is None
    )


def test_the_launcher_stops_on_sigterm_while_its_supernode_is_gone(tmp_path):
    """A SuperNode that is gone makes Flower's client retry forever: SIGTERM (or the parent's
    death) must still stop the launcher, or it outlives `fedcare client start`."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "ledger").mkdir()
    log = tmp_path / "launcher.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "client.launcher", "--runtime-api-address", f"127.0.0.1:{port}",
             "--ledger", str(tmp_path / "ledger"), "--hospital", "a", "--executor", "subprocess"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "retrying in" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "retrying in" in log.read_text(), log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
        assert "launcher for hospital a: stopped" in log.read_text()
    finally:
        proc.kill()


def test_an_unreadable_approval_list_refuses_without_sending_its_path(tmp_path, monkeypatch):
    """The refusal's text reaches the coordinator: it names the category only; the exception
    (with the ledger folder's path) goes to the hospital's audit log. The real transport of the
    refusal is covered end to end in tests/test_e2e_deployment.py; here it is recorded."""
    from types import SimpleNamespace

    import client.launcher as launcher

    ledger = tmp_path / "ward-7" / "ledger"
    ledger.mkdir(parents=True)
    (ledger / "approved.json").write_text('{"approved": [{"sha256": "x"}]}')  # a bad hand edit
    sent: list[str] = []
    monkeypatch.setattr(launcher, "refuse_task", lambda address, token, reason: sent.append(reason))
    plugin = launcher.ApprovedBundlePlugin(
        "127.0.0.1:1", ledger=ledger, hospital="a", executor=SimpleNamespace()
    )
    plugin.launch_task(token="t", task=SimpleNamespace(fab_hash="ab" * 32, run_id=1, task_id=2))
    assert "cannot be checked (the approved-bundles list is unreadable)" in sent[0]
    assert "ward-7" not in sent[0] and str(tmp_path) not in sent[0]
    assert "ward-7" in (ledger / "audit.jsonl").read_text()  # the detail stays at the hospital
