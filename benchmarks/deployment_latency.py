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
gateway; otherwise they dial the gateway, as in a deployment). `subprocess+flower` is Flower's
defaults, `warm` fedcare's; `warm+direct` vs `warm` is the gateway's cost, in the same run on the
same coordinator. Before any hospital starts, the gateway's added latency per request is also
measured with Flower's own Fleet client (`FleetHttpClient`, signed pulls of hospital a).

    wall      time between consecutive round checkpoints (seconds)
    compute   slowest hospital's local training + slowest hospital's evaluation (seconds),
              as each ClientApp measured it
    overhead  wall - compute: messaging, polling, process start-up of each ClientApp

Usage: python benchmarks/deployment_latency.py [--rounds 4] [--variants warm+direct,warm]
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
        rows.append({"round": i, "wall": wall, "compute": float(compute.get(i, float("nan")))})
    frame = pd.DataFrame(rows)
    frame["overhead"] = frame["wall"] - frame["compute"]
    return frame


def _start_hospitals(
    root: Path, address: str, executor: str, supernode: str, tag: str
) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i, name in enumerate("abc", start=1):
        state = root / f"h-{name}-{tag}"
        subprocess.run([*FEDCARE, "client", "approve", "--ledger", str(state / "ledger"), str(root / "app"), "--yes"],
                       check=True, capture_output=True, cwd=ROOT)  # fmt: skip
        procs.append(_spawn([
            "client", "start", "--superlink", address, "--ca", str(root / "pki" / "ca.pem"),
            "--key", str(root / "keys" / f"{name}.key"), "--site", name,
            "--data", str(root / "data" / f"hospital-{i}.csv"), "--port", str(_free_port()),
            "--state", str(state), "--executor", executor, "--supernode", supernode,
        ], root / f"client-{name}-{tag}.log"))  # fmt: skip
    return procs


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
                hospitals = _start_hospitals(root, address, executor, supernode, tag=str(n))
                try:
                    time.sleep(15)  # daemons connect (the warm launcher imports torch once)
                    run_dir = root / f"run-{n}"
                    cfg = f"model.name='logreg' train.poll-interval={0 if flower else 0.1}"
                    if "secagg" in extras:
                        cfg += " secagg.enabled=true"
                    proc = subprocess.run(
                        [*FEDCARE, "server", "run", "--superlink", superlink, "--pki", str(root / "pki"),
                         "--rounds", str(args.rounds), "--out", str(run_dir), "--app", str(root / "app"),
                         "--run-config", cfg],
                        capture_output=True, text=True, timeout=1800, cwd=ROOT,
                    )  # fmt: skip
                    if proc.returncode != 0:
                        sys.exit(proc.stdout + proc.stderr)
                    results.setdefault(variant, []).append(_per_round(run_dir))
                finally:
                    for proc in reversed(hospitals):
                        _stop(proc)
                    time.sleep(5)  # the SuperLink marks them offline
        finally:
            _stop(server)
        gateway_log = (root / "coord" / "gateway.log").read_text()
        stopped = re.findall(r"forwarded per route: (\{.*\})", gateway_log)
        forwarded = json.loads(stopped[-1]) if stopped else None
    print(f"\n3 hospitals, logistic regression, DP-SGD, {args.rounds} rounds (seconds per round)")
    print(f"{'variant':>16} {'round':>6} {'wall':>8} {'compute':>8} {'overhead':>9}")
    summary = {}
    for variant, frames in results.items():
        for frame in frames:
            for _, row in frame.iterrows():
                wall = "-" if pd.isna(row["wall"]) else f"{row['wall']:.2f}"
                over = "-" if pd.isna(row["overhead"]) else f"{row['overhead']:.2f}"
                print(
                    f"{variant:>16} {int(row['round']):>6} {wall:>8} {row['compute']:>8.2f} {over:>9}"
                )
        steady = pd.concat(frames).dropna(subset=["wall"])
        summary[variant] = (statistics.mean(steady["wall"]), statistics.mean(steady["overhead"]))
    print("\nsteady rounds (2..N) of every repeat, mean:")
    base = next(iter(summary.values()))
    for variant, (wall, over) in summary.items():
        print(
            f"  {variant:>16}: wall {wall:.2f} s, overhead {over:.2f} s  (wall ratio {wall / base[0]:.2f})"
        )
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
