"""SecAgg+ under any FedAvg-family strategy: the coordinator only ever holds the sum.

Flower 1.41 ships SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020) only for the legacy workflow API (``flwr.server.workflow.SecAggPlusWorkflow``
with ``flwr.client.mod.secaggplus_mod``). fedcare's ServerApp drives the Message-API strategies of
``flwr.serverapp.strategy``. :class:`SecAggPlusGrid` joins the two without a second copy of any
training code:

- the strategy builds its train messages as usual and hands them to ``send_and_receive``;
- :class:`SecAggPlusGrid` runs Flower's ``SecAggPlusWorkflow`` stages (setup, share keys, collect
  masked vectors, unmask) over the real Grid; in the collect stage each hospital receives exactly
  the message the strategy built (plus the protocol's ConfigRecord), trains with the ordinary
  ClientApp handler, and ``secaggplus_mod`` masks the weighted update before it leaves;
- the coordinator unmasks only the weighted SUM; the strategy receives one reply per hospital that
  carries that hospital's own metrics (loss, ε, example count) and the aggregate as its arrays.

Because every reply carries the same aggregate, the strategy's weighted mean of them is the
aggregate itself: FedAvg and FedProx then give FedAvg's result, FedAdam / FedYogi apply their
server optimiser to it. Strategies that need each update (median, trimmed mean, Krum) are refused
by the run config.

Flower 1.41 private code this module copies from or calls is pinned by source hash in
``tests/test_flower_internals.py``: a flwr upgrade that changes it fails there, naming this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common import Parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.legacy_context import History
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
    SecAggPlusWorkflow,
    WorkflowState,
)
from flwr.serverapp import Grid
from flwr.supercore import log as flwr_log

from server.history import DelegatingGrid, destinations_of, replying_node
from shared_models.config import SecAggConfig
from shared_models.protocol import SECAGG_FAILED


class _Stages(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, sending the strategy's own train messages in the collect stage.

    A hospital that fails before it has sent anything masked (an error or no reply in the setup
    or share-keys stage) is removed from the protocol, as if it had never been sampled: nobody
    holds shares of its keys, so Flower's unmask stage could not treat it as a dropped hospital.
    """

    def __init__(self, contents: dict[int, RecordDict], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._contents = contents

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().setup_stage(grid, context, state)
        # what each hospital trains on: the strategy's message (arrays + config), not a legacy FitIns
        state.nid_to_fitins = {nid: _copy(self._contents[nid]) for nid in state.nid_to_fitins}
        return ok and _forget_failed(self, state)

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        return super().share_keys_stage(grid, context, state) and _forget_failed(self, state)


def _forget_failed(workflow: SecAggPlusWorkflow, state: WorkflowState) -> bool:
    """Drop hospitals that failed before the collect stage from the sampled set and from every
    neighbourhood; then re-check the reconstruction threshold."""
    alive = set(state.active_node_ids)
    state.sampled_node_ids = alive
    state.nid_to_neighbours = {
        nid: neighbours & alive
        for nid, neighbours in state.nid_to_neighbours.items()
        if nid in alive
    }
    return workflow._check_threshold(state)


class _Sum(LegacyStrategy):
    """The legacy-strategy slot of ``LegacyContext``: samples exactly the strategy's hospitals
    and keeps the unmasked aggregate (the workflow hands every result the same aggregate)."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids
        self.aggregate: Parameters | None = None

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        from flwr.common import FitIns

        return [(SimpleNamespace(node_id=nid), FitIns(parameters, {})) for nid in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def initialize_parameters(self, client_manager):  # type: ignore[no-untyped-def]
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        return None, {}

    def evaluate(self, server_round, parameters):  # type: ignore[no-untyped-def]
        return None


class _Observed(DelegatingGrid):
    """Forwards the workflow's protocol exchanges to ``exchange`` and keeps, per hospital, its
    first error reply (so a refusal reaches the strategy with its reason) and its collect-stage
    reply (its own metrics; the arrays were masked and removed at the hospital)."""

    def __init__(self, inner: Grid, exchange) -> None:  # type: ignore[no-untyped-def]
        super().__init__(inner)
        self._exchange = exchange
        self.errors: dict[int, Message] = {}
        self.trained: dict[int, Message] = {}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None):  # type: ignore[no-untyped-def]
        sent = list(messages)
        replies = list(self._exchange(sent, timeout))
        destinations = destinations_of(sent)
        for reply in replies:
            node = replying_node(reply, destinations)
            if reply.has_error():
                self.errors.setdefault(node, reply)
            elif "metrics" in reply.content.metric_records:
                self.trained[node] = reply
        return replies


def run_secaggplus_round(
    grid: Grid,
    messages: list[Message],
    cfg: SecAggConfig,
    *,
    exchange,  # type: ignore[no-untyped-def]
    timeout: float | None,
    context: Context,
    unit_weights: bool = False,
) -> list[Message]:
    """Answer one round of train ``messages`` through SecAgg+ and return one reply per hospital.

    Parameters
    ----------
    grid : Grid
        The ServerApp's Grid (real SuperLink or Simulation Engine).
    messages : list of Message
        The strategy's train messages, one per sampled hospital, each with an ``arrays``
        ArrayRecord (the global model, tensors of any shape) and a ``config`` ConfigRecord.
    cfg : SecAggConfig
        Protocol parameters (shares, reconstruction threshold, quantisation range, max weight).
    exchange : callable
        ``exchange(messages, timeout) -> replies``: how one protocol stage is sent and collected.
    timeout : float or None
        Seconds each protocol stage waits for replies.
    context : Context
        The ServerApp's context (wrapped in Flower's ``LegacyContext`` for the workflow).
    unit_weights : bool
        Every hospital weighs 1 (client-level DP): ``max_weight`` is then 1, which keeps the
        quantisation as fine as with example counts.

    Returns
    -------
    list of Message
        For each hospital that completed the protocol: a reply to its train message with
        ``arrays`` = the unmasked weighted mean of all surviving hospitals' updates (same keys,
        shapes and dtypes as sent) and that hospital's own ``metrics`` and ``info``. For each
        hospital that answered a stage with an error: that error. Hospitals that never answered
        get no reply (the caller records them as dropped). If too few hospitals remain to unmask
        (fewer than the reconstruction threshold), every hospital that answered gets an error
        reply and the strategy aggregates nothing this round.

    Notes
    -----
    Quantisation (``clipping_range`` / 2^22 per unit) makes the aggregate equal FedAvg's within
    about 1e-5 for weights in [-8, 8]; a hospital refuses an update outside ``clipping_range``
    instead of letting the protocol clip it silently (see :mod:`client.secure_aggregation`).
    """
    by_node = {m.metadata.dst_node_id: m for m in messages}
    if len(by_node) < 2:  # Flower's workflow stops silently; say why
        reason = "secure aggregation needs at least 2 hospitals in a round; only 1 was sampled"
        return [Message(Error(code=SECAGG_FAILED, reason=reason), reply_to=m) for m in messages]
    template = messages[0].content.array_records["arrays"]
    server_round = int(messages[0].content.config_records["config"]["server-round"])  # type: ignore[arg-type]
    observed = _Observed(grid, exchange)
    legacy = _Sum(list(by_node))
    ctx = LegacyContext(
        context, config=ServerConfig(num_rounds=server_round), strategy=legacy,
        client_manager=SimpleClientManager(),
    )  # fmt: skip
    ctx.history = History()
    ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _Stages(
        {nid: m.content for nid, m in by_node.items()},
        num_shares=_count_or_fraction(cfg.num_shares),
        reconstruction_threshold=_count_or_fraction(cfg.reconstruction_threshold),
        clipping_range=cfg.clipping_range,
        max_weight=1.0 if unit_weights else cfg.max_weight,
        timeout=timeout,
    )
    workflow(observed, ctx)
    replies: list[Message] = []
    aggregate = _as_arrays(legacy.aggregate, template) if legacy.aggregate is not None else None
    lost = sorted(nid for nid in by_node if nid not in observed.trained)
    for nid, msg in by_node.items():
        trained = observed.trained.get(nid)
        if trained is not None and aggregate is None:  # trained, but the sum was never unmasked
            reason = (
                f"secure aggregation could not unmask this round's sum: {len(lost)} of "
                f"{len(by_node)} hospitals failed or dropped out (nodes {lost}), fewer than the "
                "reconstruction threshold remained"
            )
            replies.append(Message(Error(code=SECAGG_FAILED, reason=reason), reply_to=msg))
            continue
        if trained is None and nid in observed.errors:  # a refusal or "unavailable", with reason
            replies.append(Message(observed.errors[nid].error, reply_to=msg))
            continue
        if trained is None or aggregate is None:
            continue  # never answered: recorded as dropped by the caller
        content = trained.content
        record = RecordDict({"arrays": aggregate, "metrics": content.metric_records["metrics"]})
        if "info" in content.config_records:
            record["info"] = content.config_records["info"]
        replies.append(Message(record, reply_to=msg))
    if aggregate is not None:
        flwr_log(
            INFO, "[fedcare] SecAgg+ round %d: unmasked the sum of %d hospital updates",
            server_round, sum(1 for r in replies if not r.has_error()),
        )  # fmt: skip
    return replies


def _count_or_fraction(value: float) -> int | float:
    return int(value) if value > 1 else float(value)


def _as_arrays(parameters: Parameters, template: ArrayRecord) -> ArrayRecord:
    """Legacy ``Parameters`` (list of numpy bytes, in ``template``'s key order) -> ArrayRecord
    with ``template``'s keys and dtypes."""
    from flwr.common import parameters_to_ndarrays

    arrays = parameters_to_ndarrays(parameters)
    return ArrayRecord(
        {
            key: Array(np.asarray(a, dtype=ref.numpy().dtype).reshape(ref.shape))
            for (key, ref), a in zip(template.items(), arrays, strict=True)
        }
    )


def _copy(content: RecordDict) -> RecordDict:
    """A RecordDict holding the same records (the workflow adds its own ConfigRecord to it)."""
    out = RecordDict()
    for name, record in content.items():
        out[name] = record
    return out


__all__ = ["SECAGG_FAILED", "run_secaggplus_round"]
