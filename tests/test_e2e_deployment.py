"""End-to-end deployment on loopback with real processes: `fedcare server init/start/run`, the
coordinator's gateway on 127.0.0.2 (the public address; Fleet API only) in front of the
SuperLink on 127.0.0.1, three `fedcare client start` hospital daemons (Flower SuperNodes, TLS,
node authentication) whose keys each hospital made itself and the coordinator added while
running -- after the daemons had started, so that they join on their own once their key is in.

While test_two_rounds_with_dp runs, headless Chromium watches `fedcare server dashboard`; the
tests after it check that page and hospital a's `fedcare client dashboard` (they skip, saying
so, without Chromium), and that run's `--tracking mlflow=...` is read back with MlflowClient.

Every process is bounded in time and stopped by its PID (and process group) at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pandas as pd
import psutil
import pytest
import torch
from safetensors.torch import load_file

from server.flwr_cli import CONNECTION, FlowerCLI
from tests.browser import NO_BROWSER, get, headless_chromium
from tests.handlers import unpack_app

pytestmark = pytest.mark.slow
FEDCARE = [sys.executable, "-m", "simulations.cli"]
HOSPITALS = ("a", "b", "c")
PUBLIC = "127.0.0.2"  # the coordinator's public address (gateway); the SuperLink is on 127.0.0.1
JOIN_BACKOFF = "1,2"  # seconds between a daemon's attempts to join (fedcare's default: 5 to 60)
NOT_YET = "not registered there (yet)"  # a daemon's message each time its key is refused


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
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
        proc.send_signal(signal.SIGTERM)  # may have been sent already (_stop_all)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # anything left in the daemon's group
        os.killpg(proc.pid, signal.SIGKILL)


def _start_coordinator(root: Path, port: int, internal: int, log: Path) -> subprocess.Popen[bytes]:
    server = _spawn("server", "start", "--pki", str(root / "pki"), "--host", PUBLIC,
                    "--port", str(port), "--internal-port", str(internal),
                    "--state", str(root / "coordinator"), log=log)  # fmt: skip
    _wait(lambda: "fedcare coordinator listening" in log.read_text(), 90, log)
    return server


def _start_hospital(
    root: Path, name: str, key: Path, data: Path, state: Path, port: int, log: Path
):  # type: ignore[no-untyped-def]
    return _spawn(
        "client", "start", "--superlink", f"{PUBLIC}:{port}", "--ca", str(root / "pki" / "ca.pem"),
        "--key", str(key), "--hospital", name, "--data", str(data), "--port", str(_free_port()),
        "--state", str(state), "--policy", str(_test_policy(root)), "--join-backoff", JOIN_BACKOFF,
        log=log,
    )  # fmt: skip


def _test_policy(root: Path) -> Path:
    """fedcare's default hospital policy with one key changed: the lifetime ε cap, because every test
    of this module runs in the same three ledgers (a real hospital keeps 10)."""
    path = root / "hospital-policy.toml"
    if not path.exists():
        path.write_text("lifetime-epsilon = 1000.0\n")
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    port, internal = _free_port(PUBLIC), _free_port()
    init = _fedcare("server", "init", "--out", str(root / "pki"), "--address", PUBLIC)
    assert init.returncode == 0, init.stdout + init.stderr
    assert sorted(p.name for p in (root / "pki").iterdir()) == [
        "ca.pem",
        "server.key",
        "server.pem",
    ]
    export = _fedcare("simulate", "--export-hospitals", str(root / "data"))
    assert export.returncode == 0, export.stderr
    # each hospital makes its own key pair; only NAME.pub travels to the coordinator
    for name in HOSPITALS:
        keygen = _fedcare(
            "client", "keygen", "--out", str(root / f"hospital-{name}" / "keys"), "--name", name
        )
        assert keygen.returncode == 0, keygen.stdout + keygen.stderr
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
        server = _start_coordinator(root, port, internal, root / "server.log")
        procs.append(server)
        cli = FlowerCLI(root / "flwr-home", f"127.0.0.1:{internal}", root / "pki" / "ca.pem")
        clients = {}
        for i, name in enumerate(HOSPITALS, start=1):  # each daemon starts BEFORE its key is added
            keys = root / f"hospital-{name}" / "keys"
            clients[name] = _start_hospital(
                root, name, keys / f"{name}.key", root / "data" / f"hospital-{i}.csv",
                root / f"hospital-{name}", port, root / f"client-{name}.log",
            )  # fmt: skip
            procs.append(clients[name])
        for name in HOSPITALS:  # refused (not registered yet), it keeps trying; the key is added
            log = root / f"client-{name}.log"
            _wait(lambda log=log: NOT_YET in log.read_text(), 90, log)
            keys = root / f"hospital-{name}" / "keys"
            added = _fedcare("server", "add-hospital", name, str(keys / f"{name}.pub"),
                             "--pki", str(root / "pki"), "--superlink", f"127.0.0.1:{internal}")  # fmt: skip
            assert (
                added.returncode == 0 and "registered with the running coordinator" in added.stdout
            ), added.stdout + added.stderr

        def online() -> bool:  # the SuperLink's view, asked once each daemon says it connected
            if not all(_connected(root / f"hospital-{h}") for h in HOSPITALS):
                return False
            nodes = cli.json("supernode", "list", CONNECTION)["nodes"]
            return sum(n["status"] == "online" for n in nodes) == len(HOSPITALS)

        _wait(online, 90, root / "client-a.log")
        state = {"root": root, "port": port, "internal": internal, "server": server,
                 "clients": clients, "app": app, "cli": cli,
                 "superlink": f"127.0.0.1:{internal}"}  # fmt: skip
        yield state
    finally:
        procs.append(state["server"])  # a test may have restarted the coordinator
        # ... or a hospital (the chaos test): its daemon replaced the one started here
        restarted = state.get("clients", {}).values()
        procs = [p for p in dict.fromkeys([*procs, *restarted, *state.get("extra", [])]) if p]
        for proc in procs:  # all stop at once, then each is waited for
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture(scope="module")
def dashboards(federation):
    """The two dashboards as operators start them, watched in headless Chromium: `fedcare server
    dashboard` on the coordinator's run folders (--runs: the runs of this module are folders of
    ROOT), registry (--pki), SuperLink (--superlink) and gateway counters (--state), and hospital
    a's `fedcare client dashboard --state` with its policy. None without Chromium (nothing is
    started then). ``stop()`` ends them: the last test that looks at them calls it, since the
    coordinator's dashboard asks the SuperLink for its nodes every 5 s (a `flwr` process each
    time), which the rest of the module need not pay for."""
    chromium = headless_chromium()
    if chromium is None:
        yield None
        return
    root = federation["root"]
    ports = {"coordinator": _free_port(), "hospital": _free_port()}
    procs = [
        _spawn("server", "dashboard", "--runs", str(root), "--pki", str(root / "pki"),
               "--superlink", federation["superlink"], "--state", str(root / "coordinator"),
               "--port", str(ports["coordinator"]), log=root / "dashboard-coordinator.log"),
        _spawn("client", "dashboard", "--state", str(root / "hospital-a"),
               "--policy", str(_test_policy(root)), "--port", str(ports["hospital"]),
               log=root / "dashboard-hospital.log"),
    ]  # fmt: skip
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}

    def stop() -> None:
        if procs:  # once (the driver is gone after its first quit)
            chromium.quit()
            while procs:
                _stop(procs.pop())

    try:
        for name, url in urls.items():
            log = root / f"dashboard-{name}.log"
            _wait(lambda url=url: get(url, "/")[0] == 200, 60, log)
        yield SimpleNamespace(browser=chromium, stop=stop, **urls)
    finally:
        stop()


def _run_watched(dashboards, args: list[str], run: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:  # type: ignore[no-untyped-def]  # fmt: skip
    """`fedcare ARGS` (a `server run --out ROOT/RUN`) while Chromium shows run RUN on the
    coordinator's dashboard: the finished process and the round counter's texts as the browser
    saw them, in order (none without Chromium: the command alone)."""
    if dashboards is None:
        return _fedcare(*args, timeout=600), []
    from selenium.webdriver.common.by import By

    browser, seen = dashboards.browser, []
    browser.get(f"{dashboards.coordinator}/?run={run}")  # before the run folder exists
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([*FEDCARE, *args], stdout=out, stderr=err, text=True, env=_env())
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # not there yet, or replaced by a refresh
                text = browser.find_element(By.ID, "round-counter").text
                if not seen or seen[-1] != text:
                    seen.append(text)
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()), seen


def _connected(state: Path) -> bool:
    """The hospital daemon's SuperNode has activated its node (cheaper to ask than `flwr`)."""
    log = state / "supernode.log"
    return log.exists() and "SuperNode ID:" in log.read_text()


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


