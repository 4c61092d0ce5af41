"""Command-line options shared by ``fedcare simulate`` and ``fedcare server run``."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from server.run_config import RunOptions


class Partition(StrEnum):
    iid = "iid"
    dirichlet = "dirichlet"


Task = Annotated[
    str,
    typer.Option(
        help="Task: breast-cancer (embedded data), heart-disease, chest-xray, icu-mortality, "
        "or the name of a task file in the app's tasks/ folder."
    ),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        help="The task's upstream data: a folder with one data file (or folder) per hospital in "
        "the task's format (the names are the hospital names), or one dataset to split into "
        "simulated hospitals."
    ),
]
PartitionOpt = Annotated[Partition, typer.Option(help="Split of data without a natural split.")]
Alpha = Annotated[float, typer.Option(help="Dirichlet concentration (smaller = more non-IID).")]
Rounds = Annotated[int | None, typer.Option(help="Federated rounds.")]
Strategy = Annotated[
    str | None, typer.Option(help="Flower strategy (fedavg, fedprox, fedadam, ...).")
]
Epsilon = Annotated[float | None, typer.Option(help="Target ε per hospital for the whole run.")]
NoDP = Annotated[
    bool, typer.Option("--no-dp", help="Train without differential privacy (baseline).")
]
Delta = Annotated[
    float | None, typer.Option(help="Target δ (must be below 1/n at every hospital).")
]
Seed = Annotated[int, typer.Option(help="Seed for partitioning, splits, initial weights, noise.")]
Out = Annotated[Path | None, typer.Option(help="Run folder (default runs/<timestamp>).")]
RunConfigOpt = Annotated[
    str | None,
    typer.Option("--run-config", help='Extra settings, "key=value ..." or a .toml file.'),
]


def run_options(
    *,
    task: str,
    data_dir: Path | None,
    partition: Partition,
    alpha: float,
    rounds: int | None,
    strategy: str | None,
    epsilon: float | None,
    no_dp: bool,
    delta: float | None,
    seed: int,
    run_config: str | None,
) -> RunOptions:
    """Collect the shared options into :class:`RunOptions`."""
    return RunOptions(
        task=task,
        data_dir=str(data_dir) if data_dir is not None else "",
        partition=partition.value,
        alpha=alpha,
        rounds=rounds,
        strategy=strategy,
        epsilon=epsilon,
        dp=not no_dp,
        delta=delta,
        seed=seed,
        run_config=run_config,
    )


def default_out() -> Path:
    """``runs/<timestamp>`` in the current directory."""
    from datetime import datetime

    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
