"""``fedcare client``: the hospital's commands (SuperNode daemon, offline data check)."""

from __future__ import annotations

import os
import socket
import ssl
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from shared_models.runtime import child_env, flower_executable, run_foreground
from shared_models.tasks import get_task

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console(soft_wrap=True)


class HospitalSetupError(ValueError):
    """A hospital-side setup problem (files, certificate, key): one clear message, exit code 2."""


def _check_tls(superlink: str, ca: Path) -> None:
    """Verify the coordinator's certificate with the consortium CA before starting the daemon.

    Raises
    ------
    HospitalSetupError
        The certificate does not verify (wrong CA, wrong address) -- the message says so
        instead of Flower's generic "unavailable".
    """
    host, _, port = superlink.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=5) as sock,
            context.wrap_socket(sock, server_hostname=host.strip("[]")),
        ):
            return
    except ssl.SSLCertVerificationError as exc:
        raise HospitalSetupError(
            f"the coordinator's certificate at {superlink} could not be verified with the CA in "
            f"{ca} ({exc.verify_message}); ask the consortium for its ca.pem and check the address"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        console.print(
            f"[yellow]coordinator {superlink} not reachable yet ({exc}); the hospital daemon keeps "
            "retrying[/]"
        )


_FLOWER_ERRORS = {
    "[code: 2004]": "the coordinator refused this hospital: its public key is not registered there "
    "(send your NAME.pub from `fedcare client keygen` to the coordinator, who runs "
    "`fedcare server add-hospital NAME NAME.pub`)",
    "[code: 2001]": "the coordinator requires hospital authentication: pass --key",
    "CERTIFICATE_VERIFY_FAILED": "the coordinator's certificate could not be verified with {ca}",
}


def _require_approved_bundle(ledger_dir: Path) -> None:
    """Refuse to start a daemon that could run nothing (no approved bundle, or unreadable list).

    Raises
    ------
    HospitalSetupError
        ``approved.json`` is missing, empty or unreadable; the message gives the approve command.
    """
    from client.approval import ApprovalError, ApprovedBundles

    try:
        entries = ApprovedBundles(ledger_dir).entries()
    except ApprovalError as exc:
        raise HospitalSetupError(str(exc)) from None
    if not entries:
        raise HospitalSetupError(
            f"no approved app bundle in {ledger_dir}: this hospital would refuse every run. "
            f"Review and approve the consortium's app first: `fedcare client approve --ledger "
            f"{ledger_dir} APP_DIR_OR_FAB`"
        )


def _write_superexec_secret(path: Path) -> Path:
    """A fresh random SuperExec auth secret (32 bytes, mode 0600): only our launcher may acquire
    tasks from the SuperNode's Runtime API (``flower-supernode --superexec-auth-secret-file``)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(32))
    return path.resolve()


@app.command()
def keygen(
    out: Annotated[Path, typer.Option(help="Folder for the key pair (created).")],
    name: Annotated[
        str, typer.Option(help="File name and key comment: OUT/NAME.key and OUT/NAME.pub.")
    ] = "hospital",
) -> None:
    """Make this hospital's key pair: the private key (mode 0600) never leaves the hospital;
    NAME.pub goes to the coordinator. Never overwrites an existing key."""
    from shared_models.node_keys import (
        KeyFileError,
        fingerprint,
        generate_key_pair,
        load_public_key,
    )

    try:
        key_path, pub_path = generate_key_pair(out, name)
    except KeyFileError as exc:
        raise HospitalSetupError(str(exc)) from None
    console.print(f"wrote {key_path} (private, mode 0600: keep it here, never send it)")
    console.print(f"wrote {pub_path} (public)")
    console.print(
        f"send [bold]{pub_path.name}[/] to the coordinator (key fingerprint "
        f"{fingerprint(load_public_key(pub_path))}; compare it by phone or another channel). "
        f"The coordinator runs `fedcare server add-hospital YOUR_NAME {pub_path.name}`; then start "
        f"this hospital with `fedcare client start --key {key_path} ...`"
    )


@app.command()
def approve(
    ledger: Annotated[Path, typer.Option(help="The hospital's ledger folder (approved.json).")],
    bundle: Annotated[
        Path | None,
        typer.Argument(
            help="App folder or .fab file to approve (default: the installed fedcare app)."
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Approve without asking.")] = False,
    list_: Annotated[
        bool, typer.Option("--list", help="Show the approved bundles and exit.")
    ] = False,
) -> None:
    """Review an app bundle (hash, files, tasks) and approve it to run at this hospital.

    The bundle is read, never executed. Its SHA-256 is what the hospital daemon compares with
    the hash of every run's bundle; any other bundle is refused.
    """
    from client.approval import ApprovalError, ApprovedBundles, fab_bytes, inspect_fab

    approved = ApprovedBundles(ledger)
    try:
        if list_:
            entries = approved.entries()
            if not entries:
                console.print(f"{approved.path}: no approved bundle")
            for e in entries:
                console.print(
                    f"{e['sha256']}  {e.get('fab_id', '?')} {e.get('version', '?')}  tasks "
                    f"{', '.join(e.get('tasks', [])) or '-'}  approved {e.get('approved_at', '?')}"
                )
            return
        if bundle is None:
            from server.run_config import APP_DIR

            bundle = APP_DIR
        if not bundle.exists():
            raise HospitalSetupError(f"{bundle}: not found (give an app folder or a .fab file)")
        approved.entries()  # an unreadable list stops here, before anything is shown
        info = inspect_fab(fab_bytes(bundle))
    except ApprovalError as exc:
        raise HospitalSetupError(str(exc)) from None
    console.print(f"app bundle {bundle}")
    console.print(f"  sha256  {info.sha256}")
    console.print(f"  app     {info.fab_id} {info.version}")
    console.print(f"  tasks   {', '.join(info.tasks) or '(none found)'}")
    console.print(f"  files   {len(info.files)}:")
    for name in info.files:
        console.print(f"    {name}")
    if not yes and not typer.confirm(f"approve this bundle for the hospital ledger {ledger}?"):
        console.print("not approved")
        raise typer.Exit(1)
    try:
        added = approved.approve(info, source=str(bundle.resolve()))
    except ApprovalError as exc:
        raise HospitalSetupError(str(exc)) from None
    state = "recorded in" if added else "already approved in"
    console.print(f"bundle {info.sha256} {state} {approved.path}")


@app.command()
def start(
    superlink: Annotated[str, typer.Option(help="Coordinator address HOST:PORT.")],
    ca: Annotated[Path, typer.Option(help="The consortium CA certificate (ca.pem).")],
    key: Annotated[
        Path, typer.Option(help="This hospital's private key (NAME.key from `client keygen`).")
    ],
    site: Annotated[str, typer.Option(help="This hospital's name, as shown in reports.")],
    data: Annotated[Path, typer.Option(help="This hospital's data file, in the task's format.")],
    port: Annotated[int, typer.Option(help="Local port of the SuperNode's runtime API.")] = 9094,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when available), cpu, cuda, cuda:N.")
    ] = "auto",
    state: Annotated[
        Path, typer.Option(help="Folder for this daemon's logs and Flower home.")
    ] = Path("fedcare-hospital"),
    ledger: Annotated[
        Path | None,
        typer.Option(help="Privacy ledger folder (default STATE/ledger); survives restarts."),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Site policy TOML file (bounds for every run).")
    ] = None,
    executor: Annotated[
        str,
        typer.Option(
            help="warm: each message runs in a fork of a process with torch already imported; "
            "subprocess: Flower's fresh flwr-clientapp per message."
        ),
    ] = "warm",
    poll_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between checks for a new message from the coordinator "
            "(Flower's SuperNode: 3)."
        ),
    ] = 0.2,
    supernode: Annotated[
        str,
        typer.Option(
            help="fedcare: Flower's SuperNode in fedcare's prompt Fleet loop; flower: the stock "
            "flower-supernode (3 s between checks; --poll-interval does not apply)."
        ),
    ] = "fedcare",
) -> None:
    """Run this hospital's Flower SuperNode (always over TLS, authenticated with its key).

    Only app bundles approved with ``fedcare client approve`` run here: the SuperNode runs with
    ``--isolation process`` and fedcare's launcher (:mod:`client.launcher`) is its SuperExec.
    The SuperNode is Flower's, in fedcare's Fleet loop (:mod:`client.supernode`), which checks
    for messages every ``--poll-interval`` seconds.
    """
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    for path, what in ((ca, "--ca"), (key, "--key"), (data, "--data")):
        if not path.is_file():
            raise HospitalSetupError(f"{what} {path}: file not found")
    try:
        load_ssh_private_key(key.read_bytes(), None)
    except (ValueError, TypeError):
        raise HospitalSetupError(
            f"--key {key}: not an OpenSSH private key (use NAME.key from `fedcare client keygen`)"
        ) from None
    if ":" not in superlink:
        raise HospitalSetupError(f"--superlink {superlink!r}: use HOST:PORT")
    if executor not in ("warm", "subprocess"):
        raise HospitalSetupError(f"--executor {executor!r}: use warm or subprocess")
    if not 0.0 < poll_interval <= 60.0:
        raise HospitalSetupError(f"--poll-interval {poll_interval}: use seconds in (0, 60]")
    if supernode not in ("fedcare", "flower"):
        raise HospitalSetupError(f"--supernode {supernode!r}: use fedcare or flower")
    ledger_dir = (ledger or state / "ledger").resolve()
    _require_approved_bundle(ledger_dir)
    _check_tls(superlink, ca)
    state.mkdir(parents=True, exist_ok=True)
    node_config = (
        f'data-path="{data.resolve()}" site="{site}" device="{device}" ledger-dir="{ledger_dir}"'
    )
    if policy is not None:
        from client.policy import PolicyError, SitePolicy

        try:
            SitePolicy.load(policy)  # a broken policy stops the daemon here, not at the first run
        except PolicyError as exc:
            raise HospitalSetupError(str(exc)) from None
        node_config += f' policy-path="{policy.resolve()}"'
    secret = _write_superexec_secret(state / "superexec.secret")
    cmd = [
        *(
            [sys.executable, "-m", "client.supernode", "--poll-interval", str(poll_interval)]
            if supernode == "fedcare"
            else [flower_executable("flower-supernode")]
        ),
        "--superlink", superlink,
        "--root-certificates", str(ca.resolve()),
        "--auth-supernode-private-key", str(key.resolve()),
        "--node-config", node_config,
        "--port", str(port),
        "--isolation", "process",  # our launcher is the SuperExec: approved bundles only
        "--superexec-auth-secret-file", str(secret),
    ]  # fmt: skip
    launcher = [
        sys.executable, "-m", "client.launcher",
        "--runtime-api-address", f"127.0.0.1:{port}",
        "--ledger", str(ledger_dir), "--site", site,
        "--superexec-auth-secret-file", str(secret), "--parent-pid", str(os.getpid()),
        "--executor", executor,
    ]  # fmt: skip
    problems: list[str] = []

    def on_line(line: str) -> None:
        for marker, message in _FLOWER_ERRORS.items():
            if marker in line and not problems:
                problems.append(message.format(site=site, ca=ca))
        if line.startswith("[fedcare]") and "client.launcher" in line and not problems:
            problems.append(
                f"the task launcher exited with code {line.rsplit(' ', 1)[-1]}; "
                f"see {state / 'launcher.log'}"
            )

    console.print(
        f"hospital {site}: connecting to {superlink} over TLS; log {state / 'supernode.log'}"
    )
    code = run_foreground(
        cmd, env=child_env(FLWR_HOME=str((state / "flwr-home").resolve())),
        log_path=state / "supernode.log", on_line=on_line,
        companions=[(launcher, state / "launcher.log")],
    )  # fmt: skip
    if problems:
        raise HospitalSetupError(problems[0])
    if code != 0:
        console.print(
            f"[red]the SuperNode exited with code {code}[/]; see {state / 'supernode.log'}"
        )
    raise typer.Exit(code)


@app.command()
def check(
    task: Annotated[str, typer.Option(help="Task whose schema the file must follow.")],
    data: Annotated[Path, typer.Option(help="The data file to check.")],
) -> None:
    """Validate a local data file against a task's schema (offline): rows, label balance, missing."""
    try:
        spec = get_task(task)
    except ValueError as exc:
        raise HospitalSetupError(str(exc)) from None
    frame = spec.read_file(data)  # raises DataError naming file, line and column
    n = len(frame)
    positives = int(frame["label"].sum())
    console.print(f"{data}: {n} rows, valid {task} file")
    console.print(
        f"label ({spec.positive_class}): {positives} positive ({positives / n:.0%}), "
        f"{n - positives} negative"
    )
    table = Table(title="missing values per column")
    table.add_column("column")
    table.add_column("missing", justify="right")
    for col in frame.columns:
        if col != "label":
            missing = int(frame[col].isna().sum())
            table.add_row(col, f"{missing} ({missing / n:.0%})" if missing else "0")
    console.print(table)


@app.command()
def budget(
    ledger: Annotated[Path, typer.Option(help="The hospital's privacy ledger folder.")],
) -> None:
    """Privacy spent at this hospital: per run and lifetime ε, δ, steps, noise multiplier, sample rate."""
    from client.ledger import Ledger, LedgerError, lifetime_epsilon, run_entries
    from client.training import accountant_steps, epsilon_spent

    if not ledger.is_dir():
        raise HospitalSetupError(f"--ledger {ledger}: folder not found")
    try:
        entries = run_entries(Ledger(ledger))
    except LedgerError as exc:
        raise HospitalSetupError(str(exc)) from None
    if not entries:
        console.print(f"{ledger}: no runs recorded yet (no privacy spent)")
        return
    console.print(f"privacy ledger {ledger}")
    for e in entries:
        state = e["accountant"]
        sigmas = ", ".join(sorted({f"{s:.4g}" for s, _, _ in state["history"]}))
        rates = ", ".join(sorted({f"{q:.4g}" for _, q, _ in state["history"]}))
        console.print(
            f"  run {e['run_id']}  task {e.get('task', '?')}  updated {e.get('updated', '?')}\n"
            f"      steps {accountant_steps(state)}, noise multiplier {sigmas}, sample rate {rates}: "
            f"ε = {epsilon_spent(state, delta=e['delta']):.3f} at δ = {e['delta']:g}"
        )
    delta = max(e["delta"] for e in entries)
    total = lifetime_epsilon([e["accountant"] for e in entries], delta=delta)
    console.print(
        f"lifetime: ε = {total:.3f} at δ = {delta:g} over {len(entries)} run(s) "
        "(all steps composed with one RDP accountant, not a sum of per-run ε)"
    )
