"""``fedcare server``: the coordinator's commands (PKI, SuperLink, training runs, status)."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server import cli_options as opt
from server.flwr_cli import CONNECTION, FlowerCLI, FlowerCLIError
from server.pki import PKI, init_pki
from server.run_config import APP_DIR, UsageError, check_names, to_toml
from shared_models.runtime import child_env, flower_executable, run_foreground

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)
REGISTERED = "registered.json"  # in the PKI folder: hospital name -> Flower node id
PROGRESS_MARK = "[fedcare] progress "


@app.command()
def init(
    out: Annotated[Path, typer.Option(help="PKI folder to create (or complete).")],
    hospital: Annotated[list[str], typer.Option(help="Hospital name; repeat for each hospital.")],
    address: Annotated[
        list[str] | None, typer.Option(help="Address hospitals dial (certificate SAN); repeatable.")
    ] = None,
) -> None:
    """Create the consortium CA, the coordinator's TLS certificate and one key pair per hospital."""
    addresses = address or ["127.0.0.1", "localhost"]
    written = init_pki(out, hospitals=hospital, addresses=addresses)
    for path in written:
        console.print(f"wrote {path}")
    if not written:
        console.print(f"{out}: nothing to do, every file already exists")
    console.print(
        f"give each hospital [bold]{out / 'ca.pem'}[/] and its own [bold]hospitals/NAME.key[/]; "
        f"the coordinator certificate is valid for {', '.join(addresses)}"
    )


def _wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.3)
    return False


def _register_hospitals(cli: FlowerCLI, pki: PKI) -> dict[str, int]:
    """Register every hospital public key in the PKI folder (once); return name -> node id."""
    path = pki.root / REGISTERED
    known: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
    listed = {int(n["node-id"]) for n in cli.json("supernode", "list", CONNECTION)["nodes"]}
    for name in pki.hospitals():
        if known.get(name) in listed:
            continue
        proc = cli.run("supernode", "register", str(pki.hospital_pub(name)), CONNECTION)
        node_ids = [int(w) for w in proc.stdout.split() if w.isdigit()]
        if proc.returncode != 0 or not node_ids:
            raise FlowerCLIError(
                f"registering {name}: {' '.join((proc.stdout + proc.stderr).split())}"
            )
        known[name] = node_ids[0]
    path.write_text(json.dumps(known, indent=2) + "\n")
    return known


@app.command()
def start(
    pki: Annotated[Path, typer.Option(help="PKI folder from `fedcare server init`.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="HTTPS port (Fleet, Control and ServerApp APIs).")
    ] = 9093,
    state: Annotated[Path, typer.Option(help="Folder for the persistent state and logs.")] = Path(
        "fedcare-state"
    ),
) -> None:
    """Run the Flower SuperLink in the foreground: TLS, hospital authentication, persistent state."""
    keys = PKI(pki)
    keys.check_server_side()
    if not keys.hospitals():
        raise UsageError(
            f"{keys.hospitals_dir}: no hospital public keys; add hospitals with `fedcare server init`"
        )
    state.mkdir(parents=True, exist_ok=True)
    home = (state / "flwr-home").resolve()
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if _wait_for_port(local, port, 0.5):
        raise UsageError(f"port {port} on {local} is already in use; choose another --port")
    cmd = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(keys.ca_cert.resolve()),
        "--ssl-certfile", str(keys.server_cert.resolve()),
        "--ssl-keyfile", str(keys.server_key.resolve()),
        "--enable-supernode-auth",
        "--database", str((state / "superlink.db").resolve()),
        "--disable-runtime-dependency-installation",
        "--host", host, "--port", str(port),
    ]  # fmt: skip
    cli = FlowerCLI(home, f"{local}:{port}", keys.ca_cert)
    log = state / "superlink.log"

    def on_ready() -> None:
        if not _wait_for_port(local, port, 60):
            console.print("[red]the SuperLink did not open its port within 60 s[/]; see", log)
            return
        try:
            registered = _register_hospitals(cli, keys)
        except (FlowerCLIError, OSError) as exc:
            console.print(f"[red]hospital registration failed:[/] {exc}")
            return
        console.print(
            f"fedcare coordinator listening on https://{host}:{port} (TLS, hospital authentication on)\n"
            f"registered hospitals: {', '.join(f'{n} ({i})' for n, i in sorted(registered.items()))}\n"
            f"state: {state}  log: {log}  -- Ctrl-C or SIGTERM stops it"
        )

    threading.Thread(target=on_ready, daemon=True).start()
    code = run_foreground(cmd, env=child_env(FLWR_HOME=str(home)), log_path=log)
    console.print(f"SuperLink stopped (exit code {code})")
    raise typer.Exit(code)