def test_hospitals_started_before_their_keys_were_added_joined_on_their_own(federation):
    """The fixture started each daemon before the coordinator added its key: each was refused,
    said what the coordinator's operator must run, and joined once the key was in, without a
    restart by hand (the same `client start` processes; one task launcher each, kept across
    the SuperNode's attempts). test_two_rounds_with_dp then runs with them."""
    root = federation["root"]
    for name, daemon in federation["clients"].items():
        assert daemon.poll() is None
        log = (root / f"client-{name}.log").read_text()
        assert (
            NOT_YET in log and f"`fedcare server add-hospital {name} {name}.pub --pki PKI`" in log
        )
        launcher = (root / f"hospital-{name}" / "launcher.log").read_text()
        assert launcher.count(f"launcher for hospital {name}: approved bundles") == 1
        supernode = (root / f"hospital-{name}" / "supernode.log").read_text()
        assert "[code: 2004]" in supernode and supernode.count("SuperNode ID:") == 1


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


def test_two_rounds_with_dp(federation, dashboards):
    """Two DP rounds at the three hospitals, while the coordinator's dashboard shows the run in
    Chromium (test_the_coordinator_dashboard_followed_the_dp_run checks what it saw)."""
    root = federation["root"]
    run, federation["watched"] = _run_watched(
        dashboards,
        ["server", "run", "--superlink", federation["superlink"], "--pki", str(root / "pki"),
         "--rounds", "2", "--epsilon", "2", "--out", str(root / "run"),
         "--app", str(federation["app"]), "--tracking", f"mlflow={root / 'mlruns'}"],
        "run",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert sorted(h["name"] for h in summary["hospitals"]) == list(HOSPITALS)
    # each round once (every Flower log line once reached the log stream twice), its ε the end
    # table's: after training, then after the evaluation release
    progress = [line for line in run.stdout.splitlines() if line.startswith("round ")]
    assert [line.split()[1] for line in progress] == ["1/2", "2/2"], run.stdout
    final = max(h["epsilon"] for h in summary["hospitals"])
    assert f"(training) → {final:.3f} with the evaluation release" in progress[-1], run.stdout
    for h in summary["hospitals"]:
        assert 0 < h["epsilon"] <= 2.0 and h["delta"] == 1e-5 and h["rounds_trained"] == 2
    for name in ("metrics.csv", "report.md", "curves.png", "model.safetensors", "model.json",
                 "checkpoints/round-001.safetensors", "checkpoints/round-002.json"):  # fmt: skip
        assert (root / "run" / name).exists(), name
    assert {h["name"]: h["named_by"] for h in summary["hospitals"]} == dict.fromkeys(
        HOSPITALS, "registered key"
    )
    assert summary["name_mismatches"] == []
    # one run, two ids: fedcare's (hospitals' ledgers key on it) and the coordinator's Flower
    # run id, which every hospital's ledger entry and audit line of the run names too
    (flower_run_id,) = summary["flower_run_ids"]
    runs = federation["cli"].json("ls", CONNECTION)["runs"]
    assert str(flower_run_id) in {str(r["run-id"]) for r in runs} and len(summary["run_id"]) == 16
    for h in HOSPITALS:
        ledger = root / f"hospital-{h}" / "ledger"
        entry = json.loads((ledger / "runs" / f"{summary['run_id']}.json").read_text())
        assert entry["flower_run_ids"] == [flower_run_id]
        audit = [json.loads(x) for x in (ledger / "audit.jsonl").open()]
        ours = [a for a in audit if a.get("run_id") == summary["run_id"]]
        assert ours and all(a["flower_run_id"] == flower_run_id for a in ours)
        # the bundle's code loaded once for the run's later messages (the first installs it),
        # the hospital's data prepared once (client/warm_executor.py, client.hospital_data)
        launcher = (root / f"hospital-{h}" / "launcher.log").read_text()
        assert launcher.count("its ClientApp loaded once, in process") == 1, launcher[-3000:]
        cache = ledger / "data-cache"
        assert list(cache.glob("*.npz")) and stat.S_IMODE(cache.stat().st_mode) == 0o700
    status = _fedcare(
        "server", "status", "--superlink", federation["superlink"], "--pki", str(root / "pki")
    )
    assert status.returncode == 0 and "finished:completed" in status.stdout, status.stdout
    assert all(f"│ {h} " in status.stdout for h in HOSPITALS) and "online" in status.stdout
    assert "online: its daemon is connected" in status.stdout  # each state shown is explained
    _check_tracking(root / "mlruns", summary)


def _check_tracking(store: Path, summary: dict) -> None:
    """`server run --tracking mlflow=STORE` as MLflow's own client reads it back: the run config,
    each hospital's ε per round (ending at the summary's), the pooled AUROC, the artefacts."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("fedcare").experiment_id])
    assert run.data.tags["fedcare.run_id"] == summary["run_id"]
    assert run.data.params["train.rounds"] == "2" and run.data.params["dp.target-epsilon"] == "2.0"
    for h in summary["hospitals"]:
        logged = client.get_metric_history(run.info.run_id, f"{h['name']}.epsilon")
        assert [m.step for m in logged] == [1, 2] and logged[-1].value == pytest.approx(
            h["epsilon"]
        )
    assert run.data.metrics["final.auroc"] == pytest.approx(summary["overall"]["auroc"])
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "summary.json", "model.safetensors", "model.md"} <= artefacts


def test_the_coordinator_dashboard_followed_the_dp_run(federation, dashboards, tmp_path):
    """`fedcare server dashboard` during and after test_two_rounds_with_dp: the round counter
    advanced while `server run` went on, to the last round; the registered hospitals are listed
    online (the SuperLink's node list), the run's hospitals with the ε each released, the ε
    curve has one line per hospital (and the target) over both rounds, ending at each hospital's
    final ε; the gateway's counters show the hospitals' forwarded requests."""
    from selenium.webdriver.common.by import By

    if dashboards is None:
        pytest.skip(NO_BROWSER)
    seen, root = federation.get("watched"), federation["root"]
    if not seen:
        pytest.skip("test_two_rounds_with_dp did not run with the dashboard in this session")
    print("round counter as the browser saw it:", seen)
    rounds = [int(text.split(" / ")[0]) for text in seen]
    assert rounds == sorted(rounds) and 1 in rounds, seen  # round 1 shown while round 2 ran
    summary = json.loads((root / "run" / "summary.json").read_text())
    epsilon = {h["name"]: h["epsilon"] for h in summary["hospitals"]}
    browser = dashboards.browser
    browser.get(f"{dashboards.coordinator}/?run=run")
    chart = browser.find_element(By.ID, "chart-epsilon")
    _wait(lambda: chart.get_attribute("data-series") == str(len(HOSPITALS) + 1), 30,
          root / "dashboard-coordinator.log")  # fmt: skip

    def rows(selector: str) -> list[list[str]]:
        return [[td.text for td in row.find_elements(By.TAG_NAME, "td")]
                for row in browser.find_elements(By.CSS_SELECTOR, f"{selector} tbody tr")]  # fmt: skip

    registry = {row[0]: row[2] for row in rows("#registry")}
    run_hospitals = {row[0]: row[2] for row in rows("#run-hospitals")}
    routes = [row[0] for row in rows("#gateway")]
    gateway = {row[0]: int(row[1]) for row in rows("#gateway")}
    pooled = browser.find_element(By.ID, "pooled-auroc").text
    auroc_series = browser.find_element(By.ID, "chart-auroc").get_attribute("data-series")
    counter = browser.find_element(By.ID, "round-counter").text
    status = browser.find_element(By.ID, "run-status").text
    note = browser.find_element(By.CSS_SELECTOR, "#registry h2").text
    points = chart.get_attribute("data-points")
    canvases = browser.find_elements(By.CSS_SELECTOR, "#chart-epsilon canvas")
    error = browser.execute_script("return document.body.dataset.error || null")
    browser.save_screenshot(str(tmp_path / "coordinator.png"))
    assert counter == "2 / 2" and status == "finished"
    assert registry == dict.fromkeys(HOSPITALS, "online"), registry
    assert f"from the SuperLink at {federation['superlink']}" in note
    assert run_hospitals == {h: f"{e:.3f}" for h, e in epsilon.items()}
    assert points == "2" and canvases and error is None
    curves = json.loads(get(dashboards.coordinator, "/api/run/run")[1])["curves"]
    assert sorted(curves["epsilon"]) == list(HOSPITALS) and curves["target_epsilon"] == 2.0
    for name, values in curves["epsilon"].items():
        assert len(values) == 2 and values[0] < values[1] == pytest.approx(epsilon[name])
    # no centralised evaluation in a deployment: the pooled AUROC is the report's, from the
    # hospitals' noisy histograms of the last round, on the page and as the curve's last point
    auroc = summary["overall"]["auroc"]
    assert pooled.startswith(f"{auroc:.3f} (95 % CI") and "score histograms summed" in pooled
    assert curves["pooled_auroc"] == [None, pytest.approx(auroc)]
    # one line per hospital whose noisy counts gave an AUROC (too few of one class: none), and
    # the pooled one
    assert auroc_series == str(len(curves["auroc"]) + 1), (auroc_series, curves["auroc"])
    assert gateway.get("pull-messages", 0) > 0 and routes == sorted(set(routes)), routes
    assert (tmp_path / "coordinator.png").stat().st_size > 10_000


def test_a_run_waits_for_a_registered_hospital_that_never_comes_and_names_it(federation, tmp_path):
    """Hospital "late" is registered but its daemon never starts: `server run` says whom it
    waits for while it waits and, after --wait-timeout, exits 1 naming it, without submitting
    a run (a run needs every registered hospital unless --min-hospitals says fewer)."""
    root, superlink, pki = (
        federation["root"],
        federation["superlink"],
        str(federation["root"] / "pki"),
    )
    keys = tmp_path / "late"
    assert _fedcare("client", "keygen", "--out", str(keys), "--name", "late").returncode == 0
    added = _fedcare("server", "add-hospital", "late", str(keys / "late.pub"), "--pki", pki,
                     "--superlink", superlink)  # fmt: skip
    assert added.returncode == 0, added.stdout + added.stderr
    runs = _superlink_state(federation)[0]
    try:
        started = time.monotonic()
        run = _fedcare(
            "server", "run", "--superlink", superlink, "--pki", pki, "--rounds", "1",
            "--out", str(root / "run-late"), "--app", str(federation["app"]), "--wait-timeout", "5",
            timeout=120,
        )  # fmt: skip
        took = time.monotonic() - started
    finally:  # the other tests' runs need every registered hospital
        removed = _fedcare(
            "server", "remove-hospital", "late", "--pki", pki, "--superlink", superlink
        )
        assert removed.returncode == 0, removed.stdout + removed.stderr
    output = " ".join(run.stdout.split())
    assert run.returncode == 1, run.stdout + run.stderr
    assert "waiting for hospitals: 3 of 4 online (a, b, c; late offline)" in output
    assert (
        "no run started: after 5 s only 3 of 4 online (a, b, c; late offline), 4 needed; never "
        "came online: late"
    ) in output
    assert took < 5 + 30, took  # the command's own start and the SuperLink's answers
    assert _superlink_state(federation)[0] == runs and not (root / "run-late").exists()


def test_a_run_without_dp_is_refused_by_every_hospital(federation):
    """The coordinator asks for a non-private run: every hospital (fedcare's default policy, one
    cap changed: see _test_policy) refuses before training, nothing enters a ledger, and `server
    run` exits 1 with each hospital's reason. Each daemon printed its effective policy."""
    root = federation["root"]

    def ledgers() -> dict[str, dict[str, bytes]]:
        return {h: {p.name: p.read_bytes() for p in (root / f"hospital-{h}" / "ledger" / "runs").glob("*.json")}
                for h in HOSPITALS}  # fmt: skip

    before = ledgers()
    run = _fedcare(
        "server", "run", "--superlink", federation["superlink"], "--pki", str(root / "pki"),
        "--rounds", "1", "--no-dp", "--out", str(root / "run-no-dp"), "--app", str(federation["app"]),
        timeout=300,
    )  # fmt: skip
    output = " ".join(run.stdout.split())
    assert run.returncode == 1, run.stdout + run.stderr
    assert "trained nothing" in output and "the policy requires DP" in output
    summary = json.loads((root / "run-no-dp" / "summary.json").read_text())
    assert {f["hospital"] for f in summary["failures"]} == set(HOSPITALS)
    assert all("the policy requires DP" in f["reason"] for f in summary["failures"])
    assert all(h["rounds_trained"] == 0 for h in summary["hospitals"])
    assert ledgers() == before
    for h in HOSPITALS:
        log = (root / f"client-{h}.log").read_text()
        assert "hospital policy (from " in log and "allow-non-dp = false" in log


def test_the_dashboards_show_the_dp_run_and_the_refusal(federation, dashboards, tmp_path):
    """Hospital a's `fedcare client dashboard --state` after test_two_rounds_with_dp and
    test_a_run_without_dp_is_refused_by_every_hospital: the DP run's ledger row (its ε, the
    coordinator's Flower run id), no row for the refused run, and its refusal in the audit log
    with the hospital's reason; the coordinator's page names every hospital's refusal of that
    run with the same reason. The last test to look at the dashboards: it stops them."""
    from selenium.webdriver.common.by import By

    if dashboards is None:
        pytest.skip(NO_BROWSER)
    root = federation["root"]
    if not all((root / run / "summary.json").exists() for run in ("run", "run-no-dp")):
        pytest.skip("needs the runs of test_two_rounds_with_dp and the refused run (this session)")
    dp, refused = (
        json.loads((root / run / "summary.json").read_text()) for run in ("run", "run-no-dp")
    )
    browser = dashboards.browser
    browser.get(dashboards.hospital)
    ledger = {row.find_element(By.TAG_NAME, "td").text: row.text
              for row in browser.find_elements(By.CSS_SELECTOR, "#ledger tbody tr")}  # fmt: skip
    refusals = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "#audit tbody tr.decision-refused")
                if refused["run_id"] in row.text]  # fmt: skip
    lifetime = browser.find_element(By.ID, "lifetime").text
    browser.save_screenshot(str(tmp_path / "hospital.png"))
    browser.get(f"{dashboards.coordinator}/?run=run-no-dp")
    failures = [[td.text for td in row.find_elements(By.TAG_NAME, "td")]
                for row in browser.find_elements(By.CSS_SELECTOR, "#failures tbody tr")]  # fmt: skip
    browser.save_screenshot(str(tmp_path / "coordinator-refused.png"))
    dashboards.stop()
    files = root / "hospital-a" / "ledger" / "runs"
    assert sorted(ledger) == sorted(p.stem for p in files.glob("*.json"))  # every ledger entry
    assert refused["run_id"] not in ledger  # the refused run spent nothing
    (a,) = (h for h in dp["hospitals"] if h["name"] == "a")
    (flower_run_id,) = dp["flower_run_ids"]
    assert (
        f"{a['epsilon']:.3f}" in ledger[dp["run_id"]] and str(flower_run_id) in ledger[dp["run_id"]]
    )
    assert refusals and all("the policy requires DP" in text for text in refusals), refusals
    assert "of the policy's cap 1000.0" in lifetime
    assert (tmp_path / "hospital.png").stat().st_size > 10_000
    # round, message, hospital, cause, the hospital's public reason
    assert {(row[2], row[3]) for row in failures} == {(h, "refused") for h in HOSPITALS}
    assert all("the policy requires DP" in row[4] for row in failures), failures


