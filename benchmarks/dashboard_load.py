"""Page load time of the coordinator dashboard with a 300-hospital run's history.

Writes a run folder as the ServerApp writes it (``flower-runs.json``, ``checkpoints/round-NNN``
weights + sidecar with that round's replies, ``history.json`` with the
:class:`server.history.RunHistory` so far; with ``--finished`` also ``summary.json``) for HOSPITALS simulated hospitals over ROUNDS rounds, each
hospital training and evaluating every round (per-round ε, δ, loss, AUROC; the values are drawn
at random: this measures the page, not a model), then serves ``fedcare server dashboard``'s app
with uvicorn on loopback and measures:

    server    time of one request (whole response read) over real HTTP: the page, its live
              fragment (polled every second) and the curves' JSON; the first request parses
              the run folder (again after each change: each round), the others reuse it
    browser   headless Chromium (Selenium): navigation start to the load event, and to the
              three charts drawn with every hospital's curve (uPlot)

Usage: python benchmarks/dashboard_load.py [--hospitals 300] [--rounds 20] [--repeat 20]
The acceptance bound (issue #27) is one second for the page in the browser.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_run(folder: Path, *, hospitals: int, rounds: int, finished: bool) -> None:
    """A run folder of ``hospitals`` x ``rounds`` (see the module docstring)."""
    import torch

    from server.checkpoint import record_flower_run, save_weights
    from server.history import HospitalEvent, RunHistory
    from server.run_config import default_run_config

    rng = random.Random(0)
    config = {**default_run_config(), "train.rounds": rounds, "simulation.hospitals": hospitals}
    history = RunHistory()
    names = [f"hospital-{i + 1}" for i in range(hospitals)]
    history.hospitals = {i + 1: name for i, name in enumerate(names)}
    record_flower_run(folder, run_id="bench", flower_run_id=1, after_round=0)
    for r in range(1, rounds + 1):
        for i, name in enumerate(names):
            eps = 2.0 * (r / rounds) ** 0.5
            history.events.append(HospitalEvent(
                round=r, kind="train", node_id=i + 1, hospital=name,
                metrics={"num-examples": 100.0, "epsilon": eps, "delta": 1e-5,
                         "train-loss": 0.7 * 0.9**r + 0.05 * rng.random()},
            ))  # fmt: skip
            if i % 50 == 7 and r == rounds // 2:
                history.events.append(HospitalEvent(
                    round=r, kind="evaluate", node_id=i + 1, hospital=name,
                    error="hospital refused: lifetime ε above the policy's cap", cause="refused",
                ))  # fmt: skip
                continue
            history.events.append(HospitalEvent(
                round=r, kind="evaluate", node_id=i + 1, hospital=name,
                metrics={"num-examples": 40.0, "auroc": 0.8 + 0.15 * rng.random()},
            ))  # fmt: skip
        history.centralized[r] = {"auroc": 0.9 + 0.005 * r}
        (folder / "history.json").write_text(json.dumps(history.to_dict()))
        events = [asdict(ev) for ev in history.events if ev.round == r]
        sidecar = {"round": r, "run_id": 1, "run_config": config, "events": events,
                   "elapsed_seconds": 3.0 * r}  # fmt: skip
        save_weights(folder / "checkpoints" / f"round-{r:03d}.safetensors",
                     {"w": torch.zeros(4)}, sidecar)  # fmt: skip
    if finished:
        (folder / "summary.json").write_text(json.dumps({"run_id": "bench", "wall_seconds": 60.0}))


def _median_get(port: int, path: str, repeat: int) -> tuple[float, float, int]:
    """(first request's seconds, median of the others, bytes) of GET ``path``."""
    times, size = [], 0
    for _ in range(repeat):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        t0 = time.perf_counter()
        conn.request("GET", path)
        body = conn.getresponse().read()
        times.append(time.perf_counter() - t0)
        size = len(body)
        conn.close()
    return times[0], statistics.median(times[1:]), size


def _browser_load(port: int, repeat: int) -> tuple[float, float] | None:
    """Median (load event, charts drawn) seconds in headless Chromium, or None without it."""
    if not Path("/usr/bin/chromium").exists():
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    loads, charts = [], []
    try:
        for _ in range(repeat):
            driver.get("about:blank")
            t0 = time.perf_counter()
            driver.get(f"http://127.0.0.1:{port}/")  # returns after the load event
            WebDriverWait(driver, 30, poll_frequency=0.01).until(
                lambda d: d.execute_script(
                    "const e = document.getElementById('chart-loss');"
                    "return e && e.dataset.points ? 1 : 0"
                )
            )
            charts.append(time.perf_counter() - t0)
            loads.append(
                driver.execute_script(
                    "const t = performance.getEntriesByType('navigation')[0];"
                    "return t.loadEventEnd / 1000"
                )
            )
    finally:
        driver.quit()
    return statistics.median(loads), statistics.median(charts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hospitals", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    import uvicorn
    from machine import machine_line

    from server.dashboard import build_app

    print(machine_line("starlette", "jinja2", "uvicorn"))
    with tempfile.TemporaryDirectory(prefix="fedcare-dashboard-bench-") as tmp:
        for finished in (False, True):
            runs = Path(tmp) / ("finished" if finished else "running")
            write_run(runs / "run", hospitals=args.hospitals, rounds=args.rounds, finished=finished)
            history = runs / "run" / "history.json"
            server = uvicorn.Server(uvicorn.Config(build_app(runs), host="127.0.0.1", port=0,
                                                   log_level="warning"))  # fmt: skip
            thread = threading.Thread(target=server.run, daemon=True)
            thread.start()
            while not server.started:
                time.sleep(0.02)
            port = server.servers[0].sockets[0].getsockname()[1]
            state = "finished" if finished else "running"
            print(f"{state} run: {args.hospitals} hospitals x {args.rounds} rounds, last "
                  f"history.json {history.stat().st_size / 2**20:.1f} MiB")  # fmt: skip
            for path in ("/", "/fragment", "/api/run/run"):
                first, seconds, size = _median_get(port, path, args.repeat)
                print(f"  server  GET {path:<14} first {1000 * first:7.1f} ms, then "
                      f"{1000 * seconds:7.1f} ms  ({size / 1024:.0f} KiB)")  # fmt: skip
            browser = _browser_load(port, max(3, args.repeat // 4))
            if browser is None:
                print("  browser: Chromium not installed (/usr/bin/chromium), not measured")
            else:
                print(f"  browser load event {1000 * browser[0]:7.1f} ms, charts drawn "
                      f"{1000 * browser[1]:7.1f} ms (median)")  # fmt: skip
            server.should_exit = True
            thread.join(10)


if __name__ == "__main__":
    main()
