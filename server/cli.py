"""``fedcare server``: the coordinator's commands (PKI, SuperLink, training runs, status)."""

from __future__ import annotations

import json
import socket
import sys
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
from server.pki import PKI, PKIError, init_pki, server_cert_sans
from server.run_config import APP_DIR, UsageError, check_names, to_toml
from shared_models.runtime import child_env, flower_executable, run_foreground

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)
PROGRESS_MARK = "[fedcare] progress "


DEFAULT_INTERNAL = (
    "127.0.0.1:9092"  # the SuperLink's loopback side (`server start --internal-port`)
)
SuperlinkOpt = Annotated[
    str,
    typer.Option(
        help="The SuperLink's loopback address HOST:PORT (`server start --internal-port`); from "
        "another machine, through an SSH tunnel (see docs/deployment.md)."
    ),
]


def _split_names(values: list[str] | None) -> list[str]:
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


@app.command()
def init(
    out: Annotated[Path, typer.Option(help="PKI folder to create (or complete).")],
    address: Annotated[
        list[str] | None,
        typer.Option(help="Address hospitals dial (certificate SAN); repeatable."),
    ] = None,
    ca_dir: Annotated[
        Path | None,
        typer.Option(help="Folder for the CA private key (default: OUT-ca beside OUT)."),
    ] = None,
    demo_hospitals: Annotated[
        list[str] | None,
        typer.Option(
            "--demo-hospitals",
            help="One-machine trial only: also make key pairs for these hospitals (NAME,NAME ...) "
            "here and add them. Real hospitals make their own with `fedcare client keygen`.",
        ),
    ] = None,
    demo_dir: Annotated[
        Path | None,
        typer.Option(help="Where --demo-hospitals keys go (default: demo-hospitals beside OUT)."),
    ] = None,
    allow_in_repo: Annotated[
        bool,
        typer.Option(
            "--allow-in-repo",
            help="Write private keys inside a git work tree all the same (refused by default: "
            "they could be committed by accident).",
        ),
    ] = False,
) -> None:
    """Create the consortium CA and the coordinator's TLS certificate (hospitals make their own
    keys: `fedcare client keygen`, then `fedcare server add-hospital`). Private keys are written
    with mode 0600 in folders of mode 0700, never inside a git work tree unless --allow-in-repo."""
    from server.hospitals import HospitalRegistry
    from server.pki import default_ca_dir
    from shared_models.node_keys import check_hospital_name, check_private_folder, generate_key_pair

    addresses = address or ["127.0.0.1", "localhost"]
    demo = _split_names(demo_hospitals)
    for name in demo:
        check_hospital_name(name)
    ca_dir = ca_dir or default_ca_dir(out)
    demo_root = demo_dir or out.parent / "demo-hospitals"
    if demo:  # refused before the CA is made
        check_private_folder(demo_root, option="--demo-dir", allow_in_repo=allow_in_repo)
    written = init_pki(out, addresses=addresses, ca_dir=ca_dir, allow_in_repo=allow_in_repo)
    for path in written:
        console.print(f"wrote {path}")
    if not written:
        console.print(f"{out}: nothing to do, every file already exists")
    keys = PKI(out)
    if any(p.name == "ca.key" for p in written):
        console.print(
            f"the CA private key is in [bold]{ca_dir}[/], apart from {out}: `server start` never "
            "needs it; keep it offline (it is only needed to issue a new coordinator certificate)"
        )
    registry = HospitalRegistry(keys)
    for name in demo:
        if keys.hospital_pub(name).exists():
            console.print(f"hospital {name}: already added, no new key")
            continue
        key_path, pub_path = generate_key_pair(
            demo_root / name, name, option="--demo-dir", allow_in_repo=allow_in_repo
        )
        registry.add_key(name, pub_path)
        console.print(f"wrote {key_path} and {pub_path}; added hospital {name}")
    if demo:
        console.print(
            "[yellow]DEMO ONLY:[/] these hospital private keys were made on the coordinator's "
            "machine, so it could impersonate those hospitals. In a real consortium each hospital "
            "runs `fedcare client keygen` and sends only NAME.pub."
        )
    console.print(
        f"give each hospital [bold]{keys.ca_cert}[/]; the coordinator certificate is valid for "
        f"{', '.join(server_cert_sans(keys))}; add each hospital's public key with "
        f"`fedcare server add-hospital NAME NAME.pub --pki {out}`"
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


@app.command()
def start(
    pki: Annotated[Path, typer.Option(help="PKI folder from `fedcare server init`.")],
    host: Annotated[
        str, typer.Option(help="Public interface of the gateway (hospitals dial it).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="Public HTTPS port: the gateway, Fleet API only.")
    ] = 9093,
    internal_port: Annotated[
        int,
        typer.Option(
            help="Port of the SuperLink on 127.0.0.1 (all of Flower's APIs; operators only)."
        ),
    ] = 9092,
    state: Annotated[
        Path, typer.Option(help="Folder for the logs, gateway counters and Flower's home.")
    ] = Path("fedcare-state"),
    rate_limit: Annotated[
        float, typer.Option(help="Gateway: requests per second per client address.")
    ] = 100.0,
    max_body_mb: Annotated[float, typer.Option(help="Gateway: largest request body, MiB.")] = 16.0,
) -> None:
    """Run the coordinator in the foreground: the Flower SuperLink on 127.0.0.1 (TLS, hospital
    authentication, Flower's in-memory state) and, on the public address, the gateway that forwards only
    the Fleet API (what hospitals' SuperNodes call)."""
    import ipaddress

    from server.hospitals import HospitalRegistry

    keys = PKI(pki)
    keys.check_server_side()
    if keys.legacy_ca_key.exists():
        console.print(
            f"[yellow]warning:[/] {keys.legacy_ca_key} is the CA private key, in the folder the "
            "coordinator runs from; `server start` does not need it: move it offline"
        )
    if not 0 < port < 65536 or not 0 < internal_port < 65536:
        raise UsageError("--port and --internal-port must be TCP ports (1-65535)")
    if rate_limit <= 0 or max_body_mb <= 0:
        raise UsageError("--rate-limit and --max-body-mb must be positive")
    wildcard = host in ("0.0.0.0", "::", "")
    public_local = "127.0.0.1" if wildcard else host
    try:
        on_loopback_ip = ipaddress.ip_address(public_local) == ipaddress.ip_address("127.0.0.1")
    except ValueError:
        on_loopback_ip = host == "localhost"
    if (wildcard or on_loopback_ip) and port == internal_port:
        raise UsageError(
            f"--port {port} and --internal-port {internal_port} collide on 127.0.0.1; choose two ports"
        )
    for h, p, opt_name in (
        (public_local, port, "--port"),
        ("127.0.0.1", internal_port, "--internal-port"),
    ):
        if _wait_for_port(h, p, 0.5):
            raise UsageError(f"port {p} on {h} is already in use; choose another {opt_name}")
    state.mkdir(parents=True, exist_ok=True)
    home = (state / "flwr-home").resolve()
    cmd = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(keys.ca_cert.resolve()),
        "--ssl-certfile", str(keys.server_cert.resolve()),
        "--ssl-keyfile", str(keys.server_key.resolve()),
        "--enable-supernode-auth",
        # Flower's default state, in memory: a file database made every object request of a
        # round several SQLite transactions (0.5 s of a deployed round's 2 s, benchmarks.md).
        # What a restart loses is kept elsewhere: keys are registered again from the PKI folder
        # below, runs live in their `--out` folders (`server run --resume`), ε in the ledgers.
        "--database", ":flwr-in-memory:",
        "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(internal_port),
    ]  # fmt: skip
    gateway = [
        sys.executable, "-m", "server.gateway", "--host", host, "--port", str(port),
        "--upstream", f"https://127.0.0.1:{internal_port}",
        "--ca-cert", str(keys.ca_cert.resolve()), "--certfile", str(keys.server_cert.resolve()),
        "--keyfile", str(keys.server_key.resolve()), "--pki", str(keys.root.resolve()),
        "--rate", str(rate_limit), "--max-body-mb", str(max_body_mb),
        "--counters", str((state / "gateway-counters.json").resolve()),
    ]  # fmt: skip
    cli = FlowerCLI(home, f"127.0.0.1:{internal_port}", keys.ca_cert)
    log = state / "superlink.log"

    def on_ready() -> None:
        if not _wait_for_port("127.0.0.1", internal_port, 60):
            console.print("[red]the SuperLink did not open its port within 60 s[/]; see", log)
            return
        try:
            registered, failed = HospitalRegistry(keys).reconcile(cli)
        except (FlowerCLIError, PKIError, OSError, ValueError) as exc:
            console.print(f"[red]hospital registration failed:[/] {exc}")
            return
        for name, reason in failed.items():
            console.print(f"[red]hospital {name} could not be registered:[/] {reason}")
        if not _wait_for_port(public_local, port, 30):
            console.print("[red]the gateway did not open its port within 30 s[/]; see",
                          state / "gateway.log")  # fmt: skip
            return
        to_internal = "" if internal_port == 9092 else f" --superlink 127.0.0.1:{internal_port}"
        hospitals = ", ".join(f"{n} ({i})" for n, i in sorted(registered.items())) or (
            f"none yet (`fedcare server add-hospital NAME NAME.pub --pki {pki}{to_internal}`)"
        )
        console.print(
            f"fedcare coordinator listening on https://{host}:{port} (gateway: Fleet API only)\n"
            f"SuperLink (all APIs, operators only) on https://127.0.0.1:{internal_port}\n"
            f"registered hospitals: {hospitals}\n"
            f"state: {state}  logs: {log}, {state / 'gateway.log'}  -- Ctrl-C or SIGTERM stops it"
        )

    threading.Thread(target=on_ready, daemon=True).start()
    code = run_foreground(
        cmd, env=child_env(FLWR_HOME=str(home)), log_path=log,
        companions=[(gateway, state / "gateway.log")],
    )  # fmt: skip
    console.print(f"coordinator stopped (exit code {code})")
    raise typer.Exit(code)


@app.command("add-hospital")
def add_hospital(
    name: Annotated[str, typer.Argument(help="The hospital's name (shown in every report).")],
    public_key: Annotated[
        Path, typer.Argument(help="The hospital's NAME.pub from `fedcare client keygen`.")
    ],
    pki: Annotated[Path, typer.Option(help="PKI folder of the coordinator.")],
    superlink: SuperlinkOpt = DEFAULT_INTERNAL,
) -> None:
    """Add a hospital's public key and register it with the running coordinator (no restart:
    the hospital can join the next run)."""
    from server.hospitals import HospitalRegistry, superlink_reachable

    keys = PKI(pki)
    if not keys.ca_cert.exists():
        raise UsageError(f"{keys.ca_cert}: missing; pass the PKI folder from `fedcare server init`")
    registry = HospitalRegistry(keys)
    fp = registry.add_key(name, public_key)
    console.print(f"hospital {name}: key {fp} stored as {keys.hospital_pub(name)}")
    if not superlink_reachable(superlink):
        console.print(
            f"the coordinator is not running at {superlink}: the key is registered when "
            f"`fedcare server start --pki {pki}` starts"
        )
        return
    with tempfile.TemporaryDirectory(prefix="fedcare-") as tmp:
        registered, failed = registry.reconcile(_cli_for(superlink, pki, Path(tmp)))
    if name in failed:
        registry.forget(name)  # not half-added: the next `server start` would fail on it again
        raise FlowerCLIError(f"the coordinator refused hospital {name}'s key: {failed[name]}")
    node_id = registered[name]
    console.print(
        f"hospital {name} registered with the running coordinator (node {node_id}); it can join "
        "the next run"
    )


@app.command("remove-hospital")
def remove_hospital(
    name: Annotated[str, typer.Argument(help="The hospital to remove.")],
    pki: Annotated[Path, typer.Option(help="PKI folder of the coordinator.")],
    superlink: SuperlinkOpt = DEFAULT_INTERNAL,
) -> None:
    """Remove a hospital: its key is unregistered at the running coordinator (its daemon is
    refused from its next request on) and deleted from the PKI folder."""
    from server.hospitals import HospitalRegistry, superlink_reachable

    registry = HospitalRegistry(PKI(pki))
    node_id = registry.remove(name)
    if node_id is None:
        console.print(f"hospital {name} removed (it was never registered with the SuperLink)")
        return
    if not superlink_reachable(superlink):
        console.print(
            f"hospital {name} removed; the coordinator is not running at {superlink}: node "
            f"{node_id} is unregistered when `fedcare server start --pki {pki}` starts"
        )
        return
    with tempfile.TemporaryDirectory(prefix="fedcare-") as tmp:
        registry.unregister_revoked(_cli_for(superlink, pki, Path(tmp)))
    console.print(f"hospital {name} removed: node {node_id} unregistered, its requests are refused")


def _cli_for(superlink: str, pki: Path, home: Path) -> FlowerCLI:
    keys = PKI(pki)
    if not keys.ca_cert.exists():
        raise UsageError(f"{keys.ca_cert}: missing; pass the PKI folder from `fedcare server init`")
    if ":" not in superlink:
        raise UsageError(f"--superlink {superlink!r}: use HOST:PORT")
    return FlowerCLI(home, superlink, keys.ca_cert)


def bundle_task_name(task: str, app_dir: Path) -> str:
    """``--task`` of a deployment: a task name, or the path of a task file that is in the
    approved bundle (``app_dir/tasks/NAME.toml``), which is the task ``NAME``.

    The hospitals run only the task files of the bundle they approved, so a task file anywhere
    else cannot be deployed as it is.

    Raises
    ------
    UsageError
        A task file outside ``app_dir/tasks/`` (one line: where to copy it).
    """
    from shared_models.tasks import is_task_file_arg

    if not is_task_file_arg(task):
        return task
    path = Path(task)
    bundle = (Path(app_dir) / "tasks").resolve()
    if path.resolve().parent == bundle and path.suffix == ".toml":
        return path.stem
    raise UsageError(
        f"--task {task}: a deployment runs only the task files of the approved bundle; copy it "
        f"to {bundle}/, have the hospitals approve the new bundle, then `fedcare server run --pki DIR "
        f"--task NAME`"
    )


@app.command()
def run(
    pki: Annotated[Path, typer.Option(help="PKI folder (for the CA certificate).")],
    superlink: SuperlinkOpt = DEFAULT_INTERNAL,
    task: opt.Task = "breast-cancer",
    rounds: opt.Rounds = None,
    strategy: opt.Strategy = None,
    epsilon: opt.Epsilon = None,
    no_dp: opt.NoDP = False,
    delta: opt.Delta = None,
    seed: opt.Seed = 0,
    out: opt.Out = None,
    run_config: opt.RunConfigOpt = None,
    tracking: opt.Tracking = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue an interrupted run from its last checkpoint (its run folder)."),
    ] = None,
    min_hospitals: Annotated[
        int | None,
        typer.Option(
            help="Start once this many registered hospitals are online (default: all of them)."
        ),
    ] = None,
    wait_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to wait for hospitals: before the run, for --min-hospitals to be "
            "online (then exit 1, naming who never came); during it, for a round that lacks "
            "hospitals (then stop the run)."
        ),
    ] = 600,
    timeout: Annotated[
        float, typer.Option(help="Give up following the run after this many seconds.")
    ] = 86_400,
    app_dir: Annotated[
        Path, typer.Option("--app", hidden=True, help="App folder to submit (tests).")
    ] = APP_DIR,
) -> None:
    """Submit a training run to the federation and follow it; exit code = the run's outcome."""
    from server.tracking import parse_tracking
    from shared_models.config import RunConfig
    from shared_models.fab import build_fab, unpack_fab
    from shared_models.recipes import settings_table, summary_line

    tracking_uri = parse_tracking(tracking)
    if resume is not None:
        cfg, run_dir, stale_run = _resume_config(resume, run_config)
    else:
        task = bundle_task_name(task, app_dir)
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
    try:
        fab = build_fab(app_dir)
    except ValueError as exc:
        raise UsageError(f"{app_dir}: not a valid Flower app ({exc})") from None
    if wait_timeout < 0:
        raise UsageError(f"--wait-timeout {wait_timeout:g}: use seconds, 0 or more")
    with tempfile.TemporaryDirectory(prefix="fedcare-") as tmp:
        cli = _cli_for(superlink, pki, Path(tmp) / "flwr-home")
        need = _hospitals_needed(PKI(pki), cfg, min_hospitals)
        if not _hospitals_online(cli, PKI(pki), need, wait_timeout):
            raise typer.Exit(1)
        if (
            stale_run is not None
        ):  # the interrupted Flower run would otherwise show "running" forever
            cli.run("stop", str(stale_run), CONNECTION)
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text(to_toml(cfg))
        # `flwr run` gets the app's FAB files only (the FAB, hence its hash, is the same): its own
        # build would walk the checkout's .venv (shared_models.fab)
        staged = unpack_fab(fab, Path(tmp) / "fedcare")
        submitted = cli.json("run", str(staged), CONNECTION, "--run-config", str(overrides))
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
        console.print(summary_line(settings_table(parsed.recipe_values(), parsed.settings_from)))
        stopped = _follow(cli, run_id, timeout, PKI(pki), wait_timeout)
        if stopped is not None:
            cli.run("stop", str(run_id), CONNECTION)
            console.print(
                f"[red]stopped run {run_id}:[/] {stopped}. Once the hospitals are back, continue "
                f"with `fedcare server run --superlink {superlink} --pki {pki} --resume {run_dir}`",
                highlight=False,
            )
            raise typer.Exit(1)
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
            f"[red]run {run_id} did not complete:[/] {details} (see `fedcare server status "
            f"--superlink {superlink} --pki {pki}`)"
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
    if tracking_uri is not None:
        from server.tracking import log_run

        console.print(f"tracking: MLflow run {log_run(run_dir, tracking_uri)} in {tracking_uri}")
    if (problem := nobody_trained(summary)) is not None:
        console.print(f"[red]run {run_id} trained nothing:[/] {problem}")
        raise typer.Exit(1)


