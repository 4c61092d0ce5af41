"""Per-round wall time of a real deployment on loopback, split into compute and overhead.

Starts `fedcare server start` (the SuperLink on 127.0.0.1:INTERNAL and the gateway, which forwards
only the Fleet API, on 127.0.0.1:PUBLIC) and, per variant, three `fedcare client start` hospital
daemons (TLS, hospital authentication with keys from `client keygen`, approved app), runs
`fedcare server run` with a small model and prints per-round figures. Variants: the hospitals'
task executor (`subprocess`: Flower's fresh `flwr-clientapp` per message; `warm`: fedcare's fork
of a process with torch imported), each optionally with SecAgg+ (`+secagg`), optionally with
Flower 1.41's own timing (`+flower`: the stock `flower-supernode`, which waits 3 s after an empty
pull, and Flower's `send_and_receive` on the coordinator, which polls every 3 s; without it,
fedcare's Fleet loop `client.supernode` and a 0.1 s coordinator poll), and optionally without the
gateway (`+direct`: the hospitals dial the SuperLink's loopback port, as before fedcare had a
gateway; otherwise they dial the gateway, as in a deployment), and optionally on chest X-rays
(`+xray`: PneumoniaMNIST from ../shared/data split into three hospital image folders, with the DP
preset of presets/chest-xray.toml: scatter-28 features and the scatter-linear model; otherwise
logistic regression on the breast-cancer split). `subprocess+flower` is Flower's
defaults, `warm` fedcare's; `warm+direct` vs `warm` is the gateway's cost, in the same run on the
same coordinator. Before any hospital starts, the gateway's added latency per request is also
measured with Flower's own Fleet client (`FleetHttpClient`, signed pulls of hospital a).

    wall      time between consecutive round checkpoints (seconds)
    compute   slowest hospital's local training + slowest hospital's evaluation (seconds),
              as each ClientApp measured it
    overhead  wall - compute: messaging, polling, process start-up of each ClientApp

and, for the warm executor, where a steady round's time goes along its critical path (the
hospital whose reply came last, per message; from the hospitals' launcher logs and the checkpoint
times; the phases sum to the wall time), see PHASES, and each hospital's mean time per message
after the first round (task acquired to reply handed on).

Usage: python benchmarks/deployment_latency.py [--rounds 4] [--variants subprocess+flower,warm,warm+xray]
       [--keep DIR]  (keeps the logs; FLWR_LOG_LEVEL=DEBUG adds timestamps to every Flower line)
Rounds 1 (ClientApp first start) and the others are reported separately. Compare variants as
ratios within one run: absolute seconds depend on the machine (printed first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pandas as pd

FEDCARE = [sys.executable, "-m", "simulations.cli"]
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*FEDCARE, *args],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _per_round(run_dir: Path) -> pd.DataFrame:
    sidecars = sorted((run_dir / "checkpoints").glob("round-[0-9][0-9][0-9].json"))
    elapsed = [json.loads(p.read_text())["elapsed_seconds"] for p in sidecars]
    metrics = pd.read_csv(run_dir / "metrics.csv")
    compute = metrics.groupby("round")[["train_seconds", "eval_seconds"]].max().sum(axis=1)
    rows = []
    for i, end in enumerate(elapsed, start=1):
        start = elapsed[i - 2] if i > 1 else None
        wall = end - start if start is not None else None
        evaluated = bool(metrics.loc[metrics["round"] == i, "eval_seconds"].notna().any())
        rows.append(
            {"round": i, "wall": wall, "compute": float(compute.get(i, float("nan"))),
             "evaluated": evaluated}
        )  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["overhead"] = frame["wall"] - frame["compute"]
    return frame


_LAUNCHER_EVENTS = {  # what the hospital's launcher log says, per ClientApp task (warm executor)
    "pull-task-input": "task", "Loading ClientApp": "loaded", "runtime/push-messages": "reply",
    "push-task-output": "done",
}  # fmt: skip
PHASES = (
    ("deliver", "coordinator sends, SuperNode poll + object pull, launcher poll"),
    ("start", "fork, Flower's task input + FAB check"),
    ("app", "ClientApp besides compute: imports, data, DP plan, ledger"),
    ("compute", "training / evaluation, as the ClientApp measured it"),
    ("return", "reply upload, coordinator poll + pull, aggregation, checkpoint"),
)


def _tasks(launcher_log: Path) -> list[dict[str, float]]:
    """Each ClientApp task of a hospital's launcher log: the times (seconds since the epoch) it
    was acquired, its ClientApp loaded, its reply handed to the SuperNode and the task closed."""
    tasks: list[dict[str, float]] = []
    for line in launcher_log.read_text(errors="replace").splitlines():
        stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) fedcare-launcher", line)
        if not stamp:
            continue
        event = next((e for key, e in _LAUNCHER_EVENTS.items() if key in line), None)
        if event is None:
            continue
        t = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if event == "task":
            tasks.append({"task": t})
        elif tasks and event not in tasks[-1]:
            tasks[-1][event] = t
    return [t for t in tasks if len(t) == len(_LAUNCHER_EVENTS)]


def breakdown(run_dir: Path, launcher_logs: dict[str, Path]) -> pd.DataFrame:
    """Per round, the round's wall time split along its critical path (the hospital whose reply
    came last, per message) into :data:`PHASES`; the phases of a round sum to its wall time.

    Times come from the checkpoints' modification times (the coordinator) and the hospitals'
    launcher logs (same machine, same clock). Rounds with an evaluation have two messages per
    hospital: their phases are summed."""
    metrics = pd.read_csv(run_dir / "metrics.csv")
    ends = {
        int(p.stem.split("-")[1]): p.stat().st_mtime
        for p in (run_dir / "checkpoints").glob("round-[0-9][0-9][0-9].safetensors")
    }
    per_hospital = {name: _tasks(log) for name, log in launcher_logs.items()}
    cursor = dict.fromkeys(per_hospital, 0)
    rows = []
    for r in sorted(ends):
        kinds = ["train"]
        at_r = metrics[metrics["round"] == r]
        if at_r["eval_seconds"].notna().any():
            kinds.append("eval")
        row = dict.fromkeys((p for p, _ in PHASES), 0.0)
        boundary, found = ends.get(r - 1), False
        for i, kind in enumerate(kinds):
            msgs = {}
            for name, tasks in per_hospital.items():
                if cursor[name] < len(tasks):
                    msgs[name] = tasks[cursor[name]]
                    cursor[name] += 1
            if not msgs or boundary is None:
                boundary = max((m["done"] for m in msgs.values()), default=boundary)
                continue
            found = True
            last_name, last = max(msgs.items(), key=lambda kv: kv[1]["done"])
            compute = at_r.loc[at_r["hospital"] == last_name, f"{kind}_seconds"]
            compute_s = (
                float(compute.iloc[0]) if len(compute) and pd.notna(compute.iloc[0]) else 0.0
            )
            end = ends[r] if i == len(kinds) - 1 else last["done"]
            row["deliver"] += last["task"] - boundary
            row["start"] += last["loaded"] - last["task"]
            row["app"] += last["reply"] - last["loaded"] - compute_s
            row["compute"] += compute_s
            row["return"] += end - last["reply"]
            boundary = end
        if found and r - 1 in ends:
            rows.append({"round": r, "wall": ends[r] - ends[r - 1], **row})
    return pd.DataFrame(rows)


def message_seconds(launcher_logs: dict[str, Path], skip: int) -> dict[str, float]:
    """Mean seconds from acquiring a task to handing its reply on, per hospital, over its tasks
    after the first ``skip`` (the first round's)."""
    out = {}
    for name, log in launcher_logs.items():
        tasks = _tasks(log)[skip:]
        out[name] = statistics.mean(t["done"] - t["task"] for t in tasks) if tasks else float("nan")
    return out


def _start_hospitals(
    root: Path, address: str, executor: str, supernode: str, tag: str, data: list[Path]
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for name, path in zip("abc", data, strict=True):
        state = root / f"h-{name}-{tag}"
        subprocess.run([*FEDCARE, "client", "approve", "--ledger", str(state / "ledger"), str(root / "app"), "--yes"],
                       check=True, capture_output=True, cwd=ROOT)  # fmt: skip
        procs.append(_spawn([
            "client", "start", "--superlink", address, "--ca", str(root / "pki" / "ca.pem"),
            "--key", str(root / "keys" / f"{name}.key"), "--hospital", name,
            "--data", str(path), "--port", str(_free_port()),
            "--state", str(state), "--executor", executor, "--supernode", supernode,
        ], root / f"client-{name}-{tag}.log"))  # fmt: skip
    return procs


XRAY_DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist"
# presets/chest-xray.toml (the DP preset): scattering coefficients and a linear model
XRAY_CONFIG = (
    "task.preprocessing='scatter-28' model.name='scatter-linear' "
    "train.local-epochs=1.0 train.batch-size=256 train.lr=2.0 dp.max-grad-norm=1.0"
)
LATENCY_REPEATS = 200  # signed pulls per address (plus one warm-up)


def request_latency(
    root: Path, addresses: dict[str, str], repeats: int = LATENCY_REPEATS
) -> dict[str, float]:
    """Median seconds of one signed Fleet pull (``PullMessages`` of hospital a, Flower's own
    ``FleetHttpClient`` with its node-authentication interceptor) per address, measured in
    alternating blocks of 20 so that machine load affects every address alike."""
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import (
        ActivateNodeRequest,
        DeactivateNodeRequest,
        PullMessagesRequest,
    )
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private = load_ssh_private_key((root / "keys" / "a.key").read_bytes(), None)
    clients = {
        name: FleetHttpClient.from_server_address(
            address,
            False,
            str(root / "pki" / "ca.pem"),
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                NodeAuthHttpInterceptor(private, private.public_key()),
            ],
        )  # fmt: skip
        for name, address in addresses.items()
    }
    first = next(iter(clients.values()))
    node_id = first.ActivateNode(
        ActivateNodeRequest(
            public_key=public_key_to_bytes(private.public_key()), heartbeat_interval=30
        )
    ).node_id
    times: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for client in clients.values():  # connections and TLS sessions open before timing
            client.PullMessages(PullMessagesRequest(node=Node(node_id=node_id)))
        for _ in range(repeats // 20):
            for name, client in clients.items():
                for _ in range(20):
                    t0 = time.perf_counter()
                    client.PullMessages(PullMessagesRequest(node=Node(node_id=node_id)))
                    times[name].append(time.perf_counter() - t0)
    finally:
        first.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--variants", default="warm+direct,warm",
        help="comma-separated EXECUTOR[+secagg][+flower][+direct] (executor: subprocess or warm; "
        "+direct: hospitals bypass the gateway)",
    )  # fmt: skip
    parser.add_argument(
        "--keep", type=Path, default=None,
        help="write the PKI, logs and run folders here and keep them (default: a temporary folder)",
    )  # fmt: skip
    args = parser.parse_args()
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, flwr {metadata.version('flwr')}, torch {metadata.version('torch')}"
    )
    with contextlib.ExitStack() as stack:
        if args.keep is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedcare-bench-")))
        else:
            root = args.keep.resolve()
            root.mkdir(parents=True, exist_ok=False)
        subprocess.run([*FEDCARE, "server", "init", "--out", str(root / "pki")], check=True, capture_output=True)  # fmt: skip
        for name in "abc":  # each hospital's own key pair
            subprocess.run([*FEDCARE, "client", "keygen", "--out", str(root / "keys"), "--name", name],
                           check=True, capture_output=True)  # fmt: skip
        subprocess.run(
            [*FEDCARE, "simulate", "--export-hospitals", str(root / "data")],
            check=True,
            capture_output=True,
        )
        data = {"logreg": sorted((root / "data").iterdir())}
        if any("xray" in v.split("+") for v in args.variants.split(",")):
            if not (XRAY_DATA / "pneumoniamnist.npz").exists():
                sys.exit(
                    f"+xray needs PneumoniaMNIST at {XRAY_DATA} (see ../shared/data/README.md)"
                )
            subprocess.run(
                [*FEDCARE, "simulate", "--task", "chest-xray", "--data-dir", str(XRAY_DATA),
                 "--hospitals", "3", "--export-hospitals", str(root / "data-xray")],
                check=True, capture_output=True,
            )  # fmt: skip
            data["xray"] = sorted((root / "data-xray").iterdir())
        # the app as of now: an edit to the checkout during the benchmark changes nothing that runs
        sys.path.insert(0, str(ROOT))
        from tests.handlers import unpack_app

        unpack_app(root / "app")
        port, internal = _free_port(), _free_port()
        public, superlink = f"127.0.0.1:{port}", f"127.0.0.1:{internal}"
        server = _spawn(["server", "start", "--pki", str(root / "pki"), "--port", str(port),
                         "--internal-port", str(internal), "--state", str(root / "coord")],
                        root / "server.log")  # fmt: skip
        results: dict[str, list[pd.DataFrame]] = {}  # a variant may be listed more than once
        phases: dict[str, list[pd.DataFrame]] = {}
        per_message: dict[str, list[dict[str, float]]] = {}
        try:
            deadline = time.monotonic() + 120
            while "fedcare coordinator listening" not in (root / "server.log").read_text():
                if time.monotonic() > deadline:
                    sys.exit("coordinator did not start; see " + str(root / "server.log"))
                time.sleep(0.5)
            for name in "abc":  # added to the running coordinator
                subprocess.run([*FEDCARE, "server", "add-hospital", name, str(root / "keys" / f"{name}.pub"),
                                "--pki", str(root / "pki"), "--superlink", superlink],
                               check=True, capture_output=True)  # fmt: skip
            latency = request_latency(root, {"direct": superlink, "gateway": public})
            for n, variant in enumerate(args.variants.split(",")):
                executor, *extras = variant.split("+")
                flower = "flower" in extras  # Flower 1.41's own timing throughout
                supernode = "flower" if flower else "fedcare"
                address = superlink if "direct" in extras else public
                xray = "xray" in extras
                hospitals = _start_hospitals(
                    root,
                    address,
                    executor,
                    supernode,
                    tag=str(n),
                    data=data["xray" if xray else "logreg"],
                )
                try:
                    time.sleep(15)  # daemons connect (the warm launcher imports torch once)
                    run_dir = root / f"run-{n}"
                    cfg = XRAY_CONFIG if xray else "model.name='logreg'"
                    if flower:
                        cfg += " train.poll-interval=0"
                    if "secagg" in extras:
                        cfg += " secagg.enabled=true"
                    proc = subprocess.run(
                        [*FEDCARE, "server", "run", "--superlink", superlink, "--pki", str(root / "pki"),
                         "--rounds", str(args.rounds), "--out", str(run_dir), "--app", str(root / "app"),
                         "--run-config", cfg, *(["--task", "chest-xray"] if xray else [])],
                        capture_output=True, text=True, timeout=1800, cwd=ROOT,
                    )  # fmt: skip
                    if proc.returncode != 0:
                        sys.exit(proc.stdout + proc.stderr)
                    results.setdefault(variant, []).append(_per_round(run_dir))
                    logs = {h: root / f"h-{h}-{n}" / "launcher.log" for h in "abc"}
                    phases.setdefault(variant, []).append(breakdown(run_dir, logs))
                    first_round = (
                        2
                        if (
                            pd.read_csv(run_dir / "metrics.csv")
                            .query("round == 1")["eval_seconds"]
                            .notna()
                            .any()
                        )
                        else 1
                    )
                    per_message.setdefault(variant, []).append(
                        message_seconds(logs, skip=first_round)
                    )
                finally:
                    for proc in reversed(hospitals):
                        _stop(proc)
                    time.sleep(5)  # the SuperLink marks them offline
        finally:
            _stop(server)
        gateway_log = (root / "coord" / "gateway.log").read_text()
        stopped = re.findall(r"forwarded per route: (\{.*\})", gateway_log)
        forwarded = json.loads(stopped[-1]) if stopped else None
    print(
        f"\n3 hospitals, DP-SGD, {args.rounds} rounds (seconds per round); logistic regression, "
        f"or with +xray chest-xray with the DP preset ({XRAY_CONFIG})"
    )
    print(
        f"{'variant':>16} {'round':>6} {'wall':>8} {'compute':>8} {'overhead':>9}  (e: also evaluates)"
    )
    summary, training_only = {}, {}
    for variant, frames in results.items():
        for frame in frames:
            for _, row in frame.iterrows():
                wall = "-" if pd.isna(row["wall"]) else f"{row['wall']:.2f}"
                over = "-" if pd.isna(row["overhead"]) else f"{row['overhead']:.2f}"
                mark = "  e" if row["evaluated"] else ""
                print(
                    f"{variant:>16} {int(row['round']):>6} {wall:>8} {row['compute']:>8.2f} {over:>9}{mark}"
                )
        steady = pd.concat(frames).dropna(subset=["wall"])
        summary[variant] = (statistics.mean(steady["wall"]), statistics.mean(steady["overhead"]))
        training = steady[~steady["evaluated"].astype(bool)]
        if len(training):
            training_only[variant] = (
                statistics.mean(training["wall"]),
                statistics.mean(training["overhead"]),
            )
    print(
        "\nwhere a steady round's time goes (critical path: the hospital whose reply came last; "
        "mean of rounds 2..N, seconds):"
    )
    for name, what in PHASES:
        print(f"  {name:>8}: {what}")
    print(f"{'variant':>16} " + " ".join(f"{name:>8}" for name, _ in PHASES) + f" {'wall':>8}")
    for variant, frames in phases.items():
        frame = pd.concat(frames)
        if frame.empty:
            print(
                f"{variant:>16}  (no fedcare launcher log: the subprocess executor logs elsewhere)"
            )
            continue
        cells = " ".join(f"{frame[name].mean():>8.2f}" for name, _ in PHASES)
        print(f"{variant:>16} {cells} {frame['wall'].mean():>8.2f}")
    print("\nper message after the first round, task acquired to reply handed on (mean, seconds):")
    for variant, runs in per_message.items():
        cells = ", ".join(f"{h} {statistics.mean(r[h] for r in runs):.2f}" for h in "abc")
        print(f"  {variant:>16}: {cells}")
    print("\nsteady rounds (2..N) of every repeat, mean:")
    base = next(iter(summary.values()))
    for variant, (wall, over) in summary.items():
        print(
            f"  {variant:>16}: wall {wall:.2f} s, overhead {over:.2f} s  (wall ratio {wall / base[0]:.2f})"
        )
    if training_only:
        print("steady rounds that only train (no evaluation exchange), mean:")
        for variant, (wall, over) in training_only.items():
            print(f"  {variant:>16}: wall {wall:.2f} s, overhead {over:.2f} s")
    for variant, (wall, over) in summary.items():
        if f"{variant}+direct" in summary:
            direct_wall, direct_over = summary[f"{variant}+direct"]
            print(
                f"gateway cost per round ({variant} - {variant}+direct): wall {wall - direct_wall:+.2f} s, "
                f"overhead {over - direct_over:+.2f} s"
            )
    added = latency["gateway"] - latency["direct"]
    print(
        f"one signed Fleet pull, median: direct {1000 * latency['direct']:.1f} ms, through the "
        f"gateway {1000 * latency['gateway']:.1f} ms ({1000 * added:+.1f} ms per request)"
    )
    gateway_rounds = sum(len(f) for v, fs in results.items() if "direct" not in v for f in fs)
    if forwarded is not None and gateway_rounds:
        # a round's critical path at one hospital: its requests except the idle polls (one
        # pull per message, train and evaluate, finds it) and background heartbeats; the three
        # hospitals' requests run in parallel
        background = {"pull-messages", "send-node-heartbeat", "activate-node", "deactivate-node"}
        per_hospital = (
            sum(n for r, n in forwarded.items() if r not in background) / 3 / gateway_rounds + 2
        )
        print(
            f"requests the gateway forwarded: {sum(forwarded.values())} ({json.dumps(forwarded)}); "
            f"per round and hospital, not counting idle polls and heartbeats: {per_hospital:.0f}, "
            f"so the gateway adds about {per_hospital * added:.2f} s per round "
            f"({per_hospital:.0f} x {1000 * added:.1f} ms, if none of them overlapped)"
        )


if __name__ == "__main__":
    main()
