"""Checkpoints: global weights (safetensors) plus a JSON sidecar, written atomically."""

from __future__ import annotations

import json
import os
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shared_models.files import write_json_atomic

_ROUND = re.compile(r"round-(\d{3,})\.safetensors")
PACKAGES = ("fedcare", "flwr", "torch", "opacus", "numpy", "scikit-learn", "pandas")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that determine a result."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], sidecar: dict[str, Any]) -> None:
    """Save ``state_dict`` to ``path`` (safetensors) and ``sidecar`` to ``path.with_suffix('.json')``.

    Both files are written to a temporary name first and renamed, so a crash never leaves a
    truncated checkpoint under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, path)
    write_json_atomic(path.with_suffix(".json"), sidecar)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint written by :func:`save_weights`."""
    return load_file(str(path))


def latest_checkpoint(run_dir: Path) -> tuple[int, Path, dict[str, Any]]:
    """The last complete checkpoint of a run folder: (round, weights path, sidecar).

    Raises
    ------
    FileNotFoundError
        The folder has no complete checkpoint (weights plus a readable sidecar).
    """
    numbered = [
        (int(m.group(1)), path)
        for path in (run_dir / "checkpoints").glob("round-*.safetensors")
        if (m := _ROUND.fullmatch(path.name))
    ]  # round-001 ... round-999, round-1000 ...: ordered by number, not by name
    for _, weights in sorted(numbered, reverse=True):
        try:
            sidecar = json.loads(weights.with_suffix(".json").read_text())
        except (OSError, ValueError):
            continue  # a checkpoint without a readable sidecar is incomplete: take the one before
        return int(sidecar["round"]), weights, sidecar
    raise FileNotFoundError(f"{run_dir}: no complete checkpoint in {run_dir / 'checkpoints'}")


FLOWER_RUNS = "flower-runs.json"


def record_flower_run(
    run_dir: Path, *, run_id: str, flower_run_id: int, after_round: int
) -> list[int]:
    """Add a Flower run that works on ``run_dir`` to its ``flower-runs.json``; return the Flower
    run ids of the fedcare run so far, in order.

    A fedcare run keeps its id (run-config ``run.id``, the key of every hospital's ledger entry)
    when the coordinator resumes it, under a new Flower run id each time. The file, written
    atomically when each Flower run starts (before any message to a hospital), lists them all
    -- also one that stopped before its first checkpoint -- so that the coordinator's records
    join the hospitals' (their ledger entries' ``flower_run_ids``, their audit lines'
    ``flower_run_id``)::

        {"run_id": "31e990d3aaa9425c",
         "flower_runs": [{"flower_run_id": 79788964876538431, "after_round": 0,
                          "started_at": "2026-12-07T10:00:00+00:00"}, ...]}

    Parameters
    ----------
    run_dir : Path
        The run folder (created if needed).
    run_id : str
        The fedcare run id.
    flower_run_id : int
        The Flower run id of the ServerApp now starting (``context.run_id``).
    after_round : int
        Rounds already done (0; the checkpoint's round when resuming).
    """
    from datetime import UTC, datetime

    path = run_dir / FLOWER_RUNS
    runs = json.loads(path.read_text())["flower_runs"] if path.exists() else []
    if all(r["flower_run_id"] != flower_run_id for r in runs):
        runs.append(
            {
                "flower_run_id": int(flower_run_id),
                "after_round": int(after_round),
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"run_id": run_id, "flower_runs": runs}, indent=1)
    return [int(r["flower_run_id"]) for r in runs]