def _model_card(model: Path) -> tuple[Path, dict[str, Any]]:
    """The weights and model card of a run folder or a model file
    (:func:`server.model_card.locate_model`, which raises the expected errors)."""
    from server.model_card import locate_model

    saved = locate_model(model)
    return saved.weights.resolve(), saved.card


@app.command()
def evaluate(
    model: Annotated[
        Path,
        typer.Option(help="Run folder of a finished run (its model.safetensors) or a model file."),
    ],
    pki: Annotated[Path, typer.Option(help="PKI folder (for the CA certificate).")],
    superlink: SuperlinkOpt = DEFAULT_INTERNAL,
    hospitals: Annotated[
        list[str] | None,
        typer.Option(help="Registered hospitals to ask (NAME,NAME ...; default: all of them)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Report folder (default: federated-evaluation/ beside the model)."),
    ] = None,
    noise: Annotated[
        float | None,
        typer.Option(
            help="σ of the Gaussian noise on each released count (dp.eval-noise-multiplier; "
            "default 5): more noise, less ε per release, wider intervals."
        ),
    ] = None,
    bins: Annotated[
        int | None,
        typer.Option(
            help="Bins of each released histogram (eval.histogram-bins; even, default 10): "
            "fewer bins, less noise in n, sensitivity and specificity, coarser AUROC."
        ),
    ] = None,
    delta: opt.Delta = None,
    wait_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the hospitals to be online.")
    ] = 600,
    timeout: Annotated[
        float, typer.Option(help="Give up following the run after this many seconds.")
    ] = 3600,
    app_dir: Annotated[
        Path, typer.Option("--app", hidden=True, help="App folder to submit (tests).")
    ] = APP_DIR,
) -> None:
    """Federated external validation: an evaluation-only run of a saved model at the hospitals.
    Nothing is trained and no model update leaves a hospital; each hospital releases DP-noised
    score histograms of its test split, charged to its privacy ledger, or refuses (its policy's
    allow-evaluation-runs). The report (report.md, evaluation.json) has each hospital's figures
    with intervals that include the noise, the pooled figures and calibration, and the
    between-hospital heterogeneity (random-effects pooled AUROC, prediction interval, I²)."""
    from shared_models.config import RunConfig
    from shared_models.fab import build_fab, unpack_fab

    weights, card = _model_card(model)
    task = str(card["task"])
    options = opt.run_options(
        task=task, data_dir=None, partition=opt.Partition.iid, alpha=0.5, rounds=1,
        strategy=None, epsilon=None, no_dp=False, delta=delta, seed=0, run_config=None,
    )  # fmt: skip
    cfg = options.build()
    cfg.update({
        "task.preprocessing": str(card["preprocessing"]), "model.name": str(card["model"]["name"]),
        "eval.model": str(weights), "eval.centralized": False,
    })  # fmt: skip
    if "hidden" in card["model"]:
        cfg["model.hidden"] = int(card["model"]["hidden"])
    if noise is not None:
        cfg["dp.eval-noise-multiplier"] = float(noise)
    if bins is not None:
        cfg["eval.histogram-bins"] = int(bins)
    keys = PKI(pki)
    registered = keys.hospitals()
    wanted = _split_names(hospitals)
    unknown = sorted(set(wanted) - set(registered))
    if unknown:
        raise UsageError(
            f"--hospitals: {', '.join(unknown)} not registered (registered: "
            f"{', '.join(registered) or 'none'}); add each with `fedcare server add-hospital`"
        )
    cfg["eval.hospitals"] = ",".join(wanted)
    check_names(cfg, app_dir=app_dir)
    report_dir = (out or weights.parent / "federated-evaluation").resolve()
    if report_dir.exists() and any(report_dir.iterdir()):
        raise UsageError(
            f"{report_dir}: report folder exists and is not empty; choose another --out"
        )
    cfg["output.dir"] = str(report_dir)
    _check_model_fits(weights, RunConfig.from_run_config(cfg))
    try:
        fab = build_fab(app_dir)
    except ValueError as exc:
        raise UsageError(f"{app_dir}: not a valid Flower app ({exc})") from None
    if not registered:
        raise UsageError(
            f"no hospital is registered in {keys.root}: add each with `fedcare server "
            f"add-hospital NAME NAME.pub --pki {keys.root}`"
        )
    with tempfile.TemporaryDirectory(prefix="fedcare-") as tmp:
        cli = _cli_for(superlink, pki, Path(tmp) / "flwr-home")
        if not _hospitals_online(cli, keys, len(wanted) or len(registered), wait_timeout):
            raise typer.Exit(1)
        overrides = Path(tmp) / "run-config.toml"
        overrides.write_text(to_toml(cfg))
        staged = unpack_fab(fab, Path(tmp) / "fedcare")
        submitted = cli.json("run", str(staged), CONNECTION, "--run-config", str(overrides))
        run_id = int(submitted["run-id"])
        console.print(
            f"submitted evaluation-only run {run_id}: model {weights} (task {task}), hospitals "
            f"{', '.join(wanted) or 'all connected'}, noise σ = {cfg['dp.eval-noise-multiplier']:g} "
            f"per count; report folder {report_dir}",
            highlight=False,
        )
        _follow(cli, run_id, timeout, keys, wait_timeout)
        status = _run_status(cli, run_id)
    if status.get("status") != "finished:completed":
        details = status.get("status-details") or status.get("status") or "unknown"
        console.print(f"[red]evaluation run {run_id} did not complete:[/] {details}")
        raise typer.Exit(1)
    path = report_dir / "evaluation.json"
    if not path.exists():
        console.print(
            f"run {run_id} completed; its report {report_dir} is on the coordinator's machine"
        )
        return
    evaluation = json.loads(path.read_text())
    _print_evaluation(evaluation, report_dir)
    if not evaluation["hospitals"]:
        console.print(f"[red]evaluation run {run_id} evaluated nothing:[/] no hospital released")
        raise typer.Exit(1)


