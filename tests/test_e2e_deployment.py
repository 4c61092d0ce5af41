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

import pandas as pd
import psutil
import pytest
import torch
from safetensors.torch import load_file

from server.flwr_cli import CONNECTION, FlowerCLI
from tests.handlers import unpack_app

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


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
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
    # the app as of now (edits to the checkout during the tests do not change what runs), which
    # each hospital approves before its daemon may start
    app = unpack_app(root / "app")
    approvals = [subprocess.Popen([*FEDCARE, "client", "approve", "--ledger", str(root / f"hospital-{h}" / "ledger"), str(app), "--yes"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env()) for h in HOSPITALS]  # fmt: skip
    for proc in approvals:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    procs: list[subprocess.Popen[bytes]] = []
    state: dict = {"server": None}
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
        state = {"root": root, "port": port, "server": server, "clients": clients, "app": app}
        yield state
    finally:
        procs.append(state["server"])  # a test may have restarted the coordinator
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
        "--rounds", "2", "--epsilon", "2", "--out", str(root / "run"), "--app", str(federation["app"]),
        timeout=600,
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


def test_secure_aggregation_over_the_network(federation):
    """SecAgg+ between real SuperNodes: four protocol stages per round through the SuperLink; the
    hospitals' audit logs show that only masked vectors left them."""
    root = federation["root"]
    run = _fedcare(
        "server", "run", "--superlink", f"127.0.0.1:{federation['port']}", "--pki", str(root / "pki"),
        "--rounds", "1", "--out", str(root / "run-secagg"), "--app", str(federation["app"]),
        "--run-config", 'secagg.enabled=true model.name="logreg"', timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((root / "run-secagg" / "summary.json").read_text())
    assert summary["secure_aggregation"]["enabled"] and not summary["failures"], summary
    assert all(h["rounds_trained"] == 1 and h["epsilon"] is not None for h in summary["hospitals"])
    for h in HOSPITALS:
        audit = [json.loads(x) for x in (root / f"hospital-{h}" / "ledger" / "audit.jsonl").open()]
        stages = [
            e["secagg_stage"] for e in audit if e.get("direction") == "sent" and "secagg_stage" in e
        ]
        assert stages[-4:] == ["setup", "share_keys", "collect_masked_vectors", "unmask"]
        sent = [e for e in audit if e.get("direction") == "sent" and "secagg_stage" in e]
        assert all(e["records"].get("arrays", 0) == 0 for e in sent)


def _approved_state(federation, state: Path) -> Path:
    """A hospital state folder whose ledger approves the app (copied from hospital a)."""
    (state / "ledger").mkdir(parents=True)
    approved = federation["root"] / "hospital-a" / "ledger" / "approved.json"
    (state / "ledger" / "approved.json").write_bytes(approved.read_bytes())
    return state


def test_unregistered_hospital_is_refused(federation, tmp_path):
    other = tmp_path / "other-pki"
    assert _fedcare("server", "init", "--out", str(other), "--hospital", "rogue").returncode == 0
    root = federation["root"]
    _approved_state(federation, tmp_path / "rogue")
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
    _approved_state(federation, tmp_path / "a2")
    proc = _fedcare(
        "client", "start", "--superlink", f"127.0.0.1:{federation['port']}", "--ca", str(other / "ca.pem"),
        "--key", str(root / "pki" / "hospitals" / "a.key"), "--site", "a", "--data", str(root / "data" / "hospital-1.csv"),
        "--port", str(_free_port()), "--state", str(tmp_path / "a2"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "certificate at" in proc.stderr and "could not be verified" in proc.stderr


def _app_with_one_changed_line(dst: Path, tag: str = "changed") -> Path:
    """The fedcare app unpacked into ``dst`` with one line of client/client_app.py changed: the
    train reply names the site "NAME+TAG", so the report shows whose code ran."""
    unpack_app(dst)
    path = dst / "client" / "client_app.py"
    line = '"info": ConfigRecord({"site": data.name, "device": device, "replayed": replayed}),'
    text = path.read_text()
    assert text.count(line) == 1
    path.write_text(text.replace(line, line.replace("data.name,", f'data.name + "+{tag}",')))
    return dst


def test_a_run_no_hospital_may_run_fails(federation, tmp_path):
    """A bundle no hospital approved: every hospital refuses, and `server run` exits 1 saying
    that nothing was trained, with the refusal (Flower itself reports such a run as completed)."""
    root, port = federation["root"], federation["port"]
    app = _app_with_one_changed_line(tmp_path / "fedcare", tag="unapproved")
    run = _fedcare(
        "server", "run", "--superlink", f"127.0.0.1:{port}", "--pki", str(root / "pki"),
        "--rounds", "1", "--no-dp", "--out", str(root / "run-unapproved"), "--app", str(app),
        "--run-config", 'model.name="logreg"', timeout=300,
    )  # fmt: skip
    output = " ".join(run.stdout.split())
    assert run.returncode == 1, run.stdout + run.stderr
    assert "trained nothing: no hospital trained: site " in output
    assert "is not approved here" in output
    summary = json.loads((root / "run-unapproved" / "summary.json").read_text())
    assert {f["hospital"] for f in summary["failures"]} == set(HOSPITALS)


def test_changed_bundle_is_refused_where_not_approved(federation, tmp_path):
    """Hospitals a and b approve the changed bundle, c does not: c answers with a refusal naming
    the bundle's hash (without installing it) and the run completes with a and b."""
    from client.approval import fab_bytes, inspect_fab

    root, port = federation["root"], federation["port"]
    app = _app_with_one_changed_line(tmp_path / "fedcare")
    changed = inspect_fab(fab_bytes(app)).sha256
    for name in ("a", "b"):
        ok = _fedcare("client", "approve", "--ledger", str(root / f"hospital-{name}" / "ledger"),
                      str(app), "--yes")  # fmt: skip
        assert ok.returncode == 0 and changed in ok.stdout, ok.stdout + ok.stderr
    run = _fedcare(
        "server", "run", "--superlink", f"127.0.0.1:{port}", "--pki", str(root / "pki"),
        "--rounds", "1", "--no-dp", "--out", str(root / "run-changed"), "--app", str(app),
        "--run-config", 'model.name="logreg" strategy.min-train-nodes=2 strategy.min-evaluate-nodes=2',
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((root / "run-changed" / "summary.json").read_text())
    refused = [f for f in summary["failures"] if f["hospital"] == "c"]
    assert refused and all(
        f["reason"].startswith(f"site c refused: app bundle {changed} is not approved here")
        for f in refused
    ), summary["failures"]
    assert {f["hospital"] for f in summary["failures"]} == {"c"}
    trained = {h["name"]: h["rounds_trained"] for h in summary["hospitals"]}
    # the approved bundle's own code ran at a and b (not the launcher's installed copy)
    assert trained["a+changed"] == trained["b+changed"] == 1
    assert changed in " ".join(run.stdout.split())  # shown in the end-of-run table
    audit = [json.loads(line) for line in (root / "hospital-c" / "ledger" / "audit.jsonl").open()]
    assert any(e.get("decision") == "refused" and e.get("fab_hash") == changed for e in audit)
    apps = root / "hospital-c" / "flwr-home" / "apps"  # Flower installs FABs here, by hash
    assert not apps.exists() or not any(p.name.endswith(changed[:8]) for p in apps.iterdir())
    assert any(
        p.name.endswith(changed[:8]) for p in (root / "hospital-a" / "flwr-home" / "apps").iterdir()
    )


def _kill_tree(pid: int) -> None:
    """SIGKILL a daemon and every process it started (a machine going away)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _run_until_round_one(args: list[str], on_round_one) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Start `fedcare server run`, call ``on_round_one()`` once round 1 is reported, wait."""
    proc = subprocess.Popen(
        [*FEDCARE, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
    )
    lines = []
    fired = False
    deadline = time.monotonic() + 600
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if not fired and "round   1/" in line:
            on_round_one()
            fired = True
        if time.monotonic() > deadline:
            proc.kill()
    proc.wait(timeout=60)
    assert fired, "".join(lines)
    return proc.returncode, "".join(lines)


def test_a_hospital_dropping_mid_run_does_not_stop_it(federation):
    root, port = federation["root"], federation["port"]
    code, output = _run_until_round_one(
        ["server", "run", "--superlink", f"127.0.0.1:{port}", "--pki", str(root / "pki"), "--rounds", "3",
         "--out", str(root / "run-drop"), "--app", str(federation["app"]), "--run-config",
         "strategy.min-train-nodes=2 strategy.min-evaluate-nodes=2 train.round-timeout=40"],
        lambda: _kill_tree(federation["clients"]["c"].pid),  # hospital c crashes
    )  # fmt: skip
    assert code == 0, output
    summary = json.loads((root / "run-drop" / "summary.json").read_text())
    by_name = {h["name"]: h for h in summary["hospitals"]}
    assert by_name["a"]["rounds_trained"] == 3 and by_name["c"]["rounds_trained"] <= 2
    dropped = [f for f in summary["failures"] if f["hospital"] == "c"]
    assert dropped and all(f["round"] >= 2 for f in dropped)
    assert (
        "c" in (root / "run-drop" / "report.md").read_text().split("## Refusals and drop-outs")[1]
    )


def test_coordinator_killed_after_round_one_resumes(federation):
    root, port = federation["root"], federation["port"]
    run_dir = root / "run-resume"
    settings = (
        "strategy.min-train-nodes=2 strategy.min-evaluate-nodes=2 strategy.min-available-nodes=2"
    )
    code, output = _run_until_round_one(
        ["server", "run", "--superlink", f"127.0.0.1:{port}", "--pki", str(root / "pki"), "--rounds", "3",
         "--strategy", "fedadam", "--out", str(run_dir), "--app", str(federation["app"]),
         "--run-config", settings],
        lambda: _kill_tree(federation["server"].pid),  # the coordinator crashes
    )  # fmt: skip
    assert code == 2 and "--resume" in output, output
    federation["server"] = _spawn("server", "start", "--pki", str(root / "pki"), "--port", str(port),
                                  "--state", str(root / "coordinator"), log=root / "server2.log")  # fmt: skip
    cli = FlowerCLI(root / "flwr-home-2", f"127.0.0.1:{port}", root / "pki" / "ca.pem")
    _wait(lambda: sum(n["status"] == "online" for n in cli.json("supernode", "list", CONNECTION)["nodes"]) >= 2,
          120, root / "server2.log")  # fmt: skip
    resumed = _fedcare("server", "run", "--superlink", f"127.0.0.1:{port}", "--pki", str(root / "pki"),
                       "--resume", str(run_dir), "--app", str(federation["app"]), timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "round   2/3" in resumed.stdout and "round   3/3" in resumed.stdout
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert sorted(metrics["round"].unique()) == [1, 2, 3]  # continuous numbering, history kept
    summary = json.loads((run_dir / "summary.json").read_text())
    for h in summary["hospitals"]:
        if h["name"] in ("a", "b"):
            assert h["rounds_trained"] == 3
            assert h["epsilon"] <= 2.0  # never double-spent, even for the repeated round 2
    first = load_file(str(run_dir / "checkpoints" / "round-001.safetensors"))
    final = load_file(str(run_dir / "model.safetensors"))
    assert any(not torch.equal(first[k], final[k]) for k in first)
    assert (run_dir / "checkpoints" / "round-003.strategy.safetensors").exists()  # FedAdam moments
    # a fresh start of the remaining 2 rounds (what a resume ignoring its checkpoint would give)
    # ends elsewhere; an uninterrupted 3-round run with the same seed ends at the same weights
    # (same per-round seeds at the hospitals, FedAdam moments restored; replies may arrive in
    # another order, hence the float tolerance)
    ends = {}
    for rounds in (2, 3):
        out = root / f"run-fresh-{rounds}"
        fresh = _fedcare("server", "run", "--superlink", f"127.0.0.1:{port}", "--pki", str(root / "pki"),
                         "--rounds", str(rounds), "--strategy", "fedadam", "--out", str(out),
                         "--app", str(federation["app"]), "--run-config", settings, timeout=600)  # fmt: skip
        assert fresh.returncode == 0, fresh.stdout + fresh.stderr
        ends[rounds] = load_file(str(out / "model.safetensors"))
    assert any(not torch.allclose(ends[2][k], final[k], atol=1e-3) for k in final)
    for key in final:
        torch.testing.assert_close(final[key], ends[3][key], atol=1e-5, rtol=0)
