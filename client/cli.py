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
from rich.markup import escape
from rich.table import Table

from shared_models.protocol import APP_DIR
from shared_models.runtime import child_env, flower_executable, run_foreground

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


def _report_table(task: str, data: Path) -> bool:
    """For a tabular task from a task file, print the per-column report of ``data``
    (:mod:`client.table_report`) and refuse a file that fails it; False for other tasks.

    Raises
    ------
    HospitalSetupError
        Unknown task or invalid task file, or ``data`` does not match the task.
    """
    from client.table_report import print_table_report, task_for_check

    try:
        spec = task_for_check(task)
    except ValueError as exc:
        raise HospitalSetupError(str(exc)) from None
    if spec.check_file is None:
        return False
    report = spec.check_file(data)
    if report.format_error:  # not a table at all: one message
        raise HospitalSetupError(report.format_error)
    print_table_report(console, report)
    if not report.ok:
        raise HospitalSetupError(
            f"{data} does not match task {spec.name} ({len(report.problems())} problem(s) above); "
            "fix the file, or the task file with the consortium"
        )
    return True


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
    allow_in_repo: Annotated[
        bool,
        typer.Option(
            "--allow-in-repo",
            help="Write the private key inside a git work tree all the same (refused by "
            "default: it could be committed by accident).",
        ),
    ] = False,
) -> None:
    """Make this hospital's key pair: the private key (mode 0600, in a folder of mode 0700,
    never inside a git work tree unless --allow-in-repo) never leaves the hospital; NAME.pub
    goes to the coordinator. Never overwrites an existing key."""
    from shared_models.node_keys import (
        KeyFileError,
        fingerprint,
        generate_key_pair,
        load_public_key,
    )

    try:
        key_path, pub_path = generate_key_pair(out, name, allow_in_repo=allow_in_repo)
    except KeyFileError as exc:
        raise HospitalSetupError(str(exc)) from None
    console.print(f"wrote {key_path} (private, mode 0600: keep it here, never send it)")
    console.print(f"wrote {pub_path} (public)")
    console.print(
        f"send [bold]{pub_path.name}[/] to the coordinator (key fingerprint "
        f"{fingerprint(load_public_key(pub_path))}; compare it by phone or another channel). "
        f"The coordinator runs `fedcare server add-hospital YOUR_NAME {pub_path.name} --pki PKI`; "
        f"start this hospital with `fedcare client start --key {key_path} ...` (before or after: "
        "it waits until the key is added)"
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
    yes: Annotated[
        bool,
        typer.Option(
            "--yes", help="Approve without asking (scripts; without a terminal it is required)."
        ),
    ] = False,
    list_: Annotated[
        bool, typer.Option("--list", help="Show the approved bundles and exit.")
    ] = False,
) -> None:
    """Review an app bundle (hash, files, tasks) and approve it to run at this hospital.

    The bundle is read, never executed. Its SHA-256 is what the hospital daemon compares with
    the hash of every run's bundle; any other bundle is refused. Without a terminal to ask on
    (a script, a pipe), ``--yes`` approves; without it nothing is approved and the message says
    how.
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
        shown = "" if bundle is None else f" {bundle}"
        if bundle is None:
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
    if not yes and not (sys.stdin is not None and sys.stdin.isatty()):
        raise HospitalSetupError(
            f"not approved: there is no terminal to ask on; review the bundle above, then "
            f"approve it with `fedcare client approve --ledger {ledger}{shown} --yes`"
        )
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
    hospital: Annotated[str, typer.Option(help="This hospital's name, as shown in reports.")],
    data: Annotated[
        Path,
        typer.Option(
            help="This hospital's data, in the task's format (a file, or a folder: images, ICU "
            "records)."
        ),
    ],
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
        Path | None, typer.Option(help="Hospital policy TOML file (bounds for every run).")
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
            help="Seconds between checks for a new message from the coordinator while a run "
            "exchanges messages; idle, the wait grows to 2 s (Flower's SuperNode: always 3)."
        ),
    ] = 0.2,
    supernode: Annotated[
        str,
        typer.Option(
            help="fedcare: Flower's SuperNode in fedcare's prompt Fleet loop; flower: the stock "
            "flower-supernode (3 s between checks; --poll-interval does not apply)."
        ),
    ] = "fedcare",
    test_fraction: Annotated[
        float,
        typer.Option(
            help="Share of the data held out for evaluation (0: the task's default). Each "
            "patient's split is decided by a keyed hash of its record, the key kept in the "
            "ledger folder (split.key)."
        ),
    ] = 0.0,
    task: Annotated[
        str | None,
        typer.Option(
            help="Check --data against this tabular task (name or task file) first and refuse "
            "to start when it does not match (the report of `fedcare client check`)."
        ),
    ] = None,
    join_timeout: Annotated[
        float | None,
        typer.Option(
            help="Give up when the coordinator still refuses this hospital's key as not "
            "registered after this many seconds (default: keep trying, 5 s doubling to 60 s "
            "between attempts, until stopped)."
        ),
    ] = None,
    join_backoff: Annotated[
        str, typer.Option(hidden=True, help="FIRST,CAP seconds between attempts to join.")
    ] = "5,60",
) -> None:
    """Run this hospital's Flower SuperNode (always over TLS, authenticated with its key).

    Only app bundles approved with ``fedcare client approve`` run here: the SuperNode runs with
    ``--isolation process`` and fedcare's launcher (:mod:`client.launcher`) is its SuperExec.
    The SuperNode is Flower's, in fedcare's Fleet loop (:mod:`client.supernode`), which checks
    for messages every ``--poll-interval`` seconds. While the coordinator refuses the key as
    not registered (yet), the SuperNode is started again with a backoff (:mod:`client.join`);
    a key the coordinator removed stops the daemon.
    """
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    from client.join import Backoff, JoinAttempts
    from client.policy import DEFAULT_POLICY, HospitalPolicy, PolicyError
    from shared_models.node_keys import fingerprint

    try:  # a broken policy stops the daemon here, naming the key, not at the first run
        effective = HospitalPolicy.load(policy) if policy is not None else DEFAULT_POLICY
    except PolicyError as exc:
        raise HospitalSetupError(str(exc)) from None
    if test_fraction != 0.0 and not 0.05 <= test_fraction <= 0.9:
        raise HospitalSetupError(f"--test-fraction {test_fraction:g}: use 0.05 to 0.9 (or 0)")
    for path, what in ((ca, "--ca"), (key, "--key")):
        if not path.is_file():
            raise HospitalSetupError(f"{what} {path}: file not found")
    if not data.exists():  # a file (tabular tasks) or a folder (images, ICU records)
        raise HospitalSetupError(f"--data {data}: not found")
    try:
        public_key = load_ssh_private_key(key.read_bytes(), None).public_key()
        key_fingerprint = fingerprint(public_key)  # type: ignore[arg-type]
    except (ValueError, TypeError, AttributeError):
        raise HospitalSetupError(
            f"--key {key}: not an OpenSSH private key (use NAME.key from `fedcare client keygen`)"
        ) from None
    if join_timeout is not None and join_timeout < 0:
        raise HospitalSetupError(f"--join-timeout {join_timeout:g}: use seconds >= 0")
    try:
        backoff = Backoff.parse(join_backoff)
    except ValueError as exc:
        raise HospitalSetupError(f"--join-backoff: {exc}") from None
    if task is not None:
        _report_table(task, data)
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
        f'data-path="{data.resolve()}" hospital="{hospital}" device="{device}" ledger-dir="{ledger_dir}" '
        f"test-fraction={float(test_fraction)!r}"
    )
    if policy is not None:
        node_config += f' policy-path="{policy.resolve()}"'
    source = (
        f"from {policy}" if policy is not None else "fedcare's default; --policy FILE changes it"
    )
    console.print(f"hospital policy ({source}):")
    console.print(effective.as_toml().rstrip(), highlight=False, markup=False)
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
        "--ledger", str(ledger_dir), "--hospital", hospital,
        "--superexec-auth-secret-file", str(secret), "--parent-pid", str(os.getpid()),
        "--executor", executor,
    ]  # fmt: skip
    attempts = JoinAttempts(
        hospital=hospital, fingerprint=key_fingerprint, public_key_name=key.with_suffix(".pub").name,
        log_path=state / "supernode.log", ca=ca, backoff=backoff, join_timeout=join_timeout,
        say=lambda text: console.print(f"[yellow]{escape(text)}[/]", highlight=False),
    )  # fmt: skip
    console.print(
        f"hospital {hospital}: connecting to {superlink} over TLS with key {key_fingerprint}; log "
        f"{state / 'supernode.log'}"
    )
    code = run_foreground(
        cmd, env=child_env(FLWR_HOME=str((state / "flwr-home").resolve())),
        log_path=state / "supernode.log", on_line=attempts.on_line,
        companions=[(launcher, state / "launcher.log")], restart=attempts.after_exit,
    )  # fmt: skip
    if attempts.problem is not None:
        raise HospitalSetupError(attempts.problem)
    if code != 0:
        console.print(
            f"[red]the SuperNode exited with code {code}[/]; see {state / 'supernode.log'}"
        )
    raise typer.Exit(code)


@app.command()
def check(
    task: Annotated[str, typer.Option(help="Task whose schema the data must follow.")],
    data: Annotated[
        Path, typer.Option(help="The data file (or folder: image tasks, icu-mortality) to check.")
    ],
) -> None:
    """Validate local data against a task's schema (offline): rows, label balance, and missing
    values per column (tabular), image formats and sizes (images), or per variable (icu-mortality:
    a folder of ``<RecordID>.txt`` records with their ``Outcomes*.txt``, or the upstream archive;
    one row per ICU stay, "missing" = stays without any observation of a variable in 48 h).

    A tabular task (a name, or a task file ``*.toml``) gets the per-column report: missing rate,
    values of the wrong type and out-of-range values (counted, never shown), label balance.
    """
    if _report_table(task, data):
        return
    try:
        from shared_models.tasks import get_task

        spec = get_task(task)
    except ValueError as exc:
        raise HospitalSetupError(str(exc)) from None
    frame = spec.read_file(data)  # raises DataError naming file, line and column
    preprocessing = spec.resolve_preprocessing("default")
    x, _ = spec.features(frame, preprocessing)  # the task's own checks (e.g. image sizes)
    n = len(frame)
    positives = int(frame["label"].sum())
    images = "image" in frame.columns
    console.print(f"{data}: {n} {'images' if images else 'rows'}, valid {task} data")
    console.print(
        f"label ({spec.positive_class}): {positives} positive ({positives / n:.0%}), "
        f"{n - positives} negative"
    )
    if images:
        shape = "x".join(str(d) for d in x.shape[1:])
        console.print(f"every image becomes {shape} (preprocessing {preprocessing})")
        table = Table(title="images by format and stored size")
        for col in ("format", "size", "images"):
            table.add_column(col, justify="right" if col == "images" else "left")
        sizes = frame["width"].astype(str) + "x" + frame["height"].astype(str)
        for (fmt, size), count in frame.groupby([frame["format"], sizes]).size().items():
            table.add_row(str(fmt), str(size), str(count))
        console.print(table)
        return
    table = Table(title="missing values per column")
    table.add_column("column")
    table.add_column("missing", justify="right")
    for col in frame.columns:
        if col != "label" and frame[col].dtype != object:  # object: e.g. a stay's observations
            missing = int(frame[col].isna().sum())
            table.add_row(col, f"{missing} ({missing / n:.0%})" if missing else "0")
    console.print(table)


@app.command()
def budget(
    ledger: Annotated[Path, typer.Option(help="The hospital's privacy ledger folder.")],
) -> None:
    """Privacy spent at this hospital: per run and lifetime ε, δ, steps, releases."""
    from client.ledger import Ledger, LedgerError, lifetime_epsilon

    if not ledger.is_dir():
        raise HospitalSetupError(f"--ledger {ledger}: folder not found")
    try:
        records = Ledger(ledger).records()
    except LedgerError as exc:
        raise HospitalSetupError(str(exc)) from None
    if not records:
        console.print(f"{ledger}: no runs recorded yet (no privacy spent)")
        return
    console.print(f"privacy ledger {ledger}")
    for r in records:
        flower = ", ".join(map(str, r.flower_run_ids)) or "?"
        console.print(
            f"  run {r.run_id}  task {r.task}  updated {r.updated or '?'}  (coordinator's Flower "
            f"run id(s): {flower})"
        )
        history = r.accountant["history"]
        sigmas = ", ".join(sorted({f"{s:.4g}" for s, q, _ in history if q < 1}))
        rates = ", ".join(sorted({f"{q:.4g}" for _, q, _ in history if q < 1}))
        if not r.sample_level_dp:
            console.print(
                f"      no sample-level DP: {r.updates} model update(s) released without it, "
                f"{r.eval_releases} noisy evaluation release(s): ε = ∞"
            )
            continue
        console.print(
            f"      steps {r.train_steps}, noise multiplier {sigmas or '-'}, sample rate "
            f"{rates or '-'}, {r.eval_releases} evaluation release(s): ε = {r.epsilon():.3f} "
            f"at δ = {r.delta:g} (the run's), {r.epsilon(r.hospital_delta):.3f} at the hospital's "
            f"δ = {r.hospital_delta:g}"
        )
        if r.explanations:
            from client.explanations import release_epsilon

            alone = [release_epsilon(s, delta=r.hospital_delta) for s in r.explanations]
            console.print(
                f"      explanation release(s) {len(r.explanations)}: noise multiplier "
                f"{', '.join(f'{s:.4g}' for s in r.explanations)}, ε alone = "
                f"{', '.join(f'{e:.3f}' for e in alone)} at the hospital's δ (composed in the run's "
                "ε above)"
            )
    private = [r for r in records if r.sample_level_dp]
    exposed = len(records) - len(private)
    if private:
        delta = max(r.hospital_delta for r in private)
        total = lifetime_epsilon([r.accountant for r in private], delta=delta)
        console.print(
            f"lifetime: ε = {total:.3f} at δ = {delta:g} over {len(private)} run(s) with "
            "sample-level DP (every release composed with one RDP accountant, not a sum of "
            "per-run ε)"
        )
    if exposed:
        console.print(
            f"lifetime: ε = ∞ -- {exposed} run(s) released model updates without sample-level DP "
            "(allowed by this hospital's policy, allow-non-dp)"
        )


@app.command()
def dashboard(
    state: Annotated[
        Path, typer.Option(help="The daemon's state folder (`client start --state`).")
    ] = Path("fedcare-hospital"),
    ledger: Annotated[
        Path | None,
        typer.Option(
            help="Privacy ledger folder (default STATE/ledger; simulation: DIR/<hospital>)."
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="The hospital policy file the daemon runs with (`client start --policy`)."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Loopback address to listen on (127.0.0.1 or ::1; nothing else).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the dashboard.")] = 8051,
) -> None:
    """Serve this hospital's read-only privacy dashboard on loopback: the policy in force, the
    lifetime ε against its cap and ε per run (from the ledger), the approved bundles and the
    audit log (searchable). It never changes the ledger or the approvals."""
    from shared_models.dashboard import is_loopback, serve

    if not is_loopback(host) or host == "localhost":
        raise HospitalSetupError(
            f"--host {host}: the hospital dashboard listens on loopback only (127.0.0.1 or ::1); "
            "reach it from another machine through an SSH tunnel"
        )
    folder = ledger or state / "ledger"
    if not folder.is_dir():
        raise HospitalSetupError(
            f"{'--ledger' if ledger else '--state'} {ledger or state}: no ledger folder at "
            f"{folder} (the daemon creates it at its first run)"
        )
    from client.dashboard import PolicyError, build_app

    try:
        app_, _ = build_app(folder.resolve(), policy=policy)
    except PolicyError as exc:
        raise HospitalSetupError(str(exc)) from None
    console.print(f"hospital dashboard: http://{host}:{port}/ (ledger {folder}; Ctrl-C stops)")
    serve(app_, host=host, port=port)