def _check_model_fits(weights: Path, run: Any) -> None:
    """The saved weights load into the model the run config describes (task, preprocessing,
    model from the card), as the ServerApp will load them.

    Raises
    ------
    UsageError
        Unreadable weights, or other parameter names or shapes than the card's model.
    """
    from server.checkpoint import load_weights
    from shared_models.models import model_for_run

    try:
        model, _ = model_for_run(run)
        model.load_state_dict(load_weights(weights))
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"{weights}: the weights do not load into model {run.model.name!r} of task "
            f"{run.task.name!r} named by its model card ({first})"
        ) from None


def _print_evaluation(evaluation: dict[str, Any], report_dir: Path) -> None:
    """The per-hospital table, the heterogeneity line and who did not answer."""
    from shared_models.noisy_metrics import READABLE_WIDTH, readable_text

    table = Table(title="federated external validation")
    for col in ("hospital", "n (± noise)", "AUROC (95 % CI)", "ε (δ)"):
        table.add_column(col)
    for h in evaluation["hospitals"]:
        eps = "n/a" if h["epsilon"] is None else f"{h['epsilon']:.3f} ({h['delta']:g})"
        table.add_row(h["hospital"], f"{h['n']:.0f} ± {h['n_noise_sd']:.0f}",
                      readable_text(h["metrics"]["auroc"]), eps)  # fmt: skip
    console.print(table)
    het = evaluation["heterogeneity"]
    if "note" in het:
        console.print(het["note"])
    else:
        pi = het["prediction"]
        lo, hi = het["ci"]
        value = "too noisy to read" if hi - lo > READABLE_WIDTH else f"{het['auroc']:.3f}"
        console.print(
            f"random-effects pooled AUROC {value} (95 % CI {lo:.3f}-{hi:.3f}; prediction "
            f"interval {f'{pi[0]:.3f}-{pi[1]:.3f}' if pi else 'n/a'}), I² {100 * het['i2']:.0f} %",
            highlight=False,
        )
    for m in evaluation["not_evaluated"]:
        console.print(f"[yellow]{m['hospital']} ({m['cause']}):[/] {m['reason']}", highlight=False)
    console.print(f"report: {report_dir / 'report.md'}")


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


