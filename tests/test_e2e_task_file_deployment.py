"""Acceptance (#13): a deployment whose task is a task file that is not built in.

Real processes on 127.0.0.1: `fedcare server init/start/run` and two `fedcare client start`
hospital daemons (Flower SuperLink + SuperNodes, TLS, node authentication). The app submitted
is a copy of fedcare with ``tasks/gbsg2.toml`` added (GBSG2 from the lifelines wheel); both
hospitals approve that bundle and check their CSV against the task file before starting
(`client start --task`). A run trains on the new task with DP. Then one range of the task
file changes: the bundle's hash changes, and both hospitals, which approved the old bundle,
refuse the new one. Every process is bounded in time and stopped by its process group.

Self-contained on purpose (it shares no harness with test_e2e_deployment.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import gbsg2
from tests.handlers import unpack_app

pytestmark = pytest.mark.slow
HOSPITALS = ("bonn", "hamburg")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fedcare(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", *args],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # anything left in the daemon's group
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_for(condition, log: Path, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out; log:\n{log.read_text()[-3000:]}")


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _online(port: int, ca: Path, home: Path) -> int:
    from server.flwr_cli import CONNECTION, FlowerCLI

    cli = FlowerCLI(home, f"127.0.0.1:{port}", ca)
    try:
        return sum(
            n["status"] == "online" for n in cli.json("supernode", "list", CONNECTION)["nodes"]
        )
    except Exception:  # the coordinator is still starting
        return 0


def test_task_file_deployment_and_changed_range_refused(tmp_path):
    from client.approval import fab_bytes, inspect_fab

    root = tmp_path
    app = unpack_app(root / "app")
    (app / "tasks" / "gbsg2.toml").write_text(gbsg2.TASK)
    paths = gbsg2.write_hospitals(root / "data")
    port = _free_port()
    internal = _free_port()
    init = _fedcare(
        "server", "init", "--out", str(root / "pki"), "--demo-hospitals", ",".join(HOSPITALS)
    )
    assert init.returncode == 0, init.stdout + init.stderr
    for h in HOSPITALS:
        ok = _fedcare("client", "approve", "--ledger", str(root / h / "ledger"), str(app), "--yes")
        assert ok.returncode == 0 and re.search(r"tasks   .*\bgbsg2\b", ok.stdout), ok.stdout
    procs = []
    try:
        procs.append(_spawn("server", "start", "--pki", str(root / "pki"), "--port", str(port),
                            "--internal-port", str(internal), "--state", str(root / "coordinator"),
                            log=root / "server.log"))  # fmt: skip
        _wait_for(lambda: "fedcare coordinator listening" in (root / "server.log").read_text(),
                  root / "server.log", 90)  # fmt: skip
        for h in HOSPITALS:
            procs.append(_spawn(
                "client", "start", "--superlink", f"127.0.0.1:{port}", "--ca", str(root / "pki" / "ca.pem"),
                "--key", str(root / "demo-hospitals" / h / f"{h}.key"), "--hospital", h, "--data", str(paths[h]),
                "--task", str(app / "tasks" / "gbsg2.toml"), "--port", str(_free_port()),
                "--state", str(root / h), log=root / f"client-{h}.log",
            ))  # fmt: skip
        ca, home = root / "pki" / "ca.pem", root / "flwr-home"
        _wait_for(  # each daemon says it connected (cheap), then the SuperLink's view (`flwr`)
            lambda: (
                all("SuperNode ID:" in _read(root / h / "supernode.log") for h in HOSPITALS)
                and _online(internal, ca, home) == len(HOSPITALS)
            ),
            root / "client-bonn.log",
            120,
        )
        for h in HOSPITALS:  # each hospital's data passed the task file's check before starting
            assert "valid task gbsg2" in " ".join((root / f"client-{h}.log").read_text().split())

        run = _fedcare(
            "server", "run", "--superlink", f"127.0.0.1:{internal}", "--pki", str(root / "pki"),
            "--task", "gbsg2", "--rounds", "2", "--epsilon", "2", "--out", str(root / "run"),
            "--app", str(app), timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        summary = json.loads((root / "run" / "summary.json").read_text())
        assert summary["task"] == "gbsg2" and not summary["failures"], summary["failures"]
        for h in summary["hospitals"]:
            assert h["rounds_trained"] == 2 and 0 < h["epsilon"] <= 2.0
        # the task file ran at the hospital from the approved bundle Flower installed there
        installed = list((root / "bonn" / "flwr-home" / "apps").glob("*/tasks/gbsg2.toml"))
        assert installed and installed[0].read_text() == gbsg2.TASK

        # one range changes: another bundle, which no hospital approved
        changed = root / "app-changed"
        shutil.copytree(app, changed)
        text = gbsg2.TASK.replace("max = 200", "max = 250")
        assert text != gbsg2.TASK
        (changed / "tasks" / "gbsg2.toml").write_text(text)
        old_hash = inspect_fab(fab_bytes(app)).sha256
        new_hash = inspect_fab(fab_bytes(changed)).sha256
        assert new_hash != old_hash
        refused = _fedcare(
            "server", "run", "--superlink", f"127.0.0.1:{internal}", "--pki", str(root / "pki"),
            "--task", "gbsg2", "--rounds", "1", "--epsilon", "2", "--out", str(root / "run-changed"),
            "--app", str(changed), timeout=300,
        )  # fmt: skip
        output = " ".join(refused.stdout.split())
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert (
            "trained nothing" in output and f"app bundle {new_hash} is not approved here" in output
        )
        failures = json.loads((root / "run-changed" / "summary.json").read_text())["failures"]
        assert {f["hospital"] for f in failures} == set(HOSPITALS)
    finally:
        for proc in reversed(procs):
            _stop(proc)
