"""The hospital's audit log: one JSON line per message received and sent, in the ledger folder.

Each line records the run ids -- fedcare's (``run_id``, run-config ``run.id``, kept when the
coordinator resumes a run) and the coordinator's Flower run id (``flower_run_id``, what its
``summary.json`` lists under ``flower_run_ids``) -- round, message type, direction, the record
keys and their byte sizes (what left the hospital and how much), ε after the round, and the policy
decision. It never contains patient values: only record names, sizes, aggregate metrics and
reasons.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, RecordDict


def record_sizes(content: RecordDict) -> dict[str, int]:
    """Bytes per record of a message: ArrayRecord payload bytes, JSON size of the others."""
    sizes: dict[str, int] = {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            sizes[key] = sum(len(array.data) for array in record.values())
        else:  # bytes values (SecAgg+ keys, shares, masked vectors) count as their length
            sizes[key] = len(json.dumps(dict(record), default=_placeholder).encode()) + sum(
                len(b)
                for v in record.values()
                for b in (v if isinstance(v, list) else [v])
                if isinstance(b, bytes)
            )
    return sizes


def _placeholder(value: Any) -> str:
    return "" if isinstance(value, bytes) else str(value)


class AuditLog:
    """Append-only ``audit.jsonl`` in the hospital's ledger folder."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "audit.jsonl"

    def write(self, entry: dict[str, Any]) -> None:
        """Append one line (flushed and fsynced)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **entry}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry, allow_nan=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def message(
        self, direction: str, msg: Message, *, run_id: str, hospital: str, **extra: Any
    ) -> None:
        """Record one message (``direction`` = "received" or "sent")."""
        entry: dict[str, Any] = {
            "direction": direction,
            "hospital": hospital,
            "run_id": run_id,
            "flower_run_id": msg.metadata.run_id,
            "message_type": msg.metadata.message_type,
        }
        if msg.has_error():
            entry["error"] = msg.error.reason
        else:
            entry["records"] = record_sizes(msg.content)
            entry["bytes"] = sum(entry["records"].values())
            metrics = next(iter(msg.content.metric_records.values()), None)
            if metrics is not None:
                entry["metrics"] = {k: v for k, v in metrics.items() if not isinstance(v, list)}
        entry.update(extra)
        self.write(entry)