def _hospitals_needed(keys: PKI, cfg: dict[str, Any], min_hospitals: int | None) -> int:
    """How many registered hospitals must be online before the run is submitted: ``--min-hospitals``
    (default: every registered hospital), at least what the strategy needs to sample.

    Raises
    ------
    UsageError
        No hospital registered, or more needed than are registered.
    """
    names = keys.hospitals()
    if not names:
        raise UsageError(
            f"no hospital is registered in {keys.root}: add each with `fedcare server "
            f"add-hospital NAME NAME.pub --pki {keys.root}`"
        )
    need = len(names) if min_hospitals is None else min_hospitals
    if not 1 <= need <= len(names):
        raise UsageError(
            f"--min-hospitals {need}: {len(names)} hospital(s) are registered "
            f"({', '.join(names)}); use 1 to {len(names)}"
        )
    for key in ("strategy.min-available-nodes", "strategy.min-train-nodes"):
        if int(cfg[key]) > len(names):
            raise UsageError(
                f"{key} = {cfg[key]} but {len(names)} hospital(s) are registered "
                f"({', '.join(names)}): the run could never start; lower it with --run-config"
            )
    return max(need, int(cfg["strategy.min-available-nodes"]), int(cfg["strategy.min-train-nodes"]))


def _hospitals_online(cli: FlowerCLI, keys: PKI, need: int, wait_timeout: float) -> bool:
    """Wait until ``need`` registered hospitals are online, saying who is awaited; False (with
    the hospitals that never came named) after ``wait_timeout`` seconds."""
    from server.presence import HospitalsMissingError, hospital_presence, wait_for_hospitals

    def say(text: str) -> None:
        console.print(text, highlight=False)

    try:
        ready = wait_for_hospitals(
            lambda: hospital_presence(cli, keys), need=need, timeout=wait_timeout, say=say
        )
    except HospitalsMissingError as exc:
        console.print(
            f"[red]no run started:[/] {exc}. Start the missing hospitals' daemons (`fedcare "
            f"client start ...` at each hospital), or start with fewer (--min-hospitals)",
            highlight=False,
        )
        return False
    say(f"hospitals: {ready.describe()}")
    return True