def _superlink_state(federation) -> tuple[list, list]:
    """Runs (id, status) and registered nodes, read on the loopback side (Control API)."""
    cli = federation["cli"]
    runs = sorted((r["run-id"], r["status"]) for r in cli.json("ls", CONNECTION).get("runs", []))
    nodes = sorted(
        (n["node-id"], n["status"] != "unregistered")
        for n in cli.json("supernode", "list", CONNECTION)["nodes"]
    )
    return runs, nodes


def test_a_stranger_at_the_public_address_is_refused_everything(federation, tmp_path):
    """With only the CA certificate, at the coordinator's public address: start a run with its
    own bundle, register a node, list runs, stop a run, read a run's logs (Flower's own `flwr`
    CLI) and take the ServerApp's task (Runtime API): all refused by the gateway, which never
    passes them to Flower; the SuperLink's runs and nodes are unchanged. The SuperLink itself
    listens on 127.0.0.1 only."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    root, public = federation["root"], f"{PUBLIC}:{federation['port']}"
    before = _superlink_state(federation)
    run_id = str(before[0][0][0]) if before[0] else "1"  # test_two_rounds_with_dp's run
    superlink_log = root / "coordinator" / "superlink.log"
    handled = [
        superlink_log.read_text().count(f"ControlServicer.{rpc}")
        for rpc in ("StartRun", "StopRun", "RegisterNode")
    ]
    stranger = FlowerCLI(tmp_path / "flwr-home", public, root / "pki" / "ca.pem")
    keygen = _fedcare("client", "keygen", "--out", str(tmp_path / "keys"), "--name", "x")
    assert keygen.returncode == 0
    evil = _app_with_one_changed_line(tmp_path / "evil", tag="evil")
    attempts = {
        "start-run": ("run", str(evil), CONNECTION, "--format", "json"),
        "register-node": ("supernode", "register", str(tmp_path / "keys" / "x.pub"), CONNECTION, "--format", "json"),
        "list-runs": ("ls", CONNECTION, "--format", "json"),
        "stop-run": ("stop", run_id, CONNECTION, "--format", "json"),
        "stream-logs": ("log", run_id, CONNECTION, "--show"),
    }  # fmt: skip
    for route, args in attempts.items():
        proc = stranger.run(*args, timeout=120)
        flat = re.sub(r"[\s│╭╮╰╯─]+", "", proc.stdout + proc.stderr)  # flwr may draw a box
        assert f"403Forbidden'forurl'https://{public}/v1/control/{route}'" in flat, (route, flat)
    with httpx.Client(verify=str(root / "pki" / "ca.pem"), timeout=30) as http:
        task = http.post(f"https://{public}/v1/runtime/acquire-task",
                         content=AcquireTaskRequest().SerializeToString(),
                         headers={"content-type": "application/protobuf"})  # fmt: skip
        assert task.status_code == 403
        for path in ("/v1/control/list-nodes", "/v1/control/unregister-node", "/docs", "/health"):
            assert http.post(f"https://{public}{path}").status_code in (403, 404), path
        assert http.post(f"https://{public}/v1/fleet/get-run").status_code == 401  # no node key
    with pytest.raises(OSError):  # the SuperLink's own port is not on the public address
        socket.create_connection((PUBLIC, federation["internal"]), timeout=5).close()
    assert _superlink_state(federation) == before
    gateway_log = (root / "coordinator" / "gateway.log").read_text()
    for route in attempts:
        assert f"refused POST /v1/control/{route} from 127.0.0.1: 403" in gateway_log, route
    assert "refused POST /v1/runtime/acquire-task from 127.0.0.1: 403" in gateway_log
    assert (
        "HTTP Request" not in gateway_log
    )  # hospitals' forwarded requests are not logged one by one
    assert [
        superlink_log.read_text().count(f"ControlServicer.{rpc}")
        for rpc in ("StartRun", "StopRun", "RegisterNode")
    ] == handled


class Stranger:
    """A network stranger at the coordinator's public address, in a thread of its own (asyncio),
    until the ``with`` block ends: ``idle_tls`` TLS connections that never send a request and
    ``idle_tcp`` TCP connections that never start the handshake, each opened again once the
    gateway closes it, and ``bodies`` requests at a time with a body of ``body_bytes`` signed
    by a self-made (never registered) key, each sent again a second after its answer.
    Only the gateway's address is dialled; the gateway process's RSS is sampled every 0.1 s."""

    def __init__(self, host: str, port: int, ca: Path, gateway: psutil.Process, *,
                 idle_tls: int = 500, idle_tcp: int = 500, bodies: int = 50,
                 body_bytes: int = 16 * 2**20) -> None:  # fmt: skip
        import ssl
        import threading
        from collections import Counter

        self.host, self.port, self.gateway = host, port, gateway
        self.context = ssl.create_default_context(cafile=str(ca))
        self.counts = {"tls": idle_tls, "tcp": idle_tcp, "bodies": bodies}
        self.body_bytes = body_bytes
        self.held = self.max_held = self.body_bytes_sent = 0
        self.closed: Counter[str] = Counter()  # idle connections the gateway closed, per kind
        self.answers: Counter[str] = Counter()  # status of each body request ("reset": none)
        self.rss: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Stranger:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = self.counts["tls"] + self.counts["tcp"] + self.counts["bodies"] + 512
        if soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._idle(kind))
                 for kind in ("tls", "tcp") for _ in range(self.counts[kind])]  # fmt: skip
        tasks += [asyncio.create_task(self._body()) for _ in range(self.counts["bodies"])]
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.rss.append(self.gateway.memory_info().rss)
            await asyncio.sleep(0.1)
        pending = set(tasks)
        while pending:  # asyncio.wait_for (3.11) may swallow a cancellation: cancel again
            for task in pending:
                task.cancel()
            pending = (await asyncio.wait(pending, timeout=0.5))[1]

    async def _connect(self, tls: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.context if tls else None), 30
        )

    async def _idle(self, kind: str) -> None:
        import ssl

        while not self._stop.is_set():
            try:
                reader, writer = await self._connect(kind == "tls")
            except (OSError, ssl.SSLError, TimeoutError):
                await asyncio.sleep(1)
                continue
            self.held += 1
            self.max_held = max(self.max_held, self.held)
            try:
                with contextlib.suppress(OSError, ssl.SSLError):
                    await reader.read(1)  # nothing is sent to it: b"" once the gateway closes
                self.closed[kind] += 1
            finally:
                self.held -= 1
                writer.close()

    async def _body(self) -> None:
        import ssl
        from base64 import b64encode

        from flwr.supercore.date import now
        from flwr.supercore.primitives.asymmetric import (
            generate_key_pairs,
            public_key_to_bytes,
            sign_message,
        )

        private, public = generate_key_pairs()  # self-made: never registered
        key = b64encode(public_key_to_bytes(public)).decode()
        chunk = bytes(2**20)
        while not self._stop.is_set():
            stamp = now().isoformat()
            signature = b64encode(sign_message(private, stamp.encode())).decode()
            head = (f"POST /v1/fleet/push-object HTTP/1.1\r\nhost: {self.host}\r\n"
                    f"content-type: application/protobuf\r\ncontent-length: {self.body_bytes}\r\n"
                    f"flwr-public-key: {key}\r\nflwr-timestamp: {stamp}\r\n"
                    f"flwr-signature: {signature}\r\n\r\n")  # fmt: skip
            writer = answer = None
            try:
                reader, writer = await self._connect(True)
                writer.write(head.encode())
                answer = asyncio.ensure_future(reader.readline())
                sent = 0
                while sent < self.body_bytes and not answer.done():
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
                    self.body_bytes_sent += len(chunk)
                status = (await asyncio.wait_for(answer, 30)).split(b" ")
                self.answers[status[1].decode() if len(status) > 1 else "reset"] += 1
            except (OSError, ssl.SSLError, TimeoutError):
                self.answers["reset"] += 1
            finally:
                if answer is not None:
                    answer.cancel()
                if writer is not None:
                    writer.close()
            await asyncio.sleep(1)


def test_a_stranger_flooding_the_public_address_does_not_stop_a_dp_round(federation):
    """From 127.0.0.1 like the hospitals, a stranger holds 1,000 idle connections to the
    gateway (half TLS without a request, half TCP without a handshake: uvicorn's
    limit_concurrency of 256 once made every hospital's call 503) and keeps 50 requests with
    16 MiB bodies signed by a self-made key going (24 once took the gateway to 1.6 GB): a
    two-hospital DP round finishes meanwhile, the gateway stays under 300 MiB, closes the idle
    connections and refuses every body unread; every hospital is still online afterwards."""
    root = federation["root"]
    gateway = next(p for p in psutil.Process(federation["server"].pid).children(recursive=True)
                   if "server.gateway" in p.cmdline())  # fmt: skip
    before = gateway.memory_info().rss
    with Stranger(PUBLIC, federation["port"], root / "pki" / "ca.pem", gateway) as stranger:
        deadline = time.monotonic() + 30
        while stranger.max_held < 1000 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stranger.max_held >= 1000, stranger.max_held
        started = time.monotonic()
        run = _fedcare(
            "server", "run", "--superlink", federation["superlink"], "--pki", str(root / "pki"),
            "--rounds", "1", "--epsilon", "2", "--out", str(root / "run-flood"),
            "--app", str(federation["app"]), "--run-config",
            'model.name="logreg" strategy.fraction-train=0.5 strategy.fraction-evaluate=0.5',
            timeout=300,
        )  # fmt: skip
        round_s = time.monotonic() - started
    time.sleep(1)
    after = gateway.memory_info().rss
    mib = 2**20
    figures = (f"gateway RSS {before / mib:.0f} MiB before, peak {max(stranger.rss) / mib:.0f} "
               f"during, {after / mib:.0f} after; round {round_s:.1f} s; stranger held "
               f"{stranger.max_held} idle connections, the gateway closed {dict(stranger.closed)}; "
               f"bodies {dict(stranger.answers)}, {stranger.body_bytes_sent / mib:.0f} MiB sent")  # fmt: skip
    print(figures)
    assert run.returncode == 0, run.stdout + run.stderr + figures
    summary = json.loads((root / "run-flood" / "summary.json").read_text())
    trained = [h for h in summary["hospitals"] if h["rounds_trained"] == 1]
    assert len(trained) == 2 and all(0 < h["epsilon"] <= 2.0 for h in trained), summary
    assert max(stranger.rss) < 300 * mib, figures
    assert stranger.closed["tls"] > 0 and stranger.closed["tcp"] > 0, figures
    assert sum(stranger.answers.values()) >= 50, figures
    assert set(stranger.answers) <= {"401", "503", "reset"}, figures  # never read, never passed
    gateway_log = (root / "coordinator" / "gateway.log").read_text()
    assert "refused POST /v1/fleet/push-object from 127.0.0.1: 401 public key not registered" in (
        gateway_log
    )
    nodes = federation["cli"].json("supernode", "list", CONNECTION)["nodes"]
    assert sum(n["status"] == "online" for n in nodes) == len(HOSPITALS)


def test_a_hospital_added_while_running_joins_and_stops_once_removed(federation, tmp_path):
    """Hospital d makes its key and starts its daemon, which is refused and keeps trying; it is
    added to the running coordinator (nothing restarts) and joins the next run. After `server
    remove-hospital` its daemon is cut off, tries once more and stops, saying that the
    coordinator removed its key (not "not registered"); so does a new start with that key."""
    root, superlink, pki = (
        federation["root"],
        federation["superlink"],
        str(federation["root"] / "pki"),
    )
    keys = tmp_path / "hospital-d" / "keys"
    assert _fedcare("client", "keygen", "--out", str(keys), "--name", "d").returncode == 0
    state = _approved_state(federation, tmp_path / "hospital-d")
    log = tmp_path / "client-d.log"
    daemon = _start_hospital(root, "d", keys / "d.key", root / "data" / "hospital-2.csv", state,
                             federation["port"], log)  # fmt: skip
    federation.setdefault("extra", []).append(daemon)
    _wait(lambda: NOT_YET in log.read_text(), 90, log)
    server_pid = federation["server"].pid
    added = _fedcare(
        "server", "add-hospital", "d", str(keys / "d.pub"), "--pki", pki, "--superlink", superlink
    )
    assert added.returncode == 0 and "registered with the running coordinator" in added.stdout, (
        added.stdout + added.stderr
    )
    cli = federation["cli"]
    _wait(lambda: _connected(state), 90, log)
    _wait(lambda: sum(n["status"] == "online" for n in cli.json("supernode", "list", CONNECTION)["nodes"]) == 4,
          90, log)  # fmt: skip
    run = _fedcare(
        "server", "run", "--superlink", superlink, "--pki", pki, "--rounds", "1",
        "--out", str(root / "run-d"), "--app", str(federation["app"]),
        "--run-config", 'model.name="logreg" strategy.min-available-nodes=4', timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((root / "run-d" / "summary.json").read_text())
    trained = {h["name"]: (h["rounds_trained"], h["named_by"]) for h in summary["hospitals"]}
    assert trained == dict.fromkeys(("a", "b", "c", "d"), (1, "registered key")), trained
    assert federation["server"].pid == server_pid and federation["server"].poll() is None
    removed = _fedcare("server", "remove-hospital", "d", "--pki", pki, "--superlink", superlink)
    assert removed.returncode == 0 and "unregistered, its requests are refused" in removed.stdout
    removed_at = json.loads((root / "pki" / "registered.json").read_text())["removed_keys"][-1]
    assert removed_at["name"] == "d"
    # the SuperLink refuses its next heartbeat / pull; the next attempt is told of the removal
    assert daemon.wait(timeout=90) == 2
    told = " ".join(log.read_text().split())
    assert "stopped after joining" in told, told[-3000:]
    assert "the coordinator removed this hospital's key" in told
    assert f"on {removed_at['removed_at']}" in told and "fedcare client keygen" in told
    again = _start_refused(
        federation, "d", keys / "d.key", _approved_state(federation, tmp_path / "d-after")
    )
    assert again.returncode == 2 and "removed this hospital's key" in again.stderr, again.stderr
    assert NOT_YET not in again.stdout
    assert (
        sum(n["status"] == "online" for n in cli.json("supernode", "list", CONNECTION)["nodes"])
        == 3
    )
    status = _fedcare("server", "status", "--superlink", superlink, "--pki", pki)
    assert "│ d " not in status.stdout


def test_secure_aggregation_over_the_network(federation):
    """SecAgg+ between real SuperNodes: four protocol stages per round through the SuperLink; the
    hospitals' audit logs show that only masked vectors left them."""
    root = federation["root"]
    run = _fedcare(
        "server", "run", "--superlink", federation["superlink"], "--pki", str(root / "pki"),
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


def _start_refused(
    federation, name: str, key: Path, state: Path
) -> subprocess.CompletedProcess[str]:
    """`fedcare client start` at the public address, expected to end (refused): with
    --join-timeout 1 it gives up at its first refusal as not registered."""
    root = federation["root"]
    return _fedcare(
        "client", "start", "--superlink", f"{PUBLIC}:{federation['port']}", "--ca", str(root / "pki" / "ca.pem"),
        "--key", str(key), "--hospital", name, "--data", str(root / "data" / "hospital-1.csv"),
        "--port", str(_free_port()), "--state", str(state), "--join-timeout", "1",
        "--join-backoff", JOIN_BACKOFF, timeout=120,
    )  # fmt: skip


def test_unregistered_hospital_is_refused(federation, tmp_path):
    """A key the coordinator never added, two daemons at once: one keeps trying, saying each
    time what the coordinator's operator must run, until SIGTERM stops it (exit 0); one with
    --join-timeout gives up (exit 2) with the same instructions."""
    root = federation["root"]
    keygen = _fedcare("client", "keygen", "--out", str(tmp_path / "keys"), "--name", "rogue")
    assert keygen.returncode == 0
    key = tmp_path / "keys" / "rogue.key"
    waiting = _spawn(
        "client", "start", "--superlink", f"{PUBLIC}:{federation['port']}", "--ca", str(root / "pki" / "ca.pem"),
        "--key", str(key), "--hospital", "rogue", "--data", str(root / "data" / "hospital-1.csv"),
        "--port", str(_free_port()), "--state", str(_approved_state(federation, tmp_path / "waiting")),
        "--join-backoff", JOIN_BACKOFF, log=tmp_path / "waiting.log",
    )  # fmt: skip
    federation.setdefault("extra", []).append(waiting)
    proc = _start_refused(federation, "rogue", key, _approved_state(federation, tmp_path / "rogue"))
    assert proc.returncode == 2
    # without --policy a daemon runs under fedcare's default policy, and says so first
    assert (
        "hospital policy (fedcare's default" in proc.stdout
        and "allow-non-dp = false" in proc.stdout
    )
    stderr = " ".join(proc.stderr.split())
    assert "refused this hospital: its public key (SHA256:" in stderr
    assert "is still not registered there after" in stderr and "(--join-timeout 1)" in stderr
    assert "`fedcare server add-hospital rogue rogue.pub --pki PKI`" in stderr
    assert "Traceback" not in proc.stderr
    log = tmp_path / "waiting.log"
    _wait(lambda: NOT_YET in log.read_text(), 60, log)
    assert waiting.poll() is None  # refused, and still trying
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(timeout=30) == 0
    told = " ".join(log.read_text().split())
    assert "`fedcare server add-hospital rogue rogue.pub --pki PKI`" in told
    assert "Trying again in 1 s (attempt 2; Ctrl-C stops)" in told and "Traceback" not in told


def test_wrong_ca_says_certificate_not_verified(federation, tmp_path):
    other = tmp_path / "other-pki"
    init = _fedcare("server", "init", "--out", str(other), "--address", PUBLIC)
    assert init.returncode == 0
    root = federation["root"]
    _approved_state(federation, tmp_path / "a2")
    proc = _fedcare(
        "client", "start", "--superlink", f"{PUBLIC}:{federation['port']}", "--ca", str(other / "ca.pem"),
        "--key", str(root / "hospital-a" / "keys" / "a.key"), "--hospital", "a", "--data", str(root / "data" / "hospital-1.csv"),
        "--port", str(_free_port()), "--state", str(tmp_path / "a2"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "certificate at" in proc.stderr and "could not be verified" in proc.stderr


def _app_with_one_changed_line(dst: Path, tag: str = "changed") -> Path:
    """The fedcare app unpacked into ``dst`` with one line of client/client_app.py changed: the
    train reply names the hospital "NAME+TAG", so the report shows whose code ran."""
    unpack_app(dst)
    path = dst / "client" / "client_app.py"
    line = (
        'info = {"hospital": hospital.data.name, "device": device, "replayed": replay is not None}'
    )
    text = path.read_text()
    assert text.count(line) == 1
    path.write_text(
        text.replace(line, line.replace("hospital.data.name,", f'hospital.data.name + "+{tag}",'))
    )
    return dst


def test_a_run_no_hospital_may_run_fails(federation, tmp_path):
    """A bundle no hospital approved: every hospital refuses, and `server run` exits 1 saying
    that nothing was trained, with the refusal (Flower itself reports such a run as completed)."""
    root = federation["root"]
    app = _app_with_one_changed_line(tmp_path / "fedcare", tag="unapproved")
    run = _fedcare(
        "server", "run", "--superlink", federation["superlink"], "--pki", str(root / "pki"),
        "--rounds", "1", "--out", str(root / "run-unapproved"), "--app", str(app),
        "--run-config", 'model.name="logreg"', timeout=300,
    )  # fmt: skip
    output = " ".join(run.stdout.split())
    assert run.returncode == 1, run.stdout + run.stderr
    assert "trained nothing: no hospital trained: hospital " in output
    assert "is not approved here" in output
    summary = json.loads((root / "run-unapproved" / "summary.json").read_text())
    assert {f["hospital"] for f in summary["failures"]} == set(HOSPITALS)


def test_changed_bundle_is_refused_where_not_approved(federation, tmp_path):
    """Hospitals a and b approve the changed bundle, c does not: c answers with a refusal naming
    the bundle's hash (without installing it) and the run completes with a and b."""
    from client.approval import fab_bytes, inspect_fab

    root = federation["root"]
    app = _app_with_one_changed_line(tmp_path / "fedcare")
    changed = inspect_fab(fab_bytes(app)).sha256
    for name in ("a", "b"):
        ok = _fedcare("client", "approve", "--ledger", str(root / f"hospital-{name}" / "ledger"),
                      str(app), "--yes")  # fmt: skip
        assert ok.returncode == 0 and changed in ok.stdout, ok.stdout + ok.stderr
    run = _fedcare(
        "server", "run", "--superlink", federation["superlink"], "--pki", str(root / "pki"),
        "--rounds", "1", "--out", str(root / "run-changed"), "--app", str(app),
        "--run-config", 'model.name="logreg" strategy.min-train-nodes=2 strategy.min-evaluate-nodes=2',
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((root / "run-changed" / "summary.json").read_text())
    refused = [f for f in summary["failures"] if f["hospital"] == "c"]
    assert refused and all(
        f["reason"].startswith(f"hospital c refused: app bundle {changed} is not approved here")
        for f in refused
    ), summary["failures"]
    assert {f["hospital"] for f in summary["failures"]} == {"c"}
    trained = {h["name"]: h["rounds_trained"] for h in summary["hospitals"]}
    assert trained["a"] == trained["b"] == 1 and set(trained) == set(HOSPITALS)  # registered names
    # the approved bundle's own code ran at a and b (not the launcher's installed copy): their
    # self-reported hospital names are the changed code's, flagged against the registered keys
    assert summary["name_mismatches"] == [
        {"hospital": "a", "self_reported_name": "a+changed"},
        {"hospital": "b", "self_reported_name": "b+changed"},
    ]
    assert (
        "name mismatch: the hospital registered as a reports its name as 'a+changed'"
        in " ".join(run.stdout.split())
    )
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


def test_chaos_hospitals_killed_and_restarted_lose_no_release(federation):
    """Eight DP rounds while a random hospital is killed with SIGKILL (its daemon and everything it
    started) after rounds 1, 3 and 5 and started again a few seconds later with its own state:
    the run finishes, each killed hospital rejoins and trains again, and every hospital's ledger
    counts exactly the releases the coordinator received, plus at most one per time it was
    killed (the ledger is written BEFORE a reply leaves: a kill between the write and the send
    leaves a release counted that never left, never one that left uncounted), and nothing twice
    (DP-SGD steps = updates x steps per round). A killed hospital still listed online is sent
    the next round and waited for until train.round-timeout (12 s here); a reply that comes
    after that is counted in the ledger (it left) and named in the report ("timed out"), and a
    hospital that comes back after a round gave up is not handed its message (its TTL)."""
    root = federation["root"]
    rng = random.Random(11)
    kills: dict[str, list[int]] = {h: [] for h in HOSPITALS}
    restarts: list[threading.Thread] = []

    def chaos(server_round: int) -> None:
        name = rng.choice(HOSPITALS)
        kills[name].append(server_round)
        _kill_tree(federation["clients"][name].pid)
        federation["clients"][name].wait(timeout=30)

        def restart() -> None:
            time.sleep(3)
            i = HOSPITALS.index(name) + 1
            federation["clients"][name] = _start_hospital(
                root, name, root / f"hospital-{name}" / "keys" / f"{name}.key",
                root / "data" / f"hospital-{i}.csv", root / f"hospital-{name}", federation["port"],
                root / f"client-{name}-restart-{server_round}.log",
            )  # fmt: skip

        thread = threading.Thread(target=restart)
        thread.start()
        restarts.append(thread)

    run_dir = root / "run-chaos"
    proc = subprocess.Popen(
        [*FEDCARE, "server", "run", "--superlink", federation["superlink"], "--pki", str(root / "pki"),
         "--rounds", "8", "--epsilon", "3", "--out", str(run_dir), "--app", str(federation["app"]),
         "--run-config", "strategy.min-train-nodes=2 strategy.min-evaluate-nodes=2 "
         "strategy.min-available-nodes=2 train.round-timeout=12"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )  # fmt: skip
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 480
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("round ") and line.split()[1].split("/")[0] in ("1", "3", "5"):
            chaos(int(line.split()[1].split("/")[0]))
        if time.monotonic() > deadline:
            proc.kill()
    proc.wait(timeout=60)
    for thread in restarts:
        thread.join(timeout=60)
    output = "".join(lines)
    assert proc.returncode == 0, output
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = pd.read_csv(run_dir / "metrics.csv")
    for h in summary["hospitals"]:
        name = h["name"]
        record = json.loads(
            (
                root / f"hospital-{name}" / "ledger" / "runs" / f"{summary['run_id']}.json"
            ).read_text()
        )
        received = h["rounds_trained"]
        late = sum(  # replies that came after the round gave up (the ledger counts them: they left)
            f["hospital"] == name and f["kind"] == "train" and f["cause"] == "timed out"
            for f in summary["failures"]
        )
        assert received <= record["updates"] <= received + len(kills[name]) + late, (
            name, kills, late, output,
        )  # fmt: skip
        steps_per_round = record["accountant"]["history"][0][2] // max(1, record["updates"])
        assert record["train_steps"] == record["updates"] * steps_per_round  # nothing twice
        assert h["epsilon"] <= 3.0
        for killed in kills[name]:  # restarted with its own state, it trains again: the gateway
            # ends the killed daemon's connection, which Flower would time out only after 60 s
            trained = metrics[(metrics["hospital"] == name) & metrics["epsilon"].notna()]
            assert (trained["round"] > killed + 1).any(), (name, kills, output)
    assert sum(len(k) for k in kills.values()) == 3
    cli = federation["cli"]  # every restarted daemon is back (Flower lets a killed node's last
    _wait(  # connection time out after two 30 s heartbeat intervals; the daemon tries again)
        lambda: sum(n["status"] == "online" for n in cli.json("supernode", "list", CONNECTION)["nodes"])
        == len(HOSPITALS),
        120, root / "server.log",
    )  # fmt: skip


def _a_trained_model(federation) -> Path:
    """The final model of test_two_rounds_with_dp's run, else of a one-round run made here."""
    root = federation["root"]
    if (root / "run" / "model.safetensors").exists():
        return root / "run"
    run = _fedcare(
        "server", "run", "--superlink", federation["superlink"], "--pki", str(root / "pki"),
        "--rounds", "1", "--out", str(root / "run-for-evaluation"), "--app", str(federation["app"]),
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return root / "run-for-evaluation"


def test_federated_external_validation_charges_every_ledger_and_a_forbidding_policy_refuses(
    federation,
):
    """`fedcare server evaluate`: an evaluation-only run of a finished model at the three
    hospitals, with the noise and bins that make 40-70 test patients readable (σ = 2, 4 bins:
    ε 2.17 each). Each releases one noisy histogram pair, charged to its ledger (no training
    step, no update); the report has the per-hospital table, the pooled figures and heterogeneity.
    Then hospital b's policy forbids evaluation runs (`allow-evaluation-runs = false`; the
    daemon reads its policy file at every request): b refuses, its ledger unchanged, and the
    report names the refusal."""
    root, superlink, pki = (
        federation["root"],
        federation["superlink"],
        str(federation["root"] / "pki"),
    )
    model = _a_trained_model(federation)
    run = _fedcare(
        "server", "evaluate", "--model", str(model), "--superlink", superlink, "--pki", pki,
        "--out", str(root / "evaluation"), "--app", str(federation["app"]),
        "--noise", "2", "--bins", "4", timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    evaluation = json.loads((root / "evaluation" / "evaluation.json").read_text())
    assert [h["hospital"] for h in evaluation["hospitals"]] == list(HOSPITALS)
    assert evaluation["not_evaluated"] == []
    for h in evaluation["hospitals"]:
        assert h["noise_multiplier"] == 2.0 and 2.16 < h["epsilon"] < 2.17 and h["delta"] == 1e-5
        assert len(h["histograms"]["negatives"]) == 4
        auroc = h["metrics"]["auroc"]
        assert auroc["readable"] is False or auroc["ci"][0] <= auroc["value"] <= auroc["ci"][1]
    assert evaluation["heterogeneity"].get("k") == 3, evaluation["heterogeneity"]
    report = (root / "evaluation" / "report.md").read_text()
    for text in ("## Per hospital", "| a |", "| b |", "| c |", "random-effects pooled AUROC",
                 "95 % prediction interval", "I²", "### Calibration"):  # fmt: skip
        assert text in report, text
    assert "random-effects pooled AUROC" in run.stdout
    assert (root / "evaluation" / "federated-evaluation.png").stat().st_size > 10_000
    run_id = evaluation["run_id"]
    for h in HOSPITALS:
        entry = json.loads(
            (root / f"hospital-{h}" / "ledger" / "runs" / f"{run_id}.json").read_text()
        )
        assert entry["eval_releases"] == 1 and entry["updates"] == 0 and entry["train_steps"] == 0
        assert entry["accountant"]["history"] == [[2.0, 1.0, 1]]
        audit = [json.loads(x) for x in (root / f"hospital-{h}" / "ledger" / "audit.jsonl").open()]
        sent = [a for a in audit if a.get("run_id") == run_id and a.get("direction") == "sent"]
        assert [a["decision"] for a in sent] == ["evaluated"], sent
    policy = _test_policy(root)
    original = policy.read_text()
    policy.write_text(original + "allow-evaluation-runs = false\n")
    try:
        refused = _fedcare(
            "server", "evaluate", "--model", str(model), "--superlink", superlink, "--pki", pki,
            "--hospitals", "b", "--out", str(root / "evaluation-refused"),
            "--app", str(federation["app"]), timeout=600,
        )  # fmt: skip
    finally:
        policy.write_text(original)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    output = " ".join(refused.stdout.split())
    assert "allow-evaluation-runs = false" in output and "evaluated nothing" in output
    denied = json.loads((root / "evaluation-refused" / "evaluation.json").read_text())
    assert denied["hospitals"] == [] and [m["hospital"] for m in denied["not_evaluated"]] == ["b"]
    assert denied["not_evaluated"][0]["cause"] == "refused"
    assert (
        "allow-evaluation-runs = false" in (root / "evaluation-refused" / "report.md").read_text()
    )
    assert not (root / "hospital-b" / "ledger" / "runs" / f"{denied['run_id']}.json").exists()
    assert not (root / "hospital-a" / "ledger" / "runs" / f"{denied['run_id']}.json").exists()


# after the evaluation run: it needs every hospital, and this test leaves hospital c stopped
def test_a_hospital_dropping_mid_run_does_not_stop_it(federation):
    root = federation["root"]
    code, output = _run_until_round_one(
        ["server", "run", "--superlink", federation["superlink"], "--pki", str(root / "pki"), "--rounds", "3",
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
    # every round c missed is named, with why (asked and lost, or no longer connected)
    frame = pd.read_csv(root / "run-drop" / "metrics.csv")
    trained = set(frame[(frame["hospital"] == "c") & frame["n_train"].notna()]["round"])
    assert {f["round"] for f in dropped if f["kind"] == "train"} == {1, 2, 3} - trained, dropped
    assert {f["cause"] for f in dropped} <= {"dropped", "timed out", "offline"}, dropped
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
        ["server", "run", "--superlink", federation["superlink"], "--pki", str(root / "pki"), "--rounds", "3",
         "--strategy", "fedadam", "--out", str(run_dir), "--app", str(federation["app"]),
         "--run-config", settings, "--min-hospitals", "2"],  # c dropped out (test above)
        lambda: _kill_tree(federation["server"].pid),  # the coordinator crashes
    )  # fmt: skip
    assert code == 2 and "--resume" in output, output
    federation["server"] = _start_coordinator(
        root, port, federation["internal"], root / "server2.log"
    )
    cli = federation["cli"]
    _wait(lambda: sum(n["status"] == "online" for n in cli.json("supernode", "list", CONNECTION)["nodes"]) >= 2,
          120, root / "server2.log")  # fmt: skip
    resumed = _fedcare("server", "run", "--superlink", federation["superlink"], "--pki", str(root / "pki"),
                       "--resume", str(run_dir), "--app", str(federation["app"]), "--min-hospitals", "2",
                       timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "round   2/3" in resumed.stdout and "round   3/3" in resumed.stdout
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert sorted(metrics["round"].unique()) == [1, 2, 3]  # continuous numbering, history kept
    summary = json.loads((run_dir / "summary.json").read_text())
    for h in summary["hospitals"]:
        if h["name"] in ("a", "b"):
            assert h["rounds_trained"] == 3
            assert h["epsilon"] <= 2.0  # never double-spent, even for the repeated round 2
    # the restarted coordinator gave a and b new node ids: the same hospitals, never "offline"
    assert not [m for m in summary["failures"] if m["hospital"] in ("a", "b")], summary["failures"]
    # one fedcare run id, two Flower run ids, on both sides
    assert len(summary["flower_run_ids"]) == 2, summary["flower_run_ids"]
    for h in ("a", "b"):
        entry = root / f"hospital-{h}" / "ledger" / "runs" / f"{summary['run_id']}.json"
        assert json.loads(entry.read_text())["flower_run_ids"] == summary["flower_run_ids"]
    first = load_file(str(run_dir / "checkpoints" / "round-001.safetensors"))
    final = load_file(str(run_dir / "model.safetensors"))
    assert any(not torch.equal(first[k], final[k]) for k in first)
    assert (run_dir / "checkpoints" / "round-003.strategy.safetensors").exists()  # FedAdam moments
    # that the resumed rounds start from the checkpoint (and not afresh) is pinned where runs are
    # reproducible, without DP: tests/test_e2e_simulation.py (a deployed DP run's noise is drawn
    # from the operating system's CSPRNG at each hospital, so no two runs end at the same weights)


def test_add_hospital_while_the_coordinator_registers_the_same_key_is_not_an_error(federation):
    """`server start` registers the PKI folder's keys while `server add-hospital` may be
    registering the one it just stored (a newcomer running the two in a row): the SuperLink then
    refuses the second with "Public key already in use". Here the first process has registered
    the key and records its node id a second later, while the second reconciles: the second
    reports the hospital registered under that id instead of failing."""
    from server.hospitals import HospitalRegistry
    from server.pki import PKI

    root, cli = federation["root"], federation["cli"]
    keys = root / "hospital-e" / "keys"
    assert _fedcare("client", "keygen", "--out", str(keys), "--name", "e").returncode == 0
    first, second = HospitalRegistry(PKI(root / "pki")), HospitalRegistry(PKI(root / "pki"))
    first.add_key("e", keys / "e.pub")
    try:
        answer = cli.json("supernode", "register", str(PKI(root / "pki").hospital_pub("e")),
                          CONNECTION, "--name", "e")  # fmt: skip
        node_id = int(answer["node-id"])

        def record() -> None:  # the first process writes the node id a moment later
            time.sleep(1.0)
            data = first.load()
            data["hospitals"]["e"]["node_id"] = node_id
            first.save(data)

        recorder = threading.Thread(target=record)
        recorder.start()
        registered, failed = second.reconcile(cli)  # sees "e" unregistered: registers, refused
        recorder.join()
        assert registered.get("e") == node_id and "e" not in failed, failed
    finally:
        removed = _fedcare("server", "remove-hospital", "e", "--pki", str(root / "pki"),
                           "--superlink", federation["superlink"])  # fmt: skip
        assert removed.returncode == 0, removed.stdout + removed.stderr
