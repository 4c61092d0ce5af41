"""The ``fedcare`` command. ``fedcare simulate``: N simulated hospitals on real data, with a report.

Expected mistakes (unknown task, missing or malformed data, out-of-range option) print one
message naming the problem and exit with code 2; no traceback.
"""

from __future__ import annotations

from simulations.environment import apply_offline_env

apply_offline_env()  # before Flower, Ray or datasets are imported

import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from enum import StrEnum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from simulations.harness import SimulationRequest, UserError, run_simulation_job  # noqa: E402

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # error lines are never broken

app = typer.Typer(
    name="fedcare",
    help="Federated learning for hospitals: Flower + Opacus DP-SGD with per-site privacy accounting.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class Partition(StrEnum):
    iid = "iid"
    dirichlet = "dirichlet"


@app.callback()
def _root() -> None:
    """fedcare: federated learning for hospitals."""


@app.command()
def simulate(
    task: Annotated[
        str, typer.Option(help="Task: breast-cancer (embedded data) or heart-disease.")
    ] = "breast-cancer",
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder with the task's upstream data files.")
    ] = None,
    hospitals: Annotated[
        int | None, typer.Option(help="Simulated hospitals (tasks without a natural split).")
    ] = None,
    partition: Annotated[
        Partition, typer.Option(help="How to split data without a natural split.")
    ] = Partition.iid,
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration (smaller = more non-IID).")
    ] = 0.5,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    strategy: Annotated[
        str | None, typer.Option(help="Flower strategy (fedavg, fedprox, fedadam, ...).")
    ] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="Target ε per hospital for the whole run.")
    ] = None,
    no_dp: Annotated[
        bool, typer.Option("--no-dp", help="Train without differential privacy (baseline).")
    ] = False,
    delta: Annotated[
        float | None, typer.Option(help="Target δ (must be below 1/n at every hospital).")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for partitioning, splits, initial weights, noise.")
    ] = 0,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<timestamp>).")] = None,
    run_config: Annotated[
        str | None,
        typer.Option("--run-config", help='Extra settings, "key=value ..." or a .toml file.'),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Train one shared model across simulated hospitals with DP-SGD and write a report."""
    if no_dp and epsilon is not None:
        raise UserError("--epsilon and --no-dp exclude each other: choose one")
    request = SimulationRequest(
        task=task,
        data_dir=str(data_dir) if data_dir is not None else "",
        hospitals=hospitals,
        partition=partition.value,
        alpha=alpha,
        rounds=rounds,
        strategy=strategy,
        epsilon=epsilon,
        dp=not no_dp,
        delta=delta,
        seed=seed,
        out=out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"),
        run_config=run_config,
        verbose=verbose,
    )
    t0 = time.monotonic()
    summary = run_simulation_job(request, console=console)
    _print_summary(summary, request.out, time.monotonic() - t0)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _print_summary(summary: dict[str, Any], out: Path, seconds: float) -> None:
    table = Table(title=f"{summary['task']} · {summary['strategy']} · {summary['rounds']} rounds")
    for col in ("hospital", "n_train", "n_test", "ε", "δ", "AUROC", "accuracy"):
        table.add_column(col, justify="right" if col != "hospital" else "left")
    for h in summary["hospitals"]:
        table.add_row(
            h["name"], _fmt(h["n_train"]), _fmt(h["n_test"]), _fmt(h["epsilon"]),
            "n/a" if h["delta"] is None else f"{h['delta']:g}",
            _fmt(h["metrics"]["auroc"]), _fmt(h["metrics"]["accuracy"]),
        )  # fmt: skip
    console.print(table)
    ov = summary["overall"]
    console.print(
        f"overall AUROC {_fmt(ov.get('auroc'))}, accuracy {_fmt(ov.get('accuracy'))}, "
        f"mean client accuracy {_fmt(ov.get('mean_client_accuracy'))}"
    )
    for name, b in summary.get("baselines", {}).items():
        console.print(
            f"  baseline {name}: AUROC {_fmt(b['auroc'])}, accuracy {_fmt(b['accuracy'])}"
        )
    for f in summary.get("failures", []):
        console.print(
            f"  [yellow]round {f['round']} {f['kind']}: {f['hospital']}: {f['reason']}[/]"
        )
    console.print(f"run folder: [bold]{out}[/] ({seconds:.1f} s)")


def main() -> None:
    """Console-script entry point: expected errors become one line and exit code 2."""
    from shared_models.config import ConfigError
    from shared_models.tasks import DataError

    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        app(standalone_mode=False)
    except (UserError, DataError, ConfigError) as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
