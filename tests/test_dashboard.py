"""The dashboards in a real browser (headless Chromium driven by Selenium) and over real HTTP,
and `--tracking mlflow` read back with MLflow's own client.

One real `fedcare simulate` (3 hospitals, 4 rounds, DP, ledgers, a hospital policy with a lifetime
cap of 2.5, `--tracking mlflow`) runs while Chromium watches the coordinator's page; a second
simulation with the same ledgers is refused by every hospital (its lifetime cap), which the
hospital's page must show next to the first run's ledger entry. Browser tests skip when Debian's
Chromium is missing (`.ci/run` installs it); screenshots go to each test's tmp_path.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.browser import NO_BROWSER, get, headless_chromium

ROOT = Path(__file__).resolve().parents[1]
RUNS = 4  # rounds of the watched simulation
TOKEN = "t0ken-for-the-dashboard-tests"
HOSTILE = "<script>window.pwned=1</script>"
HOSTILE_REASON = '<img src=x onerror="window.pwned=2">'


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(app, **ssl_files: str) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a loopback port in a thread; yield its base URL."""
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **ssl_files)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the dashboard did not start"
    try:
        yield f"{'https' if ssl_files else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _simulate(out: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_"))}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "simulate", "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """A real simulation, watched live in Chromium on the coordinator's dashboard (when Chromium
    is installed), then a second one with the same ledgers that every hospital refuses."""
    tmp = tmp_path_factory.mktemp("federation")
    runs, ledgers, policy, shots = tmp / "runs", tmp / "ledgers", tmp / "policy.toml", tmp / "shots"
    runs.mkdir()
    shots.mkdir()
    policy.write_text("lifetime-epsilon = 2.5\n")
    common = ["--hospitals", "3", "--epsilon", "2", "--ledger-dir", str(ledgers),
              "--policy", str(policy)]  # fmt: skip
    live = [*common, "--rounds", str(RUNS), "--tracking", f"mlflow={tmp / 'mlruns'}"]
    browser = headless_chromium()
    try:
        if browser is None:
            proc = _simulate(runs / "live", *live)
            output, seen, page = proc.communicate(timeout=240)[0], [], None
            assert proc.returncode == 0, output
        else:
            output, seen, page = _watch(browser, runs, live, shots)
        refused = _simulate(runs / "refused", *common, "--rounds", "2")
        refused_output = refused.communicate(timeout=240)[0]
        yield SimpleNamespace(
            tmp=tmp, runs=runs, ledgers=ledgers, policy=policy, seen=seen, page=page,
            output=output, refused_code=refused.returncode, refused_output=refused_output,
            shots=shots, browser=browser,
        )  # fmt: skip
    finally:
        if browser is not None:
            browser.quit()


def _watch(browser, runs: Path, args: list[str], shots: Path):  # type: ignore[no-untyped-def]
    """Run `fedcare simulate ARGS --out RUNS/live` while ``browser`` shows the coordinator's
    page; return (output, round counter texts seen, what the page shows at the end)."""
    from selenium.webdriver.common.by import By

    from server.dashboard import build_app

    seen: list[str] = []
    with serving(build_app(runs)) as base:
        browser.get(base + "/")
        assert browser.find_elements(By.ID, "no-runs")  # nothing yet
        proc = _simulate(runs / "live", *args)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # an element replaced by the page's refresh
                counters = browser.find_elements(By.ID, "round-counter")
                if counters and (not seen or seen[-1] != counters[0].text):
                    seen.append(counters[0].text)
                status = browser.find_elements(By.ID, "run-status")
                if proc.poll() is not None and status and status[0].text == "finished":
                    break
            time.sleep(0.1)
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, output
        time.sleep(1.5)  # one more refresh of the page and its curves
        browser.save_screenshot(str(shots / "coordinator.png"))
        chart = browser.find_element(By.ID, "chart-epsilon")
        page = SimpleNamespace(
            counter=browser.find_element(By.ID, "round-counter").text,
            hospitals=[
                row.find_elements(By.TAG_NAME, "td")[0].text
                for row in browser.find_elements(By.CSS_SELECTOR, "#run-hospitals tbody tr")
            ],
            epsilon_series=chart.get_attribute("data-series"),
            epsilon_points=chart.get_attribute("data-points"),
            canvases=len(browser.find_elements(By.CSS_SELECTOR, "#chart-epsilon canvas")),
            error=browser.execute_script("return document.body.dataset.error || null"),
            round_ticks=browser.execute_script(  # uPlot's tick values of the x axis
                "return fedcareCharts['chart-epsilon'].plot.axes[0]._splits"
            ),
        )
    return output, seen, page


@pytest.mark.slow
def test_coordinator_page_follows_a_live_simulation_to_its_last_round(federation, tmp_path):
    if federation.browser is None:
        pytest.skip(NO_BROWSER)
    page = federation.page
    print("round counter as the browser saw it:", federation.seen)
    assert page.counter == f"{RUNS} / {RUNS}", federation.seen
    # the counter only ever moved forward while the page polled the run folder
    rounds = [int(text.split(" / ")[0]) for text in federation.seen]
    assert rounds == sorted(rounds) and rounds[-1] == RUNS, federation.seen
    assert page.hospitals == ["hospital-1", "hospital-2", "hospital-3"]
    # the ε curve: one line per hospital plus the target, over every round, drawn on a canvas
    assert page.epsilon_series == "4" and page.epsilon_points == str(RUNS)
    assert page.canvases >= 1 and page.error is None
    assert page.round_ticks == list(range(1, RUNS + 1)), page.round_ticks  # whole rounds only
    summary = json.loads((federation.runs / "live" / "summary.json").read_text())
    assert all(0 < h["epsilon"] <= 2.0 for h in summary["hospitals"])
    shutil.copy(federation.shots / "coordinator.png", tmp_path / "coordinator.png")
    assert (tmp_path / "coordinator.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_curves_json_is_the_run_folders_history(federation):
    from server.dashboard import build_app

    with serving(build_app(federation.runs)) as base:
        status, body = get(base, "/api/run/live")
    assert status == 200
    curves = json.loads(body)["curves"]
    history = json.loads((federation.runs / "live" / "history.json").read_text())
    eps = {  # a hospital's ε after its last release of each round (training, evaluation)
        (e["hospital"], e["round"]): e["metrics"]["epsilon"]
        for e in history["events"]
        if not e["error"] and "epsilon" in e["metrics"]
    }
    assert curves["rounds"] == list(range(1, RUNS + 1))
    for hospital, values in curves["epsilon"].items():
        assert values == [eps[(hospital, r)] for r in curves["rounds"]]
    assert curves["target_epsilon"] == 2.0
    from client.ledger import Ledger

    (record,) = Ledger(federation.ledgers / "hospital-1").records()
    # the last point is the hospital's own accountant over every step it took
    assert curves["epsilon"]["hospital-1"][-1] == pytest.approx(record.epsilon(), rel=1e-9)


@pytest.mark.slow
def test_a_deployed_runs_pooled_auroc_is_on_the_page_and_its_curve(federation, tmp_path):
    """A deployment has no centralised evaluation: its pooled AUROC is the report's, from the
    hospitals' last noisy score histograms summed (summary.json's overall block), at the last
    round with an evaluation (the simulation's run folder, made to look deployed)."""
    from server.dashboard import build_app

    runs = tmp_path / "runs"
    shutil.copytree(federation.runs / "live", runs / "deployed")
    history = json.loads((runs / "deployed" / "history.json").read_text())
    history["centralized"] = {}
    (runs / "deployed" / "history.json").write_text(json.dumps(history))
    summary = json.loads((runs / "deployed" / "summary.json").read_text())
    method = "pooled test counts of 3 hospital(s) (score histograms summed)"
    summary["overall"] = {"auroc": 0.8125, "method": method,
                          "intervals": {"auroc": {"value": 0.8125, "ci": [0.625, 0.9375]}}}  # fmt: skip
    (runs / "deployed" / "summary.json").write_text(json.dumps(summary))
    with serving(build_app(runs)) as base:
        curves = json.loads(get(base, "/api/run/deployed")[1])["curves"]
        body = get(base, "/fragment")[1]
    assert curves["pooled_auroc"] == [None] * (RUNS - 1) + [0.8125]
    assert f'<td id="pooled-auroc">0.812 (95 % CI 0.625–0.938) <span class="muted">{method}' in body


@pytest.mark.slow
def test_mlflow_reads_back_the_run_params_and_per_round_metrics(federation):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(federation.tmp / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("fedcare")
    (run,) = client.search_runs([experiment.experiment_id])
    history = json.loads((federation.runs / "live" / "history.json").read_text())
    assert run.data.params["train.rounds"] == str(RUNS)
    assert run.data.params["dp.target-epsilon"] == "2.0"
    assert (
        run.data.tags["fedcare.run_id"]
        == json.loads((federation.runs / "live" / "summary.json").read_text())["run_id"]
    )
    for hospital in ("hospital-1", "hospital-2", "hospital-3"):
        logged = client.get_metric_history(run.info.run_id, f"{hospital}.epsilon")
        expected = {
            e["round"]: e["metrics"]["epsilon"]
            for e in history["events"]
            if e["hospital"] == hospital and not e["error"] and "epsilon" in e["metrics"]
        }
        assert {m.step: m.value for m in logged} == pytest.approx(expected)
        assert [m.step for m in logged] == list(range(1, RUNS + 1))
    pooled = client.get_metric_history(run.info.run_id, "pooled.auroc")
    assert [m.step for m in pooled] == list(range(1, RUNS + 1))
    assert 0.9 < pooled[-1].value <= 1.0
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "curves.png", "model.safetensors", "model.md"} <= artefacts


@pytest.mark.slow
def test_hospital_page_shows_its_ledger_and_the_refusal(federation, tmp_path):
    if federation.browser is None:
        pytest.skip(NO_BROWSER)
    from selenium.webdriver.common.by import By

    from client.dashboard import build_app
    from client.ledger import Ledger, lifetime_epsilon

    assert federation.refused_code == 2, federation.refused_output
    ledger = federation.ledgers / "hospital-1"
    before = _digest(ledger)
    app, _ = build_app(ledger, policy=federation.policy)
    browser = federation.browser
    with serving(app) as base:
        browser.get(base + "/")
        browser.save_screenshot(str(tmp_path / "hospital.png"))
        shutil.copy(tmp_path / "hospital.png", federation.shots / "hospital.png")
        rows = browser.find_elements(By.CSS_SELECTOR, "#ledger tbody tr")
        lifetime_text = browser.find_element(By.ID, "lifetime").text
        refused = browser.find_elements(By.CSS_SELECTOR, "#audit tbody tr.decision-refused")
        refused_text = refused[0].text if refused else ""
        search = browser.find_element(By.ID, "audit-search")
        search.send_keys("refused")
        shown = browser.find_element(By.ID, "audit").get_attribute("data-shown")
    records = Ledger(ledger).records()
    assert len(records) == 1 and len(rows) == 1  # the refused run left nothing in the ledger
    assert records[0].run_id in rows[0].text and f"{records[0].epsilon():.3f}" in rows[0].text
    total = lifetime_epsilon([r.accountant for r in records], delta=records[0].hospital_delta)
    assert f"lifetime ε = {total:.3f} of the policy's cap 2.5" in lifetime_text
    assert "lifetime ε above the policy's lifetime-epsilon 2.5" in refused_text
    assert int(shown) == len(refused) >= 1
    assert _digest(ledger) == before  # read-only


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_run_config_values_and_hospital_texts_are_shown_as_text(federation, tmp_path):
    """A hostile run config and a hostile hospital's refusal text and hospital name: shown as text,
    never run as script, in the browser's DOM."""
    if federation.browser is None:
        pytest.skip(NO_BROWSER)
    from selenium.webdriver.common.by import By

    from server.dashboard import build_app

    runs = tmp_path / "runs"
    shutil.copytree(federation.runs / "live", runs / "hostile")
    for sidecar in (runs / "hostile" / "checkpoints").glob("round-*[0-9].json"):
        data = json.loads(sidecar.read_text())
        data["run_config"]["output.dir"] = HOSTILE
        sidecar.write_text(json.dumps(data))
    history = json.loads((runs / "hostile" / "history.json").read_text())
    history["events"].append(
        {
            "round": RUNS,
            "kind": "evaluate",
            "node_id": 1,
            "hospital": HOSTILE,
            "error": HOSTILE_REASON,
            "cause": "refused",
        }  # fmt: skip
    )
    (runs / "hostile" / "history.json").write_text(json.dumps(history))
    browser = federation.browser
    with serving(build_app(runs)) as base:
        browser.get(base + "/?run=hostile")
        time.sleep(1.5)  # the page's own refresh inserted the fragment again
        browser.execute_script("document.querySelector('#run details').open = true")
        config_text = browser.find_element(By.ID, "run-config").text
        failures_text = browser.find_element(By.ID, "failures").text
        scripts = browser.find_elements(By.CSS_SELECTOR, "#live script, #live img")
        pwned = browser.execute_script("return window.pwned === undefined ? null : window.pwned")
    assert HOSTILE in config_text
    assert HOSTILE in failures_text and HOSTILE_REASON in failures_text
    assert scripts == [] and pwned is None


def test_hospital_page_shows_a_hostile_audit_line_as_text(tmp_path):
    """The audit log holds what the coordinator sent (message type, refusal texts): as text."""
    from client.dashboard import build_app

    ledger = tmp_path / "ledger"
    ledger.mkdir()
    (ledger / "audit.jsonl").write_text(
        json.dumps({"direction": "received", "message_type": HOSTILE, "run_id": "r1"}) + "\n"
        + "not json\n"
    )  # fmt: skip
    app, _ = build_app(ledger)
    with serving(app) as base:
        status, body = get(base, "/")
    assert status == 200
    assert HOSTILE not in body and "&lt;script&gt;window.pwned=1&lt;/script&gt;" in body
    assert "line 2 is not a JSON object" in body


@pytest.fixture
def run_folder(federation, tmp_path) -> Path:
    """The simulation's finished run folder, with a secret inside and one beside it."""
    tmp = tmp_path
    shutil.copytree(federation.runs / "live", tmp / "runs" / "r1")
    (tmp / "secret.txt").write_text("SECRET-OUTSIDE")
    (tmp / "runs" / "r1" / "secret.json").write_text('"SECRET-INSIDE"')
    return tmp / "runs"


TRAVERSALS = [
    "/static/../../../../etc/passwd",
    "/static/..%2f..%2f..%2fsecret.txt",
    "/static/%2e%2e/__init__.py",
    "/static/%2e%2e/templates/base.html",
    "/runs/..%2f..%2fsecret.txt/report.md",
    "/runs/%2e%2e/secret.txt",
    "/runs/r1/secret.json",
    "/runs/r1/..%2fsecret.txt",
    "/runs/r1/checkpoints%2fround-001.json",
    "/runs/r1/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/api/run/..%2f..",
    "/?run=../secret.txt",
]


@pytest.mark.slow
def test_no_file_outside_what_the_dashboard_shows(run_folder):
    from server.dashboard import build_app

    with serving(build_app(run_folder)) as base:
        assert get(base, "/runs/r1/report.md")[0] == 200
        assert get(base, "/static/uPlot.iife.min.js")[0] == 200
        for path in TRAVERSALS:
            status, body = get(base, path)
            assert "SECRET" not in body and "root:" not in body, path
            assert "{% " not in body and "import " not in body, path
            if not path.startswith("/?"):
                assert status in (400, 404), (path, status)


@pytest.mark.slow
def test_a_token_guards_every_request_over_the_consortium_tls(run_folder, tmp_path):
    from server.dashboard import build_app
    from server.pki import PKI, init_pki

    init_pki(tmp_path / "pki", addresses=["127.0.0.1"])
    pki = PKI(tmp_path / "pki")
    app = build_app(run_folder, hosts=("*",), token=TOKEN, tls=True)
    tls = ssl.create_default_context(cafile=str(pki.ca_cert))
    files = {"ssl_certfile": str(pki.server_cert), "ssl_keyfile": str(pki.server_key)}
    with serving(app, **files) as base:
        for path in ("/", "/fragment", "/api/run/r1", "/runs/r1/report.md", "/static/dashboard.js"):
            assert get(base, path, context=tls)[0] == 401, path
            wrong = {"Authorization": "Bearer " + "x" * len(TOKEN)}
            assert get(base, path, context=tls, headers=wrong)[0] == 401, path
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert get(base, path, context=tls, headers=good)[0] == 200, path
        assert get(base, f"/?token={TOKEN}", context=tls)[0] == 303  # sets the cookie once
        cookie = {"Cookie": f"fedcare-dashboard-token={TOKEN}"}
        assert get(base, "/fragment", context=tls, headers=cookie)[0] == 200
        with pytest.raises((ssl.SSLError, http.client.HTTPException, ConnectionError)):
            get(base.replace("https", "http"), "/")  # plain HTTP is not served


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_off_loopback_the_coordinator_dashboard_needs_a_token_and_the_certificate(tmp_path):
    no_token = _cli("server", "dashboard", "--runs", str(tmp_path), "--host", "0.0.0.0")
    assert no_token.returncode == 2 and "needs --token" in no_token.stderr + no_token.stdout
    no_pki = _cli("server", "dashboard", "--runs", str(tmp_path), "--host", "0.0.0.0",
                  "--token", TOKEN)  # fmt: skip
    assert no_pki.returncode == 2 and "--pki" in no_pki.stderr + no_pki.stdout


def test_the_hospital_dashboard_is_loopback_only(tmp_path):
    from client.dashboard import build_app

    (tmp_path / "ledger").mkdir()
    for host in ("0.0.0.0", "192.168.1.10"):
        proc = _cli("client", "dashboard", "--ledger", str(tmp_path / "ledger"), "--host", host)
        assert proc.returncode == 2 and "loopback only" in proc.stderr + proc.stdout, host
    app, _ = build_app(tmp_path / "ledger")
    with serving(app) as base:
        assert get(base, "/")[0] == 200
        # a page elsewhere reaching it through DNS rebinding names another host: refused
        assert get(base, "/", headers={"Host": "attacker.example:80"})[0] == 400


def test_dashboards_are_read_only():
    """GET only, and the hospital dashboard imports nothing that writes the ledger or approvals."""
    from client.dashboard import build_app as hospital_app
    from server.dashboard import build_app as coordinator_app

    tree = ast.parse((ROOT / "client" / "dashboard.py").read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
         for alias in node.names}  # fmt: skip
    assert not imported & {"client.ledger", "client.approval", "client.audit", "client.client_app"}
    app, _ = hospital_app(ROOT)
    for router in (app.router, coordinator_app(ROOT).router):
        for route in router.routes:
            methods = getattr(route, "methods", None)
            assert methods is None or methods <= {"GET", "HEAD"}, route


def test_the_gateways_counters_reach_the_coordinator_page(tmp_path):
    """Requests the gateway refused, counted per route in STATE/gateway-counters.json, shown."""
    import asyncio

    import httpx

    from server.dashboard import build_app
    from server.gateway import Gateway

    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "runs").mkdir()
    gateway = Gateway("http://superlink", counters=state / "gateway-counters.json")

    async def go() -> list[int]:
        transport = httpx.ASGITransport(app=gateway, client=("203.0.113.7", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="https://coordinator") as c:
            headers = {"content-type": "application/protobuf"}
            statuses = [(await c.post("/v1/control/list-runs", headers=headers)).status_code]
            statuses.append((await c.post("/v1/fleet/pull-messages", headers=headers)).status_code)
        return statuses

    assert all(code >= 400 for code in asyncio.run(go()))
    gateway.write_counters(force=True)
    counters = json.loads((state / "gateway-counters.json").read_text())
    assert counters["refused"] == {"other": 1, "pull-messages": 1} and counters["forwarded"] == {}
    with serving(build_app(tmp_path / "runs", state=state)) as base:
        status, body = get(base, "/fragment")
    assert status == 200
    assert "<td>pull-messages</td><td>0</td><td>1</td>" in body.replace("\n", "")


def test_a_route_both_forwarded_and_refused_is_one_row(tmp_path):
    """A hospital refused before its key was added, then forwarded (the loopback deployment's
    activate-node: 3 forwarded, 11 refused): one row per route, routes in order (the template
    once sorted and de-duplicated the refused routes only, listing such a route twice)."""
    from server.dashboard import build_app

    (tmp_path / "state").mkdir()
    (tmp_path / "runs").mkdir()
    counters = {"updated": "2026-12-07T17:30:01+00:00",
                "forwarded": {"pull-messages": 224, "activate-node": 3},
                "refused": {"activate-node": 11, "other": 2}}  # fmt: skip
    (tmp_path / "state" / "gateway-counters.json").write_text(json.dumps(counters))
    with serving(build_app(tmp_path / "runs", state=tmp_path / "state")) as base:
        status, body = get(base, "/fragment")
    assert status == 200
    table = body.replace("\n", "").split('<section id="gateway">')[1]
    rows = [row.split("</td>")[0] for row in table.split("<tr><td>")[1:]]
    assert rows == ["activate-node", "other", "pull-messages"], rows
    assert "<td>activate-node</td><td>3</td><td>11</td>" in table


def _first_answer(base: str, tls: ssl.SSLContext, proc: subprocess.Popen) -> int | None:
    """The status of GET / once the dashboard answers; None if its process exited."""
    deadline = time.monotonic() + 60
    while proc.poll() is None:
        try:
            return get(base, "/", context=tls)[0]
        except (OSError, http.client.HTTPException):
            assert time.monotonic() < deadline, "the dashboard did not open its port"
            time.sleep(0.2)
    return None


def test_the_command_serves_off_loopback_over_tls_with_the_token_only(tmp_path):
    """`fedcare server dashboard --host 0.0.0.0 --token T --pki P`: HTTPS with the consortium's
    certificate; 401 without the token; the registered hospitals listed (no SuperLink running)."""
    from server.hospitals import HospitalRegistry
    from server.pki import PKI, init_pki
    from shared_models.node_keys import generate_key_pair

    init_pki(tmp_path / "pki", addresses=["127.0.0.1"])
    pki = PKI(tmp_path / "pki")
    key_dir = tmp_path / "keys"
    generate_key_pair(key_dir, "st-mary")
    HospitalRegistry(pki).add_key("st-mary", key_dir / "st-mary.pub")
    (tmp_path / "runs").mkdir()
    tls = ssl.create_default_context(cafile=str(pki.ca_cert))
    for _attempt in range(3):  # another process may take the free port first: try another
        port = _free_port("0.0.0.0")
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulations.cli", "server", "dashboard", "--runs",
             str(tmp_path / "runs"), "--pki", str(pki.root), "--host", "0.0.0.0", "--port",
             str(port), "--superlink", f"127.0.0.1:{_free_port()}"],
            env={**os.environ, "PYTHONPATH": str(ROOT), "FEDCARE_DASHBOARD_TOKEN": TOKEN},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        base = f"https://127.0.0.1:{port}"
        status = _first_answer(base, tls, proc)
        if status is not None:
            break
        output = proc.communicate()[0]
        assert "address already in use" in output, output
    try:
        assert status == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        status, body = get(base, "/", context=tls, headers=good)
        assert status == 200
        assert '<td>st-mary</td><td>-</td><td class="state-key-stored">key stored</td>' in body
        assert "not reachable: registry only" in body
    finally:
        proc.terminate()
        proc.wait(10)


