"""The ``fedcare`` command: ``simulate`` and ``evaluate`` (this module), ``server ...``,
``client ...`` and ``task ...``.

Expected mistakes (unknown task, missing or malformed data, out-of-range option, missing PKI
file) print one message naming the problem and exit with code 2; no traceback.
"""

from __future__ import annotations

from shared_models.runtime import apply_offline_env

apply_offline_env()  # before Flower, Ray or datasets are imported

import inspect  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from enum import StrEnum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from client.cli import app as client_app  # noqa: E402
from server import cli_options as opt  # noqa: E402
from server.cli import app as server_app  # noqa: E402
from simulations.harness import (  # noqa: E402
    SimulationRequest,
    UsageError,
    check_data_dir_argument,
    export_hospitals,
    run_simulation_job,
    task_argument,
)
from simulations.task_cli import app as task_app  # noqa: E402


class Backend(StrEnum):
    """Where ``fedcare simulate`` runs the hospitals' ClientApps (see ``harness.uses_ray``)."""

    auto = "auto"
    ray = "ray"
    in_process = "in-process"


console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # error lines are never broken

app = typer.Typer(
    name="fedcare",
    help="Federated learning for hospitals: Flower + Opacus DP-SGD with per-hospital privacy accounting.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(server_app, name="server", help="The coordinator: PKI, SuperLink, training runs.")
app.add_typer(client_app, name="client", help="The hospital: SuperNode daemon, data checks.")
app.add_typer(
    task_app, name="task", help="A consortium's own tabular task: draft and check task files."
)


def plain_help(text: str) -> str:
    """A docstring as command-line help: Sphinx roles (``:mod:`client.launcher```) and
    double-backtick literals become their plain text, and the lines of a paragraph one line
    (the terminal wraps it)."""
    text = re.sub(r":(?:mod|func|class|meth|data|attr|exc|obj):`~?([^`]+)`", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r"(?<!\n)\n(?!\n)", " ", text)


def _plain_command_help(*typers: typer.Typer) -> None:
    """Every command's help (its docstring unless given) through :func:`plain_help`."""
    for t in typers:
        for info in t.registered_commands:
            doc = info.help if isinstance(info.help, str) else inspect.getdoc(info.callback)
            if doc:
                info.help = plain_help(doc)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"fedcare {version('fedcare')}", highlight=False)
        except PackageNotFoundError:
            console.print("fedcare (not installed: run `pip install -e .` in the checkout)")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show fedcare's version and exit."
        ),
    ] = False,
) -> None:
    """fedcare: federated learning for hospitals."""


@app.command()
def simulate(
    task: opt.Task = "breast-cancer",
    data_dir: opt.DataDir = None,
    hospitals: Annotated[
        int | None,
        typer.Option(
            help="Simulated hospitals (tasks without a natural split; icu-mortality: pool the ICU "
            "types and partition into N)."
        ),
    ] = None,
    partition: opt.PartitionOpt = opt.Partition.iid,
    alpha: opt.Alpha = 0.5,
    rounds: opt.Rounds = None,
    strategy: opt.Strategy = None,
    epsilon: opt.Epsilon = None,
    no_dp: opt.NoDP = False,
    delta: opt.Delta = None,
    seed: opt.Seed = 0,
    out: opt.Out = None,
    run_config: opt.RunConfigOpt = None,
    tracking: opt.Tracking = None,
    export_hospitals_to: Annotated[
        Path | None,
        typer.Option(
            "--export-hospitals",
            help="Write one data file per simulated hospital into DIR (task format) and exit.",
        ),
    ] = None,
    ledger_dir: Annotated[
        Path | None,
        typer.Option(help="Privacy ledgers of the simulated hospitals (DIR/<hospital>)."),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Hospital policy TOML applied at every simulated hospital.")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
    gpus_per_hospital: Annotated[
        float,
        typer.Option(
            help="GPU share of each simulated hospital (Ray resources; 0.25 = four hospitals "
            "per GPU); 0 trains on the CPU."
        ),
    ] = 0.0,
    cpus_per_hospital: Annotated[
        float, typer.Option(help="CPUs of each simulated hospital's Ray actor.")
    ] = 1.0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="An existing Ray cluster to run the hospitals on (as printed by `ray start "
            "--head`); default: $RAY_ADDRESS, else this machine alone."
        ),
    ] = None,
    backend: Annotated[
        Backend,
        typer.Option(
            help="Where the hospitals' ClientApps run: Ray actors (ray), this process, one "
            "message at a time (in-process), or auto: Ray when --ray-address or $RAY_ADDRESS "
            "is set, --gpus-per-hospital is above 0 or --cpus-per-hospital is not 1, else "
            "in-process."
        ),
    ] = Backend.auto,
    hold_out: Annotated[
        str | None,
        typer.Option(
            "--hold-out",
            metavar="HOSPITAL",
            help="Leave-one-hospital-out: train on every hospital but HOSPITAL (a name of the "
            "data's hospitals, e.g. switzerland, or hospital-2 of a partition), then validate "
            "the final model on all of HOSPITAL's records.",
        ),
    ] = None,
    cross_site: Annotated[
        bool,
        typer.Option(
            "--cross-site",
            help="Add NVFlare's cross-site matrix to report.md and summary.json: the global "
            "(federated) model and each hospital's local model, each on every hospital's test "
            "split (AUROC with DeLong CI, accuracy).",
        ),
    ] = False,
) -> str | None:
    """Train one shared model across simulated hospitals with DP-SGD and write a report.

    --task takes a task name or the path of a task file (*.toml) anywhere on disk.
    """
    check_data_dir_argument(data_dir)  # before the heavy imports: a typo is refused at once
    from server.tracking import parse_tracking

    tracking_uri = parse_tracking(tracking)  # an unknown tracker or no MLflow: refused at once
    with task_argument(task) as (task_name, task_file):
        return _simulate(
            task=task_name, task_file=task_file, data_dir=data_dir, hospitals=hospitals,
            partition=partition, alpha=alpha, rounds=rounds, strategy=strategy,
            epsilon=epsilon, no_dp=no_dp, delta=delta, seed=seed, out=out, run_config=run_config,
            export_hospitals_to=export_hospitals_to, ledger_dir=ledger_dir, policy=policy,
            verbose=verbose, gpus_per_hospital=gpus_per_hospital,
            cpus_per_hospital=cpus_per_hospital, ray_address=ray_address, backend=backend,
            hold_out=hold_out or "", cross_site=cross_site, tracking_uri=tracking_uri,
        )  # fmt: skip


