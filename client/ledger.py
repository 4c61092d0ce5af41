"""The hospital's privacy ledger: the Opacus accountant state of every run, persisted on disk.

A SuperNode's ``context.state`` lives in memory and is lost when the hospital daemon restarts;
a coordinator that resumes a run starts a new Flower run. The ledger survives both: it is keyed
by the fedcare run id (run-config ``run.id``), written atomically after every round (temporary
file, fsync, rename: a crash mid-write leaves the previous version), and never reset silently --
an unreadable ledger file is an error the hospital must resolve.

Layout: ``<ledger>/runs/<run-id>.json`` = ``{"run_id", "task", "delta", "accountant":
{"mechanism", "history": [[sigma, q, steps], ...]}, "updated"}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.training import AccountantState
from shared_models.files import write_json_atomic

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class LedgerError(RuntimeError):
    """The ledger is unreadable or inconsistent; it is never reset automatically."""


class Ledger:
    """A hospital's privacy ledger folder.

    Parameters
    ----------
    root : Path
        Ledger folder (created on first write).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, run_id: str) -> Path:
        """The ledger file of ``run_id`` (raises :class:`LedgerError` for an invalid id)."""
        if not _RUN_ID.match(run_id):
            raise LedgerError(f"run id {run_id!r} is not a valid ledger key")
        return self.root / "runs" / f"{run_id}.json"

    def load(self, run_id: str) -> AccountantState | None:
        """The accountant state recorded for ``run_id``, or None if the run is new here.

        Raises
        ------
        LedgerError
            The file exists but is truncated, corrupted or of another shape.
        """
        path = self.path(run_id)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            state = entry["accountant"]
            history = [[float(s), float(q), int(k)] for s, q, k in state["history"]]
            return {"mechanism": str(state["mechanism"]), "history": history}
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"privacy ledger file {path} is unreadable ({type(exc).__name__}: {exc}); it is never "
                "reset automatically -- restore it from a backup before this hospital trains again"
            ) from None

    def save(self, run_id: str, state: AccountantState, *, task: str, delta: float) -> None:
        """Record ``state`` for ``run_id`` atomically (write, fsync, rename)."""
        entry: dict[str, Any] = {
            "run_id": run_id,
            "task": task,
            "delta": delta,
            "accountant": state,
            "updated": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json_atomic(self.path(run_id), entry, indent=1)


def fingerprint(server_round: int, arrays: dict[str, bytes]) -> str:
    """SHA-256 of a training request: the round and the global weights' bytes (sorted by name)."""
    digest = hashlib.sha256(str(server_round).encode())
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(arrays[name])
    return digest.hexdigest()


class ReplayCache:
    """The last update this hospital sent in a run, kept so a repeated request is answered again
    without new training.

    When a coordinator crashes after a hospital trained round k but before it checkpointed
    round k, the resumed run sends the very same request (same round, same global weights) again.
    Re-sending the update already released is post-processing of a past DP release and spends no
    privacy budget; training again would spend it twice. Layout next to the ledger entry:
    ``runs/<run-id>.last-update.safetensors`` (weights + request fingerprint and metrics).
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def _path(self, run_id: str) -> Path:
        return self.ledger.path(run_id).with_suffix(".last-update.safetensors")

    def get(self, run_id: str, request: str) -> tuple[dict[str, Any], dict[str, float]] | None:
        """The stored (state dict, metrics) if the last request of ``run_id`` was ``request``."""
        from safetensors import safe_open

        path = self._path(run_id)
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("request") != request:
                return None
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        return tensors, json.loads(meta["metrics"])

    def put(
        self, run_id: str, request: str, state_dict: dict[str, Any], metrics: dict[str, float]
    ) -> None:
        """Store the update about to be sent (atomically, replacing the previous one)."""
        from safetensors.torch import save_file

        path = self._path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp), metadata={"request": request, "metrics": json.dumps(metrics)})
        os.replace(tmp, path)


def run_entries(ledger: Ledger) -> list[dict[str, Any]]:
    """Every run recorded in the ledger (parsed; an unreadable file raises :class:`LedgerError`)."""
    folder = ledger.root / "runs"
    entries = []
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        state = ledger.load(path.stem)
        entry = json.loads(path.read_text())
        entry["accountant"] = state
        entries.append(entry)
    return entries


def lifetime_epsilon(histories: list[AccountantState], *, delta: float) -> float:
    """Epsilon of ALL recorded steps of all runs composed with one accountant (not a sum of ε's).

    Uses Opacus' RDP accountant over the concatenated (sigma, q, steps) histories: Renyi DP
    composes additively across mechanisms, and the conversion to (ε, δ) happens once, at
    ``delta`` (Mironov 2017; ``opacus.accountants.RDPAccountant``).
    """
    from client.training import epsilon_spent

    merged = [list(step) for state in histories for step in state["history"]]
    return epsilon_spent({"mechanism": "rdp", "history": merged}, delta=delta)