def _follow(
    cli: FlowerCLI, run_id: int, timeout: float, keys: PKI, wait_timeout: float
) -> str | None:
    """Stream the run's logs; print fedcare's per-round progress lines (each round once), its
    errors, and who a round waits for. Returns why the run should be stopped (a round waited
    ``wait_timeout`` seconds for hospitals), else None."""
    from server.presence import RunWaitWatch, hospital_presence

    watch = RunWaitWatch(
        presence=lambda: hospital_presence(cli, keys), timeout=wait_timeout,
        say=lambda text: console.print(text, highlight=False),
    )  # fmt: skip
    proc = cli.popen("log", str(run_id), CONNECTION, "--stream")
    deadline = time.monotonic() + timeout
    printed: set[int] = set()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if PROGRESS_MARK in line:
                info = json.loads(line.split(PROGRESS_MARK, 1)[1])
                if info["round"] not in printed:
                    printed.add(info["round"])
                    print_progress(info)
            elif "ERROR" in line or "Exception" in line:
                console.print(line.rstrip(), style="red", highlight=False, markup=False)
            elif (stop := watch.feed(line)) is not None:
                return stop
            if time.monotonic() > deadline:
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
    return None


def print_progress(info: dict[str, Any]) -> None:
    """One line per finished round (shared by simulation and deployment): AUROC where the round
    evaluated, the largest ε after training and, with an evaluation release, after it (the ε of
    the end-of-run table), then every hospital that missed the round and why."""

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    from rich.markup import escape

    failures = "".join(
        f"\n    [yellow]{escape(m['hospital'])} ({m['kind']}, {m.get('cause', 'failed')}): "
        f"{escape(str(m['reason']))}[/]"
        for m in info.get("failures", [])
    )
    pooled = (
        f"pooled AUROC {f(info['pooled_auroc'])}  " if info.get("pooled_auroc") is not None else ""
    )
    noisy = int(info.get("auroc_too_noisy", 0))
    mean = "too noisy" if noisy and info.get("mean_auroc") is None else f(info["mean_auroc"])
    if noisy and info.get("mean_auroc") is not None:
        mean += f" ({noisy} too noisy to read, left out)"
    auroc = f"mean hospital AUROC {mean}  " if info.get("evaluated", True) else ""
    epsilon = f"max ε {f(info['max_epsilon'])}"
    if info.get("max_epsilon_evaluation") is not None:
        epsilon += f" (training) → {f(info['max_epsilon_evaluation'])} with the evaluation release"
    console.print(
        f"round {info['round']:>3}/{info['rounds']}  {pooled}{auroc}{epsilon}  "
        f"[dim]{info['seconds']:.1f} s[/]{failures}",
        highlight=False,
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
    pki: Annotated[Path, typer.Option(help="PKI folder (CA certificate, registered hospitals).")],
    superlink: SuperlinkOpt = DEFAULT_INTERNAL,
) -> None:
    """List hospitals (online / offline / registered / key stored: each state is explained
    below the table) and the runs since the coordinator started (Flower keeps them in memory;
    each run's own record is its `--out` folder)."""
    with tempfile.TemporaryDirectory(prefix="fedcare-") as tmp:
        cli = _cli_for(superlink, pki, Path(tmp))
        nodes = cli.json("supernode", "list", CONNECTION)["nodes"]
        runs = cli.json("ls", CONNECTION).get("runs", [])
    from server.hospitals import HOSPITAL_STATES, HospitalRegistry, hospital_rows

    rows = hospital_rows(nodes, HospitalRegistry(PKI(pki)).load())
    table = Table(title="hospitals")
    for col in ("hospital", "node id", "status", "since"):
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for state in dict.fromkeys(row[2] for row in rows):
        console.print(f"  {state}: {HOSPITAL_STATES.get(state, 'a state of Flower 1.41')}")
    table = Table(title="runs")
    for col in ("run id", "status", "elapsed", "details"):
        table.add_column(col, no_wrap=col != "details")
    for r in runs:
        table.add_row(
            str(r.get("run-id")), str(r.get("status")), f"{status_seconds(r):.0f} s",
            str(r.get("status-details") or ""),
        )  # fmt: skip
    console.print(table)