def _cli_for(superlink: str, pki: Path, home: Path) -> FlowerCLI:
    keys = PKI(pki)
    if not keys.ca_cert.exists():
        raise UsageError(f"{keys.ca_cert}: missing; pass the PKI folder from `fedcare server init`")
    if ":" not in superlink:
        raise UsageError(f"--superlink {superlink!r}: use HOST:PORT")
    return FlowerCLI(home, superlink, keys.ca_cert)


@app.command()
def run(
    superlink: Annotated[str, typer.Option(help="SuperLink address HOST:PORT.")],
    pki: Annotated[Path, typer.Option(help="PKI folder (for the CA certificate).")],
    task: opt.Task = "breast-cancer",
    rounds: opt.Rounds = None,
    strategy: opt.Strategy = None,
    epsilon: opt.Epsilon = None,
    no_dp: opt.NoDP = False,
    delta: opt.Delta = None,
    seed: opt.Seed = 0,
    out: opt.Out = None,
    run_config: opt.RunConfigOpt = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue an interrupted run from its last checkpoint (its run folder)."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Give up following the run after this many seconds.")
    ] = 86_400,
    app_dir: Annotated[
        Path, typer.Option("--app", hidden=True, help="App folder to submit (tests).")
    ] = APP_DIR,
) -> None:
    """Submit a training run to the federation and follow it; exit code = the run's outcome."""
    from shared_models.config import RunConfig

    if resume is not None:
        cfg, run_dir, stale_run = _resume_config(resume, run_config)
    else:
        options = opt.run_options(
            task=task, data_dir=None, partition=opt.Partition.iid, alpha=0.5, rounds=rounds,
            strategy=strategy, epsilon=epsilon, no_dp=no_dp, delta=delta, seed=seed, run_config=run_config,
        )  # fmt: skip
        cfg, stale_run = options.build(), None
        check_names(cfg, app_dir=app_dir)
        run_dir = (out or opt.default_out()).resolve()
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"{run_dir}: run folder exists and is not empty; choose another --out")
        cfg["output.dir"] = str(run_dir)
        cfg["eval.centralized"] = False
    parsed = RunConfig.from_run_config(cfg)
    with tempfile.TemporaryDirectory(prefix="fedcare-") as tmp:
        cli = _cli_for(superlink, pki, Path(tmp) / "flwr-home")
        if (
            stale_run is not None
        ):  # the interrupted Flower run would otherwise show "running" forever
            cli.run("stop", str(stale_run), CONNECTION)
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text(to_toml(cfg))
        submitted = cli.json("run", str(app_dir), CONNECTION, "--run-config", str(overrides))
        run_id = int(submitted["run-id"])
        dp = (
            f"DP ε={parsed.dp.target_epsilon:g}, δ={parsed.dp.target_delta:g}"
            if parsed.dp.enabled
            else "no DP"
        )
        console.print(
            f"submitted run {run_id}: task {parsed.task.name}, {parsed.strategy.name}, "
            f"{parsed.train.rounds} rounds, {dp}; run folder {run_dir}"
        )
        _follow(cli, run_id, timeout)
        try:
            status = _run_status(cli, run_id)
        except FlowerCLIError:
            raise FlowerCLIError(
                f"lost the coordinator while following run {run_id}; once `fedcare server start` "
                f"runs again, continue with `fedcare server run --superlink {superlink} --pki {pki} "
                f"--resume {run_dir}`"
            ) from None
    if status.get("status") != "finished:completed":
        details = status.get("status-details") or status.get("status") or "unknown"
        console.print(
            f"[red]run {run_id} did not complete:[/] {details} (see `fedcare server status`)"
        )
        raise typer.Exit(1)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        console.print(
            f"run {run_id} completed; its run folder {run_dir} is on the coordinator's machine"
        )
        return
    from server.report import nobody_trained, print_summary

    summary = json.loads(summary_path.read_text())
    print_summary(console, summary, run_dir, status_seconds(status))
    if (problem := nobody_trained(summary)) is not None:
        console.print(f"[red]run {run_id} trained nothing:[/] {problem}")
        raise typer.Exit(1)


# settings that may change when resuming (they do not change what a hospital computes)
RESUME_OVERRIDABLE = frozenset(
    {"strategy.min-train-nodes", "strategy.min-evaluate-nodes", "strategy.min-available-nodes",
     "strategy.fraction-train", "strategy.fraction-evaluate", "train.round-timeout"}
)  # fmt: skip