def test_an_unknown_tracker_is_one_clear_message(tmp_path):
    proc = _cli("simulate", "--tracking", "wandb", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "--tracking 'wandb': use mlflow or mlflow=URI" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_running_runs_curves_come_from_history_json(tmp_path):
    """While a run goes on, the page's history is history.json (rewritten every round), not the
    checkpoint sidecar, which holds only its own round."""
    import torch

    from server.checkpoint import record_flower_run, save_weights
    from server.dashboard import read_run
    from server.history import HospitalEvent, RunHistory

    folder = tmp_path / "run"
    record_flower_run(folder, run_id="r", flower_run_id=1, after_round=0)
    history = RunHistory(
        events=[
            HospitalEvent(
                round=r, kind="train", node_id=1, hospital="a", metrics={"epsilon": 0.5 * r}
            )
            for r in (1, 2)
        ]
    )
    (folder / "history.json").write_text(json.dumps(history.to_dict()))
    sidecar = {"round": 2, "run_config": {"train.rounds": 5}, "elapsed_seconds": 4.0,
               "events": [e for e in history.to_dict()["events"] if e["round"] == 2]}  # fmt: skip
    save_weights(folder / "checkpoints" / "round-002.safetensors", {"w": torch.zeros(1)}, sidecar)
    view = read_run(folder)
    assert (view.status, view.round, view.rounds) == ("running", 2, 5)
    assert view.history == history
