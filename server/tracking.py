"""Experiment tracking: a finished run folder logged to MLflow (``--tracking mlflow[=URI]``).

What is logged (MLflow's fluent API, ``mlflow.log_params`` / ``log_metrics`` /
``log_artifact``): the run config as parameters; per round (MLflow ``step`` = server round) the
pooled metrics (``pooled.auroc``, ...; simulation's centralised evaluation), every hospital's
evaluation metrics (``HOSPITAL.auroc``, ...), training loss (``HOSPITAL.train-loss``) and ε
(``HOSPITAL.epsilon``, with ``HOSPITAL.delta``), and under client-level DP the coordinator's ε
(``central.epsilon``); and the run folder's artefacts (report, curves, summary, metrics table,
model weights and card). Only what the run folder already holds is logged: values the hospitals
released under DP or declared public.

The default store is a local MLflow file store, ``./mlruns`` (``mlflow ui`` shows it, no
server). MLflow's telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY``, ``DO_NOT_TRACK``);
nothing is sent anywhere but the tracking URI. MLflow 3 keeps the file store in maintenance
mode behind ``MLFLOW_ALLOW_FILE_STORE``, which is set for ``file:`` URIs.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.run_config import UsageError

if TYPE_CHECKING:  # server.history imports Flower: not before a mistake is refused
    from server.history import RunHistory

EXPERIMENT = "fedcare"
ARTEFACTS = (
    "report.md", "curves.png", "calibration.png", "summary.json", "metrics.csv", "history.json",
    "model.safetensors", "model.json", "model.md",
)  # fmt: skip
# an MLflow key: alphanumerics, underscores, dashes, periods, spaces, slashes
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")
MAX_PARAM = 6000  # MLflow's longest parameter value (characters)


def parse_tracking(value: str | None, *, cwd: Path | None = None) -> str | None:
    """The tracking URI of ``--tracking`` (None when tracking is off).

    ``mlflow`` -> ``file:<cwd>/mlruns``; ``mlflow=URI`` -> URI (a plain path becomes a
    ``file:`` URI).

    Raises
    ------
    UsageError
        Another tracker than ``mlflow``, or MLflow is not installed.
    """
    if value is None:
        return None
    tracker, _, uri = value.partition("=")
    if tracker != "mlflow":
        raise UsageError(f"--tracking {value!r}: use mlflow or mlflow=URI (e.g. mlflow=./mlruns)")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UsageError(
            "--tracking mlflow: MLflow is not installed; install fedcare's tracking extra or "
            "`pip install mlflow-skinny`"
        ) from None
    if not uri:
        uri = str((cwd or Path.cwd()) / "mlruns")
    if "://" not in uri and not uri.startswith("file:"):
        uri = Path(uri).resolve().as_uri()
    return uri


def _key(name: str) -> str:
    return _UNSAFE.sub("_", name)[:250]


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def round_metrics(history: RunHistory) -> dict[int, dict[str, float]]:
    """Server round -> MLflow metric name -> value, from a run's history (finite values only)."""
    out: dict[int, dict[str, float]] = {}
    for ev in history.events:
        if ev.error is not None:
            continue
        names = ("epsilon", "delta", "train-loss") if ev.kind == "train" else None
        for name, value in ev.metrics.items():
            if (names is None or name in names) and name != "num-examples":
                v = _finite(value)
                if v is not None:
                    out.setdefault(ev.round, {})[_key(f"{ev.hospital}.{name}")] = v
    for server_round, metrics in history.centralized.items():
        for name, value in (metrics or {}).items():
            v = _finite(value)
            if v is not None:
                out.setdefault(server_round, {})[_key(f"pooled.{name}")] = v
    for server_round, spent in history.central_privacy.items():
        v = _finite(spent.get("epsilon"))
        if v is not None:
            out.setdefault(server_round, {})["central.epsilon"] = v
    return out


def log_run(run_dir: Path, uri: str, *, run_name: str | None = None) -> str:
    """Log a finished run folder to MLflow at ``uri``; return the MLflow run id.

    Parameters
    ----------
    run_dir : Path
        A run folder with ``history.json`` and a checkpoint sidecar (the run config).
    uri : str
        MLflow tracking URI (:func:`parse_tracking`).
    run_name : str, optional
        MLflow run name (default: the folder's name).
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow

    from server.checkpoint import latest_checkpoint
    from server.history import RunHistory

    history = RunHistory.from_dict(json.loads((run_dir / "history.json").read_text()))
    _, _, sidecar = latest_checkpoint(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    params = {_key(k): str(v)[:MAX_PARAM] for k, v in sorted(sidecar.get("run_config", {}).items())}
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=run_name or run_dir.name) as active:
        mlflow.set_tags({"fedcare.run_id": str(summary.get("run_id", "")),
                         "fedcare.run_folder": str(run_dir.resolve())})  # fmt: skip
        mlflow.log_params(params)
        for server_round, metrics in sorted(round_metrics(history).items()):
            mlflow.log_metrics(metrics, step=server_round)
        overall = {
            _key(f"final.{k}"): v
            for k, value in (summary.get("overall") or {}).items()
            if (v := _finite(value)) is not None
        }
        if overall:
            mlflow.log_metrics(overall)
        for name in ARTEFACTS:
            if (run_dir / name).is_file():
                mlflow.log_artifact(str(run_dir / name))
        return str(active.info.run_id)