def _simulate(
    *,
    task: str,
    task_file: str,
    data_dir: Path | None,
    hospitals: int | None,
    partition: opt.Partition,
    alpha: float,
    rounds: int | None,
    strategy: str | None,
    epsilon: float | None,
    no_dp: bool,
    delta: float | None,
    seed: int,
    out: Path | None,
    run_config: str | None,
    export_hospitals_to: Path | None,
    ledger_dir: Path | None,
    policy: Path | None,
    verbose: bool,
    gpus_per_hospital: float,
    cpus_per_hospital: float,
    ray_address: str | None,
    backend: Backend,
    hold_out: str,
    cross_site: bool = False,
    tracking_uri: str | None = None,
) -> str | None:
    request = SimulationRequest(
        options=opt.run_options(
            task=task, data_dir=data_dir, partition=partition, alpha=alpha, rounds=rounds,
            strategy=strategy, epsilon=epsilon, no_dp=no_dp, delta=delta, seed=seed, run_config=run_config,
        ),
        task_file=task_file,
        hospitals=hospitals,
        out=out or opt.default_out(),
        ledger_dir=ledger_dir,
        policy=policy,
        verbose=verbose,
        gpus_per_hospital=gpus_per_hospital,
        cpus_per_hospital=cpus_per_hospital,
        ray_address=ray_address,
        backend=backend.value,
        hold_out=hold_out,
        cross_site=cross_site,
    )  # fmt: skip
    if export_hospitals_to is not None:
        for path, rows in export_hospitals(request, export_hospitals_to):
            console.print(f"wrote {path} ({rows} patients)")
        return
    t0 = time.monotonic()
    summary = run_simulation_job(request, console=console)
    from server.report import print_summary

    print_summary(console, summary, request.out, time.monotonic() - t0)
    if tracking_uri is not None:
        from server.tracking import log_run

        mlflow_run = log_run(request.out, tracking_uri)
        console.print(f"tracking: MLflow run {mlflow_run} in {tracking_uri}")
    return RUN_FOLDER_COMPLETE