@app.command()
def dashboard(
    runs: Annotated[
        Path, typer.Option(help="Folder of run folders (`server run --out`, `simulate --out`).")
    ] = Path("runs"),
    pki: Annotated[
        Path | None,
        typer.Option(
            help="PKI folder: registered hospitals, and the TLS certificate off loopback."
        ),
    ] = None,
    superlink: SuperlinkOpt = DEFAULT_INTERNAL,
    state: Annotated[
        Path | None,
        typer.Option(
            help="The coordinator's state folder (`server start --state`): gateway counters."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to listen on; off loopback it needs --token and --pki.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the dashboard.")] = 8050,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="FEDCARE_DASHBOARD_TOKEN",
            help="Every request must carry it (Bearer header, or open /?token=TOKEN once); "
            "required off loopback.",
        ),
    ] = None,
) -> None:
    """Serve the coordinator's read-only dashboard: hospitals, runs, per-round curves (AUROC,
    loss, ε per hospital against its target), refusals and drop-outs, the gateway's counters.

    Bound to 127.0.0.1 by default. Any other address is served only over the consortium's TLS
    certificate (--pki: server.pem, server.key) and only to requests carrying --token.
    """
    from shared_models.dashboard import LOOPBACK_NAMES, is_loopback, serve

    if not runs.is_dir():
        raise UsageError(f"--runs {runs}: folder not found (run folders are written there)")
    if token is not None and len(token) < 16:
        raise UsageError("--token: use at least 16 characters (e.g. `openssl rand -hex 16`)")
    certfile = keyfile = None
    hosts: tuple[str, ...] = LOOPBACK_NAMES
    if not is_loopback(host):
        if token is None:
            raise UsageError(
                f"--host {host}: off loopback the dashboard needs --token (or "
                "FEDCARE_DASHBOARD_TOKEN); refusing to start"
            )
        if pki is None:
            raise UsageError(
                f"--host {host}: off loopback the dashboard is served over the consortium's TLS "
                "certificate: give --pki (the folder of `fedcare server init`)"
            )
        try:
            PKI(pki).check_server_side()
        except PKIError as exc:
            raise UsageError(str(exc)) from None
        certfile, keyfile = PKI(pki).server_cert, PKI(pki).server_key
        hosts = ("*",)  # the token guards every request; any name the certificate covers
    if state is not None and not state.is_dir():
        raise UsageError(f"--state {state}: folder not found")
    from server.dashboard import build_app

    scheme = "https" if certfile else "http"
    console.print(
        f"coordinator dashboard: {scheme}://{host}:{port}/ (runs in {runs}; Ctrl-C stops)"
    )
    app_ = build_app(
        runs.resolve(), pki=pki, superlink=superlink, state=state, hosts=hosts, token=token,
        tls=certfile is not None,
    )  # fmt: skip
    serve(app_, host=host, port=port, certfile=certfile, keyfile=keyfile)
