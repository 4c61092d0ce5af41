"""The hospital's privacy dashboard: policy, privacy budget, approved bundles and audit log in a
browser, on loopback only, read-only.

``fedcare client dashboard --state DIR`` serves it (see :func:`build_app`). It reads the files
the hospital daemon keeps and never writes them: it does not import the classes that write the
ledger (:class:`client.ledger.Ledger`) or the approvals (:class:`client.approval.ApprovedBundles`);
it parses their JSON here and computes ε with the same accountant function
(:func:`client.training.epsilon_spent`, Opacus' RDP or PRV accountant over every recorded
release), composing all runs into one lifetime ε the way :func:`client.ledger.lifetime_epsilon`
does (one RDP accountant over every release, not a sum of per-run ε).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from client.policy import DEFAULT_POLICY, HospitalPolicy, PolicyError
from client.training import epsilon_spent, stored_hospital_delta
from shared_models.dashboard import LOOPBACK_NAMES, guarded, render

AUDIT_ROWS = 5000  # the newest audit lines shown (the search covers these)


@dataclass
class LedgerRun:
    """One ledger file (``runs/<run-id>.json``) as the dashboard shows it.

    ``epsilon`` is at the run's δ and ``hospital_epsilon`` at the hospital's δ (where the policy's caps
    apply); both ∞ for a run that released updates without sample-level DP. ``problem`` is set
    (and the numbers are None) when the file is unreadable.
    """

    file: str
    run_id: str = ""
    task: str = ""
    updated: str = ""
    delta: float | None = None
    hospital_delta: float | None = None
    epsilon: float | None = None
    hospital_epsilon: float | None = None
    sample_level_dp: bool = True
    train_steps: int = 0
    updates: int = 0
    eval_releases: int = 0
    flower_run_ids: list[int] = field(default_factory=list)
    history: list[list[float]] = field(default_factory=list)
    mechanism: str = "rdp"
    problem: str | None = None


def read_ledger(ledger: Path) -> list[LedgerRun]:
    """Every run of the ledger folder, oldest first (by last update)."""
    runs = []
    for path in sorted((ledger / "runs").glob("*.json")):
        try:
            entry = json.loads(path.read_text())
            state = entry["accountant"]
            history = [[float(s), float(q), int(k)] for s, q, k in state["history"]]
            run = LedgerRun(
                file=path.name, run_id=str(entry["run_id"]), task=str(entry["task"]),
                updated=str(entry.get("updated", "")), delta=float(entry["delta"]),
                hospital_delta=stored_hospital_delta(entry),
                sample_level_dp=bool(entry.get("sample_level_dp", True)),
                train_steps=int(entry.get("train_steps", 0)), updates=int(entry.get("updates", 0)),
                eval_releases=int(entry.get("eval_releases", 0)),
                flower_run_ids=[int(i) for i in entry.get("flower_run_ids", [])],
                history=history, mechanism=str(state["mechanism"]),
            )  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError) as exc:
            runs.append(LedgerRun(file=path.name, problem=f"unreadable ({type(exc).__name__})"))
            continue
        if not run.sample_level_dp and run.updates:
            run.epsilon = run.hospital_epsilon = math.inf
        else:
            accountant = {"mechanism": run.mechanism, "history": run.history}
            run.epsilon = epsilon_spent(accountant, delta=run.delta)  # type: ignore[arg-type]
            run.hospital_epsilon = epsilon_spent(accountant, delta=run.hospital_delta)  # type: ignore[arg-type]
        runs.append(run)
    runs.sort(key=lambda r: r.updated)
    return runs


def lifetime(runs: list[LedgerRun]) -> tuple[float | None, float | None]:
    """(lifetime ε, its δ): every release of every run with sample-level DP composed with one RDP
    accountant at the largest hospital δ (as ``fedcare client budget``); ε = ∞ when a run released
    updates without it; (None, None) for an empty ledger."""
    readable = [r for r in runs if r.problem is None]
    if not readable:
        return None, None
    private = [r for r in readable if r.sample_level_dp or not r.updates]
    delta = max(r.hospital_delta or 0.0 for r in readable)
    if len(private) < len(readable):
        return math.inf, delta
    merged = [step for r in private for step in r.history]
    return epsilon_spent({"mechanism": "rdp", "history": merged}, delta=delta), delta  # type: ignore[arg-type]


def read_approved(ledger: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The approved bundles (``approved.json``) and a problem, if the file is unreadable."""
    path = ledger / "approved.json"
    if not path.exists():
        return [], None
    try:
        entries = json.loads(path.read_text())["approved"]
        return [e for e in entries if isinstance(e, dict)], None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [], f"{path}: unreadable ({type(exc).__name__})"


def read_audit(ledger: Path, limit: int = AUDIT_ROWS) -> tuple[list[dict[str, Any]], int]:
    """The newest ``limit`` lines of ``audit.jsonl``, newest first, and the number of lines.
    A line that is not a JSON object is shown as such (``unreadable``)."""
    path = ledger / "audit.jsonl"
    if not path.exists():
        return [], 0
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines[-limit:], start=max(1, len(lines) - limit + 1)):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError
        except ValueError:
            entry = {"unreadable": f"line {number} is not a JSON object"}
        entry["line"] = number
        rows.append(entry)
    rows.reverse()
    return rows, len(lines)


def build_app(
    ledger: Path, *, policy: Path | None = None, policy_note: str = ""
) -> tuple[Starlette, HospitalPolicy]:
    """The hospital dashboard's ASGI app (loopback host names only) and the policy it shows.

    Parameters
    ----------
    ledger : Path
        The hospital's ledger folder (``runs/``, ``audit.jsonl``, ``approved.json``).
    policy : Path, optional
        The hospital policy file the daemon runs with (default: fedcare's default policy).
    policy_note : str
        Where the policy comes from, for the page.

    Raises
    ------
    PolicyError
        The policy file is unreadable or invalid (the message names the key).
    """
    effective = HospitalPolicy.load(policy) if policy is not None else DEFAULT_POLICY
    note = policy_note or (f"from {policy}" if policy else "fedcare's default (no --policy)")

    def page(request: Request) -> Response:
        runs = read_ledger(ledger)
        total, delta = lifetime(runs)
        approved, approved_problem = read_approved(ledger)
        audit, audit_lines = read_audit(ledger)
        cap = effective.lifetime_epsilon
        return render(
            "hospital.html", ledger=str(ledger), policy=effective, policy_toml=effective.as_toml(),
            policy_note=note, runs=runs, lifetime=total, lifetime_delta=delta, cap=cap,
            share=min(1.0, (total or 0.0) / cap) if cap else 1.0,
            run_cap=effective.max_epsilon_per_run, approved=approved,
            approved_problem=approved_problem, audit=audit, audit_lines=audit_lines,
            audit_limit=AUDIT_ROWS,
        )  # fmt: skip

    return guarded([Route("/", page)], hosts=LOOPBACK_NAMES), effective


__all__ = ["PolicyError", "build_app", "lifetime", "read_approved", "read_audit", "read_ledger"]