def _resume_config(run_dir: Path, run_config: str | None) -> tuple[dict[str, Any], Path, int]:
    """The interrupted run's own settings (same run id, so hospitals' ledgers continue)."""
    from server.checkpoint import latest_checkpoint
    from server.run_config import parse_run_config_arg

    run_dir = run_dir.resolve()
    try:
        done, _, sidecar = latest_checkpoint(run_dir)
    except FileNotFoundError as exc:
        raise UsageError(f"--resume: {exc}") from None
    cfg = dict(sidecar["run_config"])
    if done >= int(cfg["train.rounds"]):
        raise UsageError(f"--resume: {run_dir} already finished all {done} rounds")
    if run_config:
        extra = parse_run_config_arg(run_config)
        fixed = sorted(set(extra) - RESUME_OVERRIDABLE)
        if fixed:
            raise UsageError(
                f"--resume keeps the run's settings; {fixed} cannot change (only {sorted(RESUME_OVERRIDABLE)})"
            )
        cfg.update(extra)
    cfg["run.resume-from"] = str(run_dir)
    console.print(
        f"resuming {run_dir} after round {done} of {cfg['train.rounds']} (run id {cfg['run.id']})"
    )
    return cfg, run_dir, int(sidecar["run_id"])


def _follow(cli: FlowerCLI, run_id: int, timeout: float) -> None:
    """Stream the run's logs; print fedcare's per-round progress lines."""
    proc = cli.popen("log", str(run_id), CONNECTION, "--stream")
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if PROGRESS_MARK in line:
                print_progress(json.loads(line.split(PROGRESS_MARK, 1)[1]))
            elif "ERROR" in line or "Exception" in line:
                console.print(line.rstrip(), style="red", highlight=False)
            if time.monotonic() > deadline:
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def print_progress(info: dict[str, Any]) -> None:
    """One line per finished round (shared by simulation and deployment)."""

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    failures = "".join(
        f"\n    [yellow]{f['hospital']} ({f['kind']}): {f['reason']}[/]"
        for f in info.get("failures", [])
    )
    pooled = (
        f"pooled AUROC {f(info['pooled_auroc'])}  " if info.get("pooled_auroc") is not None else ""
    )
    console.print(
        f"round {info['round']:>3}/{info['rounds']}  {pooled}mean hospital AUROC {f(info['mean_auroc'])}  "
        f"max ε {f(info['max_epsilon'])}  [dim]{info['seconds']:.1f} s[/]{failures}"
    )


def status_seconds(status: dict[str, Any]) -> float:
    """Elapsed seconds of a run from ``flwr ls`` ("HH:MM:SS" or seconds)."""
    value = str(status.get("elapsed", "0"))
    try:
        parts = [float(p) for p in value.split(":")]
    except ValueError:
        return 0.0
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


def _run_status(cli: FlowerCLI, run_id: int) -> dict[str, Any]:
    runs = cli.json("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
    return runs[0] if runs else {}


@app.command()
def status(
    superlink: Annotated[str, typer.Option(help="SuperLink address HOST:PORT.")],
    pki: Annotated[Path, typer.Option(help="PKI folder (CA certificate, registered hospitals).")],
) -> None:
    """List hospitals (online / offline) and runs."""
    with tempfile.TemporaryDirectory(prefix="fedcare-") as tmp:
        cli = _cli_for(superlink, pki, Path(tmp))
        nodes = cli.json("supernode", "list", CONNECTION)["nodes"]
        runs = cli.json("ls", CONNECTION).get("runs", [])
    reg_path = pki / REGISTERED
    names = {v: k for k, v in json.loads(reg_path.read_text()).items()} if reg_path.exists() else {}
    table = Table(title="hospitals")
    for col in ("hospital", "node id", "status", "since"):
        table.add_column(col, no_wrap=True)
    for node in nodes:
        nid = int(node["node-id"])
        since = node.get("online-at") if node["status"] == "online" else node.get("offline-at")
        table.add_row(names.get(nid, "?"), str(nid), node["status"], str(since))
    console.print(table)
    table = Table(title="runs")
    for col in ("run id", "status", "elapsed", "details"):
        table.add_column(col, no_wrap=col != "details")
    for r in runs:
        table.add_row(
            str(r.get("run-id")), str(r.get("status")), f"{status_seconds(r):.0f} s",
            str(r.get("status-details") or ""),
        )  # fmt: skip
    console.print(table)