@app.command()
def evaluate(
    model: Annotated[
        Path,
        typer.Option(
            help="Run folder of `fedcare simulate` (model.safetensors + model.json) or a model "
            "file (X.safetensors next to its card X.json)."
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(help="This hospital's data in the task's hospital format (file or folder)."),
    ],
    task: Annotated[
        str | None,
        typer.Option(help="The task the data follow; must be the model's (default: the model's)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default <run>/evaluation, or evaluation/ next to a model file); "
            "must not exist or be empty."
        ),
    ] = None,
    recalibrate: Annotated[
        bool,
        typer.Option(
            "--recalibrate",
            help="Also fit a hospital-local logistic recalibration (intercept and slope) and report "
            "the calibration before and after it (cross-fitted); recorded in evaluation.json, "
            "never applied to the model file.",
        ),
    ] = False,
) -> None:
    """External validation of a saved model on one hospital's data, offline: scores every record
    and writes report.md, evaluation.json and figures (ROC, precision-recall, reliability,
    decision curve): AUROC with DeLong and bootstrap CIs, AUPRC with a bootstrap CI, operating
    points with Wilson CIs, calibration and net benefit. Nothing leaves the machine.
    """
    from simulations.external_validation import default_out, run_evaluation

    target = out if out is not None else default_out(model)
    result = run_evaluation(model=model, data=data, task=task, out=target, recalibrate=recalibrate)
    disc, cal = result["discrimination"], result["calibration"]

    def ci(d: dict) -> str:
        if d["value"] is None:
            return "undefined"
        bounds = f" [{d['ci_low']:.3f}, {d['ci_high']:.3f}]" if d["ci_low"] is not None else ""
        return f"{d['value']:.3f}{bounds}"

    slope = "undefined" if cal["slope"] is None else f"{cal['slope']:.2f}"
    console.print(
        f"{result['n']} records, prevalence {result['prevalence']:.1%} ({result['task']})",
        highlight=False,
    )
    console.print(
        f"AUROC {ci(disc['auroc_delong'])} (95 % CI, DeLong); AUROC {ci(disc['auroc'])}, AUPRC "
        f"{ci(disc['auprc'])} (95 % CI, {disc['bootstrap']['method']} bootstrap, "
        f"{disc['bootstrap']['resamples']} resamples)",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"Brier {cal['brier']:.4f}, calibration slope {slope}, calibration-in-the-large "
        f"{cal['calibration_in_the_large']:+.3f}",
        highlight=False,
    )
    if (recal := result["recalibration"]) is not None:
        if recal["after"] is None:
            console.print(f"recalibration: {recal.get('note', '')}", highlight=False)
        else:
            after = recal["after"]
            console.print(
                f"hospital-local recalibration logit p' = {recal['intercept']:.3f} + "
                f"{recal['slope']:.3f} logit p (recorded, not applied to the model): Brier "
                f"{cal['brier']:.4f} -> {after['brier']:.4f}, calibration-in-the-large "
                f"{cal['calibration_in_the_large']:+.3f} -> "
                f"{after['calibration_in_the_large']:+.3f} (cross-fitted)",
                highlight=False,
                soft_wrap=True,
            )
    if result["prevalence_warning"]:
        err_console.print(f"[yellow]warning:[/] {result['prevalence_warning']}", highlight=False)
    elif result["prevalence_note"]:
        console.print(f"prevalence shift: {result['prevalence_note']}", highlight=False)
    for warning in result["shift"]["feature_warnings"]:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(f"report: {target / 'report.md'}", highlight=False)


_plain_command_help(app, server_app, client_app, task_app)

# What ``simulate`` returns once its run folder is written and closed (typer hands a command's
# return value to :func:`main`), which then exits without the interpreter's teardown.
RUN_FOLDER_COMPLETE = "run folder complete"


def _exit_without_teardown() -> None:
    """``os._exit(0)`` after flushing logs and the console, when Ray is no longer running.

    Tearing down an interpreter that imported torch, Opacus, Flower and Ray takes about 2 s
    (module finalisers, measured on the 2-core machine) and does nothing a finished run needs:
    every report file is already written, fsynced and closed, and Flower shut Ray down at the
    end of the federation. If Ray is still up (an existing cluster's driver connection), the
    normal exit runs so that Ray's own exit handler disconnects.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _print_data_warnings() -> None:
    """Show each :class:`~shared_models.errors.DataWarning` (data left out, with a count) as
    one ``warning:`` line on stderr; other warnings as Python shows them."""
    import warnings

    from shared_models.errors import DataWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if issubclass(category, DataWarning):
            err_console.print(f"[yellow]warning:[/] {message}", highlight=False)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main() -> None:
    """Console-script entry point: expected errors become one line and exit code 2."""
    import click

    from client.cli import HospitalSetupError
    from server.flwr_cli import FlowerCLIError
    from server.pki import PKIError
    from shared_models.config import ConfigError
    from shared_models.errors import DataError
    from shared_models.node_keys import KeyFileError

    logging.getLogger("flwr").setLevel(logging.WARNING)
    _print_data_warnings()
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit(n) is returned here, not raised
    except (
        UsageError,
        DataError,
        ConfigError,
        PKIError,
        KeyFileError,
        HospitalSetupError,
        FlowerCLIError,
    ) as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    if isinstance(code, int) and code != 0:
        sys.exit(code)
    if code == RUN_FOLDER_COMPLETE:
        _exit_without_teardown()


if __name__ == "__main__":
    main()
