"""Command-line options shared by ``fedcare simulate`` and ``fedcare server run``."""

from __future__ import annotations

import functools
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from server.run_config import APP_DIR, RunOptions


class Partition(StrEnum):
    iid = "iid"
    dirichlet = "dirichlet"


Task = Annotated[
    str,
    typer.Option(
        help="Task: breast-cancer (embedded data), heart-disease, chest-xray, icu-mortality, "
        "the name of a task file in the app's tasks/ folder, or (simulate) the path of a task "
        "file (*.toml) anywhere."
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


@functools.cache
def schema_default(key: str) -> Any:
    """The default of run-config ``key`` in the app's ``pyproject.toml`` (the one schema), read
    with :mod:`tomllib` (no Flower import), for help texts; ``"?"`` when it cannot be read."""
    try:
        doc = tomllib.loads((APP_DIR / "pyproject.toml").read_text(encoding="utf-8"))
        return doc["tool"]["flwr"]["app"]["config"][key]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "?"


Rounds = Annotated[
    int | None,
    typer.Option(
        help="Federated rounds (default: the task's recipe; "
        f"train.rounds = {schema_default('train.rounds')} where the task has none)."
    ),
]
Strategy = Annotated[
    str | None,
    typer.Option(
        help="Flower strategy (fedavg, fedprox, fedadam, ...). "
        f"(default: {schema_default('strategy.name')})"
    ),
]
Epsilon = Annotated[
    float | None,
    typer.Option(
        help="Target ε per hospital for the whole run. "
        f"(default: {schema_default('dp.target-epsilon')})"
    ),
]
NoDP = Annotated[
    bool, typer.Option("--no-dp", help="Train without differential privacy (baseline).")
]
Delta = Annotated[
    float | None,
    typer.Option(
        help="Target δ (must be below 1/n at every hospital). "
        f"(default: {schema_default('dp.target-delta'):g})"
    ),
]
Seed = Annotated[int, typer.Option(help="Seed for partitioning, splits, initial weights, noise.")]
Out = Annotated[Path | None, typer.Option(help="Run folder (default runs/<timestamp>).")]
Tracking = Annotated[
    str | None,
    typer.Option(
        metavar="mlflow[=URI]",
        help="Log the run (config, per-round pooled and per-hospital metrics and ε, artefacts) "
        "to MLflow: `mlflow` = a local ./mlruns file store, or mlflow=URI. Needs MLflow: "
        "fedcare's `tracking` extra, or pip install mlflow-skinny.",
    ),
]
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
