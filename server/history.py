"""What happened in a run, per round and per hospital, as seen by the coordinator.

:class:`RecordingGrid` wraps the Grid the ServerApp receives and records every reply (metrics,
hospital name, error reason), every hospital that was asked but did not answer, and every hospital
seen earlier in the run that was not connected when a round started (Flower's strategies sample
only connected nodes and skip the others silently); each miss has a cause (:data:`CAUSES`). In a
deployment a hospital is named by the key it authenticates with: ``fedcare server add-hospital``
registers each key under the hospital's name at the SuperLink, which the ServerApp reads back
per node (``Grid.get_nodes``); the name a hospital reports about itself is kept beside it and a
difference is flagged in the report. It observes; it never changes a message, so any Flower
strategy runs unmodified on top of it. With SecAgg+ on, train rounds go through
:func:`server.secure_aggregation.run_secaggplus_round` instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from server.grid_pull import send_and_receive_promptly
from shared_models.metrics import histogram_metrics
from shared_models.protocol import HOSPITAL_REFUSED, PERSONAL_PREFIX, parse_refusal


@dataclass
class HospitalEvent:
    """One hospital's answer (or silence) to one message.

    Attributes
    ----------
    round : int
        Server round.
    kind : str
        ``"train"`` or ``"evaluate"``.
    node_id : int
        Flower node id.
    hospital : str
        The hospital's name: registered with its key (deployment), else the hospital name it
        reported (simulation), else ``node <id>``.
    metrics : dict[str, float | None]
        Reply metrics (NaN converted to None).
    undefined : dict[str, str]
        Reasons for metrics that are undefined at that hospital.
    error : str | None
        Error reason, refusal, or ``"no reply ..."`` when the hospital dropped.
    host : str or None
        Simulation: the Ray node that ran the hospital's ClientApp for this message.
    histograms : dict[str, list[float]]
        Noisy per-class score histograms (``hist-neg``, ``hist-pos``) a hospital without exact
        metrics released; its ``metrics`` are computed from them here.
    cause : str or None
        Why the hospital missed the message, with ``error``: one of :data:`CAUSES`.
    """

    round: int
    kind: str
    node_id: int
    hospital: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    undefined: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    histograms: dict[str, list[float]] = field(default_factory=dict)
    host: str | None = None
    cause: str | None = None


# why a hospital missed a round's message (HospitalEvent.cause; summary.json "failures")
CAUSES = {
    "refused": "the hospital refused the request (its policy, ledger or approved bundles)",
    "failed": "the request failed at the hospital (an error while training or evaluating)",
    "dropped": "the hospital stopped answering during the round (its connection was lost)",
    "timed out": "no reply within train.round-timeout",
    "offline": "not connected when the round started, so it was not asked",
}


def failure_cause(event: HospitalEvent) -> str:
    """The :data:`CAUSES` key of a failed event (histories written before causes were recorded:
    inferred from the error text)."""
    if event.cause is not None:
        return event.cause
    error = event.error or ""
    if error.startswith("no reply"):
        return "timed out"
    return "refused" if parse_refusal(error) is not None else "failed"


@dataclass
class RunHistory:
    """All hospital events and centralized (pooled) evaluations of a run."""

    events: list[HospitalEvent] = field(default_factory=list)
    centralized: dict[int, dict[str, float | None]] = field(default_factory=dict)
    hospitals: dict[int, str] = field(
        default_factory=dict
    )  # node id -> self-reported hospital name
    # node id -> name registered with the node's key at the SuperLink (deployment only)
    registered: dict[int, str] = field(default_factory=dict)
    # node id -> a hospital name it reported that differs from its registered name (last such report)
    misreported: dict[int, str] = field(default_factory=dict)
    # client-level DP: the coordinator's accountant after each round, {"epsilon", "delta", "releases"}
    central_privacy: dict[int, dict[str, float]] = field(default_factory=dict)

    def hospital_name(self, node_id: int) -> str:
        return self.registered.get(node_id) or self.hospitals.get(node_id, f"node {node_id}")

    def self_report(self, node_id: int, hospital: str) -> None:
        """Record the hospital name a hospital reported in a reply; keep it if it is not the name
        its key was registered under."""
        self.hospitals[node_id] = hospital
        registered = self.registered.get(node_id)
        if registered is not None and hospital != registered:
            self.misreported[node_id] = hospital

    def name_mismatches(self) -> dict[str, str]:
        """Registered name -> a different hospital name the hospital reported during the run."""
        return {
            self.registered[n]: hospital
            for n, hospital in self.misreported.items()
            if n in self.registered
        }

    def latest(self, kind: str) -> dict[str, HospitalEvent]:
        """Latest successful event of ``kind`` per hospital."""
        out: dict[str, HospitalEvent] = {}
        for ev in self.events:
            if ev.kind == kind and ev.error is None:
                out[ev.hospital] = ev
        return out

    def errors(self) -> list[HospitalEvent]:
        return [ev for ev in self.events if ev.error is not None]

    def missed(self, server_round: int | None = None) -> list[dict[str, Any]]:
        """Every message a hospital missed (of one round, or all), by round, training first,
        then hospital: ``round``, ``kind``, ``hospital``, ``cause`` (a :data:`CAUSES` key) and
        ``reason`` (the hospital's own refusal text, or what the coordinator saw)."""
        events = [ev for ev in self.errors() if server_round is None or ev.round == server_round]
        events.sort(key=lambda ev: (ev.round, ev.kind != "train", ev.hospital))
        return [
            {"round": ev.round, "kind": ev.kind, "hospital": ev.hospital,
             "cause": failure_cause(ev), "reason": ev.error}
            for ev in events
        ]  # fmt: skip

    def node_ids(self) -> set[int]:
        """Every hospital (node id) this run has seen: replied, was asked, or was online."""
        return {ev.node_id for ev in self.events} | set(self.hospitals) | set(self.registered)

    def up_to(self, server_round: int) -> RunHistory:
        """This history as it stood after round ``server_round``: events and per-round entries
        of later rounds left out (a resume repeats the rounds after its checkpoint), the
        hospitals' names kept."""
        return replace(
            self,
            events=[ev for ev in self.events if ev.round <= server_round],
            centralized={r: m for r, m in self.centralized.items() if r <= server_round},
            central_privacy={r: p for r, p in self.central_privacy.items() if r <= server_round},
            hospitals=dict(self.hospitals),
            registered=dict(self.registered),
            misreported=dict(self.misreported),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "events": [asdict(ev) for ev in self.events],
            "centralized": {str(k): v for k, v in self.centralized.items()},
            "hospitals": {str(k): v for k, v in self.hospitals.items()},
            "registered": {str(k): v for k, v in self.registered.items()},
            "misreported": {str(k): v for k, v in self.misreported.items()},
            "central_privacy": {str(k): v for k, v in self.central_privacy.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunHistory:
        """The history from :meth:`to_dict`'s form; run folders written before fedcare said
        "hospital" only (events' ``site``, the ``sites`` map) read as well."""
        events = [
            HospitalEvent(**{("hospital" if k == "site" else k): v for k, v in ev.items()})
            for ev in data.get("events", [])
        ]
        return cls(
            events=events,
            centralized={int(k): v for k, v in data.get("centralized", {}).items()},
            hospitals={int(k): v for k, v in data.get("hospitals", data.get("sites", {})).items()},
            registered={int(k): v for k, v in data.get("registered", {}).items()},
            misreported={int(k): v for k, v in data.get("misreported", {}).items()},
            central_privacy={int(k): v for k, v in data.get("central_privacy", {}).items()},
        )


def read_history(run_dir: Path, sidecar: Mapping[str, Any]) -> RunHistory:
    """The history of a run folder: its ``history.json``, which the ServerApp rewrites
    (atomically) every round before that round's checkpoint, so it holds at least the rounds of
    the last complete checkpoint (maybe the round after: see :meth:`RunHistory.up_to`).

    A run folder written before ``history.json`` was kept every round has the history in its
    checkpoint ``sidecar`` (key ``"history"``) instead.

    Raises
    ------
    ValueError
        ``history.json`` is not JSON.
    """
    path = run_dir / "history.json"
    if path.exists():
        return RunHistory.from_dict(json.loads(path.read_text(encoding="utf-8")))
    return RunHistory.from_dict(sidecar.get("history") or {})


def _clean(value: Any) -> float | None:
    v = float(value)
    return None if math.isnan(v) or math.isinf(v) else v


class DelegatingGrid(Grid):
    """A Grid that forwards everything to ``inner``; subclasses override ``send_and_receive``."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner

    def set_run(self, run):  # type: ignore[no-untyped-def]
        return self._inner.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._inner.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._inner.send_and_receive(messages, timeout=timeout)


def replying_node(reply: Message, destinations: Mapping[str, int]) -> int:
    """The hospital a reply belongs to. The SuperLink answers for an unreachable node itself
    (source = the SuperLink), so a reply is mapped to the node its request was sent to, via
    ``destinations`` (request message id -> destination node, from :func:`destinations_of`);
    replies to requests never pushed (assembled by SecAgg+) fall back to their source."""
    return destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def destinations_of(sent: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of pushed requests (Flower sets the id when pushing)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}


class RecordingGrid(DelegatingGrid):
    """A Grid that forwards everything to ``inner`` and records replies into ``history``."""

    def __init__(
        self,
        inner: Grid,
        history: RunHistory,
        *,
        poll_interval: float = 0.0,
        secure_aggregation: Callable[..., list[Message]] | None = None,
    ) -> None:
        super().__init__(inner)
        self.history = history
        self.poll_interval = poll_interval
        # set when SecAgg+ is on: answers a round of train messages through the protocol
        self._secure_aggregation = secure_aggregation
        self._current_round = 0
        self._names_asked: set[int] = set()
        # the nodes the strategy last sampled from (Flower's sample_nodes asks get_node_ids), and
        # every node seen in this run: a seen node missing from a round is named in the report
        self._online: set[int] | None = None
        self._seen: set[int] = history.node_ids()

    def _learn_registered_names(self, nodes: Iterable[int]) -> None:
        """The names the SuperLink holds for ``nodes`` (registered with their keys); asked once
        per node (the Simulation Engine's nodes have none)."""
        missing = set(nodes) - self._names_asked
        if missing:
            self._names_asked |= missing
            for info in self._inner.get_nodes():
                if info.name:
                    self.history.registered[int(info.node_id)] = str(info.name)

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes (what strategies sample from), remembered for the next round."""
        nodes = list(self._inner.get_node_ids())
        self._online = set(nodes)
        self._seen |= self._online
        return nodes

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        online, self._online = self._online, None
        if sent:
            if online is None:  # not sampled through this Grid
                online = set(self.get_node_ids())
            self._learn_registered_names({m.metadata.dst_node_id for m in sent} | online)
            self._current_round = _round_of(sent[0])
            self._record_offline(sent, online)
        if (
            self._secure_aggregation is not None
            and sent
            and all(_kind(m.metadata.message_type) == "train" for m in sent)
        ):
            replies = self._secure_aggregation(self._inner, sent, self._exchange, timeout)
        else:
            replies = self._exchange(sent, timeout)
        destinations = destinations_of(sent)
        kinds = {m.metadata.message_id: _kind(m.metadata.message_type) for m in sent}
        answered = set()
        for reply in replies:
            node = replying_node(reply, destinations)
            answered.add(node)
            # the kind of the message answered: the SuperLink's own error replies (an expired
            # message, a lost node) have the system message type
            kind = kinds.get(reply.metadata.reply_to_message_id, _kind(reply.metadata.message_type))
            self._record(reply, node, kind, timeout)
        for msg in sent:
            node = msg.metadata.dst_node_id
            if node not in answered:
                self.history.events.append(
                    HospitalEvent(
                        round=self._current_round,
                        kind=_kind(msg.metadata.message_type),
                        node_id=node,
                        hospital=self.history.hospital_name(node),
                        error=f"no reply within {timeout:g} s (train.round-timeout)"
                        if timeout
                        else "no reply",
                        cause="timed out",
                    )
                )
        return replies

    def _record_offline(self, sent: list[Message], online: set[int]) -> None:
        """A hospital seen earlier in the run but not connected when this round's messages were
        sampled was not asked: record it as missing the round (Flower's strategies skip it
        silently)."""
        kind = _kind(sent[0].metadata.message_type)
        what = "training" if kind == "train" else "evaluation"
        asked = online | {m.metadata.dst_node_id for m in sent}
        # a resumed run after a coordinator restart: Flower's in-memory state gave each hospital
        # a new node id; the old one is the same hospital, connected under its new id
        here = {self.history.hospital_name(n) for n in asked}
        for node in sorted(self._seen - asked):
            if self.history.hospital_name(node) in here:
                continue
            self.history.events.append(
                HospitalEvent(
                    round=self._current_round,
                    kind=kind,
                    node_id=node,
                    hospital=self.history.hospital_name(node),
                    error=f"offline: not connected when round {self._current_round}'s {what} "
                    "started, so not asked",
                    cause="offline",
                )
            )

    def _exchange(self, sent: list[Message], timeout: float | None) -> list[Message]:
        """Push ``sent`` and collect the replies (:func:`server.grid_pull.send_and_receive_promptly`)."""
        return send_and_receive_promptly(
            self._inner, sent, timeout=timeout, poll_interval=self.poll_interval
        )

    def _record(self, reply: Message, node: int, kind: str, timeout: float | None) -> None:
        if reply.has_error():
            refusal = parse_refusal(reply.error.reason or "")
            if refusal is not None:
                self.history.self_report(node, refusal[0])
            expired = reply.error.code in _EXPIRED and refusal is None
            self.history.events.append(
                HospitalEvent(
                    round=self._current_round,
                    kind=kind,
                    node_id=node,
                    hospital=self.history.hospital_name(node),
                    error=(
                        f"no reply within {timeout:g} s (train.round-timeout; the message expired)"
                        if expired and timeout
                        else reply.error.reason
                    ),
                    cause="timed out"
                    if expired
                    else _error_cause(reply.error.code, refused=refusal is not None),
                )
            )
            return
        content = reply.content
        info = content.config_records.get("info")
        if info is not None and "hospital" in info:
            self.history.self_report(node, str(info["hospital"]))
        metrics: Mapping[str, Any] = next(iter(content.metric_records.values()), {})
        undefined: dict[str, str] = {}
        if info is not None:
            undefined = {
                k.removeprefix("undefined."): str(v)
                for k, v in info.items()
                if k.startswith("undefined.")
            }
        values = {k: _clean(v) for k, v in metrics.items() if not isinstance(v, list)}
        histograms = {k: [float(x) for x in v] for k, v in metrics.items() if k in HISTOGRAM_KEYS}
        if len(histograms) == len(HISTOGRAM_KEYS) and "auroc" not in values:
            # a noisy release (a hospital without exact metrics): the metrics are computed here
            released, why = histogram_metrics(histograms["hist-neg"], histograms["hist-pos"])
            values.update(released)
            undefined.update(why)
        personal = [f"{PERSONAL_PREFIX}{k}" for k in HISTOGRAM_KEYS]
        if all(k in metrics for k in personal) and f"{PERSONAL_PREFIX}auroc" not in values:
            # the personal model's noisy release (personal.method at a hospital without exact metrics)
            neg, pos = ([float(x) for x in metrics[k]] for k in personal)  # type: ignore[union-attr]
            released, why = histogram_metrics(neg, pos)
            values.update({f"{PERSONAL_PREFIX}{k}": v for k, v in released.items()})
            undefined.update({f"{PERSONAL_PREFIX}{k}": v for k, v in why.items()})
        self.history.events.append(
            HospitalEvent(
                round=self._current_round,
                kind=kind,
                node_id=node,
                hospital=self.history.hospital_name(node),
                metrics=values,
                undefined=undefined,
                histograms=histograms,
                host=str(info["ray-node"]) if info is not None and "ray-node" in info else None,
            )
        )


HISTOGRAM_KEYS = ("hist-neg", "hist-pos")


# the error replies the SuperLink writes itself for a node that stopped answering
_LOST = (
    ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE,
)  # fmt: skip


# a round's message or its reply expired (its TTL is the round's timeout): no reply in time
_EXPIRED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)


def _error_cause(code: int, *, refused: bool) -> str:
    if refused or code == HOSPITAL_REFUSED:
        return "refused"
    return "dropped" if code in _LOST else "failed"


def _round_of(msg: Message) -> int:
    config = msg.content.config_records.get("config")
    if config is not None and "server-round" in config:
        return int(config["server-round"])  # type: ignore[arg-type]
    return 0


def _kind(message_type: str) -> str:
    return message_type.split(".")[0]
