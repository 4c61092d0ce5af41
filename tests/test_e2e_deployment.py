"""End-to-end deployment on 127.0.0.1 with real processes: `fedcare server init/start/run`,
three `fedcare client start` hospital daemons (Flower SuperLink + SuperNodes, TLS, node auth).

Every process is bounded in time and stopped by its PID (and process group) at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from server.flwr_cli import CONNECTION, FlowerCLI

pytestmark = pytest.mark.slow
FEDCARE = [sys.executable, "-m", "simulations.cli"]
HOSPITALS = ("a", "b", "c")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    """The user's environment WITHOUT Flower's privacy switches: fedcare must set them itself."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_", "HF_"))}


def _fedcare(
    *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FEDCARE, *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd
    )


def _spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*FEDCARE, *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env=_env(),
        start_new_session=True,
    )


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


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    port = _free_port()
    init = _fedcare(
        "server",
        "init",
        "--out",
        str(root / "pki"),
        *[a for h in HOSPITALS for a in ("--hospital", h)],
    )
    assert init.returncode == 0, init.stdout + init.stderr
    assert oct((root / "pki" / "hospitals" / "a.key").stat().st_mode & 0o777) == "0o600"
    export = _fedcare("simulate", "--export-hospitals", str(root / "data"))
    assert export.returncode == 0, export.stderr
    procs = []
    try:
        server = _spawn("server", "start", "--pki", str(root / "pki"), "--port", str(port),
                        "--state", str(root / "coordinator"), log=root / "server.log")  # fmt: skip
        procs.append(server)
        cli = FlowerCLI(root / "flwr-home", f"127.0.0.1:{port}", root / "pki" / "ca.pem")
        _wait(lambda: (root / "pki" / "registered.json").exists(), 60, root / "server.log")
        clients = {}
        for i, name in enumerate(HOSPITALS, start=1):
            clients[name] = _spawn(
                "client", "start", "--superlink", f"127.0.0.1:{port}", "--ca", str(root / "pki" / "ca.pem"),
                "--key", str(root / "pki" / "hospitals" / f"{name}.key"), "--site", name,
                "--data", str(root / "data" / f"hospital-{i}.csv"), "--port", str(_free_port()),
                "--state", str(root / f"hospital-{name}"), log=root / f"client-{name}.log",
            )  # fmt: skip
            procs.append(clients[name])

        def online() -> bool:
            nodes = cli.json("supernode", "list", CONNECTION)["nodes"]
            return sum(n["status"] == "online" for n in nodes) == len(HOSPITALS)

        _wait(online, 90, root / "client-a.log")
        yield {"root": root, "port": port, "server": server, "clients": clients}
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _wait(condition, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:  # the daemon is still starting
            pass
        time.sleep(1)
    raise AssertionError(f"timed out; log:\n{log.read_text()[-3000:]}")


def test_every_process_runs_without_telemetry(federation):
    """fedcare sets FLWR_TELEMETRY_ENABLED=0 and FLWR_DISABLE_UPDATE_CHECK=1 for every child."""
    checked = 0
    for daemon in (federation["server"], *federation["clients"].values()):
        for child in psutil.Process(daemon.pid).children(recursive=True):
            env = child.environ()
            assert env.get("FLWR_TELEMETRY_ENABLED") == "0", child.cmdline()
            assert env.get("FLWR_DISABLE_UPDATE_CHECK") == "1", child.cmdline()
            checked += 1
    assert checked >= 4  # the SuperLink, three SuperNodes (and their SuperExec processes)


def test_two_rounds_with_dp(federation):
    root = federation["root"]
    run = _fedcare(
        "server", "run", "--superlink", f"127.0.0.1:{federation['port']}", "--pki", str(root / "pki"),
        "--rounds", "2", "--epsilon", "2", "--out", str(root / "run"), timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "round   2/2" in run.stdout
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert sorted(h["name"] for h in summary["hospitals"]) == list(HOSPITALS)
    for h in summary["hospitals"]:
        assert 0 < h["epsilon"] <= 2.0 and h["delta"] == 1e-5 and h["rounds_trained"] == 2
    for name in ("metrics.csv", "report.md", "curves.png", "model.safetensors", "model.json",
                 "checkpoints/round-001.safetensors", "checkpoints/round-002.json"):  # fmt: skip
        assert (root / "run" / name).exists(), name
    status = _fedcare(
        "server",
        "status",
        "--superlink",
        f"127.0.0.1:{federation['port']}",
        "--pki",
        str(root / "pki"),
    )
    assert (
        status.returncode == 0
        and "online" in status.stdout
        and "finished:completed" in status.stdout
    )


def test_unregistered_hospital_is_refused(federation, tmp_path):
    other = tmp_path / "other-pki"
    assert _fedcare("server", "init", "--out", str(other), "--hospital", "rogue").returncode == 0
    root = federation["root"]
    proc = _fedcare(
        "client", "start", "--superlink", f"127.0.0.1:{federation['port']}", "--ca", str(root / "pki" / "ca.pem"),
        "--key", str(other / "hospitals" / "rogue.key"), "--site", "rogue", "--data", str(root / "data" / "hospital-1.csv"),
        "--port", str(_free_port()), "--state", str(tmp_path / "rogue"), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "refused this hospital: its public key is not registered" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wrong_ca_says_certificate_not_verified(federation, tmp_path):
    other = tmp_path / "other-pki"
    assert _fedcare("server", "init", "--out", str(other), "--hospital", "a").returncode == 0
    root = federation["root"]
    proc = _fedcare(
        "client", "start", "--superlink", f"127.0.0.1:{federation['port']}", "--ca", str(other / "ca.pem"),
        "--key", str(root / "pki" / "hospitals" / "a.key"), "--site", "a", "--data", str(root / "data" / "hospital-1.csv"),
        "--port", str(_free_port()), "--state", str(tmp_path / "a2"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "certificate at" in proc.stderr and "could not be verified" in proc.stderr
