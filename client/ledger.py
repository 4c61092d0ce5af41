"""The hospital's privacy ledger: what every run released here, persisted on disk.

A SuperNode's ``context.state`` lives in memory and is lost when the hospital daemon restarts;
a coordinator that resumes a run starts a new Flower run. The ledger survives both: it is keyed
by the fedcare run id (run-config ``run.id``; a resumed run keeps it under a new Flower run id,
and the record lists every Flower run id it saw, so that it joins the coordinator's records:
the run folder's ``summary.json`` has the same two), written atomically before every release leaves the
hospital (temporary file, fsync, rename, fsync of the folder: a crash mid-write leaves the previous
version), and never reset silently -- an unreadable ledger file is an error the hospital must
resolve.

Layout: ``<ledger>/runs/<run-id>.json`` holds one :class:`RunRecord`: the run's plan (what the
run's settings were when it first reached this hospital), the Opacus accountant state of every DP
release (DP-SGD steps ``[sigma, q, steps]`` and evaluation releases ``[sigma, 1, 1]``), the
counts of DP-SGD steps, model updates and evaluation releases, the explanation releases (their
own entry, ``explanations``: the noise multiplier of each; their ``[sigma, 1, 1]`` is in the
accountant history too, so the run's and the lifetime ε compose them), and whether the run had
sample-level DP at all (a run without it is recorded with ε = ∞).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.training import AccountantState, epsilon_spent, stored_hospital_delta
from shared_models.files import fsync_folder, write_json_atomic

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class LedgerError(RuntimeError):
    """The ledger is unreadable or inconsistent; it is never reset automatically."""


@dataclass
class RunRecord:
    """Everything one run released at this hospital.

    Attributes
    ----------
    run_id, task : str
        The fedcare run id and its task.
    delta : float
        The run's δ (ε below is reported at it).
    hospital_delta : float
        The hospital's δ, at which the policy's caps and the lifetime ε are enforced.
    plan : dict or None
        The run's settings when it first reached this hospital (a later request with other
        settings under the same run id is refused); None in ledgers written before plans.
    accountant : AccountantState
        Every DP release of the run: Opacus' ``{"mechanism", "history": [[sigma, q, steps]]}``.
    sample_level_dp : bool
        False: the run released model updates without sample-level DP here (ε = ∞).
    train_steps, updates, eval_releases : int
        DP-SGD steps taken, model updates sent, evaluation results sent.
    explanations : list of float
        The noise multiplier of every DP explanation release of the run
        (:mod:`client.explanations`; each is also a ``[sigma, 1, 1]`` accountant entry).
    flower_run_ids : list of int
        The coordinator's Flower run ids this run had when it reached this hospital (one; more after
        the coordinator resumed it), in order: the ids the coordinator's ``summary.json``
        (``flower_run_ids``) and this hospital's audit log (``flower_run_id``) show.
    """

    run_id: str
    task: str
    delta: float
    hospital_delta: float
    plan: dict[str, Any] | None = None
    accountant: AccountantState = field(default_factory=lambda: {"mechanism": "rdp", "history": []})
    sample_level_dp: bool = True
    train_steps: int = 0
    updates: int = 0
    eval_releases: int = 0
    flower_run_ids: list[int] = field(default_factory=list)
    updated: str = ""
    explanations: list[float] = field(default_factory=list)

    def epsilon(self, delta: float | None = None) -> float:
        """ε of every release recorded, at ``delta`` (default: the run's δ); ∞ without DP."""
        if not self.sample_level_dp and self.updates:
            return math.inf
        return epsilon_spent(self.accountant, delta=self.delta if delta is None else delta)

    def saw_flower_run(self, flower_run_id: int) -> None:
        """Add the coordinator's Flower run id of a request of this run (once, in order)."""
        if int(flower_run_id) not in self.flower_run_ids:
            self.flower_run_ids.append(int(flower_run_id))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunRecord:
        return _record_from(json.loads(text))


def _record_from(entry: dict[str, Any]) -> RunRecord:
    """A record from its JSON form (ledgers written before plans and counters read as well)."""
    state = entry["accountant"]
    history = [[float(s), float(q), int(k)] for s, q, k in state["history"]]
    accountant = {"mechanism": str(state["mechanism"]), "history": history}
    steps = sum(int(k) for _, q, k in history if q < 1.0)
    return RunRecord(
        run_id=str(entry["run_id"]),
        task=str(entry["task"]),
        delta=float(entry["delta"]),
        hospital_delta=stored_hospital_delta(entry),
        plan=entry.get("plan"),
        accountant=accountant,
        sample_level_dp=bool(entry.get("sample_level_dp", True)),
        train_steps=int(entry.get("train_steps", steps)),
        updates=int(entry.get("updates", 0)),
        eval_releases=int(entry.get("eval_releases", 0)),
        flower_run_ids=[int(i) for i in entry.get("flower_run_ids", [])],
        updated=str(entry.get("updated", "")),
        explanations=[float(s) for s in entry.get("explanations", [])],
    )


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

    def load(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None if the run is new here.

        Raises
        ------
        LedgerError
            The file exists but is truncated, corrupted or of another shape.
        """
        path = self.path(run_id)
        if not path.exists():
            return None
        try:
            return _record_from(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LedgerError(
                f"privacy ledger file {path} is unreadable ({type(exc).__name__}: {exc}); it is never "
                "reset automatically -- restore it from a backup before this hospital trains again"
            ) from None

    def save(self, record: RunRecord) -> None:
        """Record ``record`` atomically (write, fsync, rename, fsync the folder)."""
        record.updated = datetime.now(UTC).isoformat(timespec="seconds")
        write_json_atomic(self.path(record.run_id), asdict(record), indent=1)

    def records(self) -> list[RunRecord]:
        """Every run recorded (an unreadable file raises :class:`LedgerError`)."""
        folder = self.root / "runs"
        return [
            record
            for path in (sorted(folder.glob("*.json")) if folder.exists() else [])
            if (record := self.load(path.stem)) is not None
        ]


def fingerprint(kind: str, server_round: int, arrays: dict[str, bytes]) -> str:
    """SHA-256 of a request: its kind, the round and the global weights' bytes (sorted by name)."""
    digest = hashlib.sha256(f"{kind}:{server_round}".encode())
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(arrays[name])
    return digest.hexdigest()


class ReplayCache:
    """The last reply of each kind (``train``, ``evaluate``, ``explain``) this hospital sent in a run, kept so
    a repeated request is answered again without a new release.

    When a coordinator crashes after a hospital answered round k but before it checkpointed
    round k, the resumed run sends the very same request (same round, same global weights) again.
    Re-sending the reply already released is post-processing of a past DP release and spends no
    privacy budget; answering again would spend it twice. Layout next to the ledger entry:
    ``runs/<run-id>.last-<kind>.safetensors`` (weights, if any, + request fingerprint and metrics).
    """

    def __init__(self, ledger: Ledger, kind: str) -> None:
        self.ledger = ledger
        self.kind = kind

    def _path(self, run_id: str) -> Path:
        return self.ledger.path(run_id).with_suffix(f".last-{self.kind}.safetensors")

    def get(self, run_id: str, request: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
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
        self, run_id: str, request: str, state_dict: dict[str, Any], metrics: dict[str, Any]
    ) -> None:
        """Store the reply about to be sent (atomically and durably, replacing the last one)."""
        import os

        from safetensors.torch import save_file

        path = self._path(run_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp), metadata={"request": request, "metrics": json.dumps(metrics)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)


def lifetime_epsilon(histories: list[AccountantState], *, delta: float) -> float:
    """Epsilon of ALL recorded releases of all runs composed with one accountant (not a sum of ε's).

    Uses Opacus' RDP accountant over the concatenated (sigma, q, steps) histories: Renyi DP
    composes additively across mechanisms, and the conversion to (ε, δ) happens once, at
    ``delta`` (Mironov 2017; ``opacus.accountants.RDPAccountant``).
    """
    merged = [list(step) for state in histories for step in state["history"]]
    return epsilon_spent({"mechanism": "rdp", "history": merged}, delta=delta)
