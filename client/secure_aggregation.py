"""The hospital's side of SecAgg+ and of client-level DP: ClientApp mods around the handlers.

:func:`secure_aggregation_mod` runs Flower's ``secaggplus_mod`` (Bell et al., CCS 2020) for the
protocol messages of :mod:`server.secure_aggregation`. In the collect stage it passes the ordinary
train message (the protocol's ConfigRecord removed) to the next mod / the train handler, so the
hospital trains exactly as without SecAgg+; it then hands the update to ``secaggplus_mod`` in the
legacy ``fitres.*`` form that mod reads. ``secaggplus_mod`` weights, quantises and masks it and
removes every ArrayRecord: no unmasked weight leaves the hospital.

:func:`client_clipping_mod` applies Flower's ``fixedclipping_mod`` (client-level DP, the L2 norm
of the update ``new - global`` clipped to the coordinator's ``clipping_norm``) to train messages
that carry a clipping norm, and passes every other message through.

:func:`check_protocol` checks the coordinator's protocol messages against the run config and
against what this hospital kept of the round (Flower's ``SecAggPlusState`` in ``Context.state``):
the threat model is a coordinator that sends any message and reads every reply. Flower 1.41
private code it relies on is pinned by source hash in ``tests/test_flower_internals.py``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.hospital_data import run_config_of
from shared_models.config import RunConfig
from shared_models.protocol import HOSPITAL_REFUSED, refusal_reason

Handler = Callable[[Message, Context], Message]
_log = logging.getLogger("fedcare.hospital")  # the hospital's own log (never sent)
_masking: ContextVar[bool] = ContextVar("fedcare_secagg_masking", default=False)


def handing_to_secagg() -> bool:
    """True while the train handler runs inside the SecAgg+ collect stage: its reply is masked
    before anything leaves the hospital."""
    return _masking.get()


class _Refused(Exception):
    """Carries the handler's error reply out of ``secaggplus_mod`` unchanged."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


class SecAggRangeError(ValueError):
    """The hospital's update does not fit the protocol's quantisation range or max weight.

    ``str(error)`` is what the coordinator receives: the category, the run-config key at fault
    and its configured bound (public: the coordinator set it), never a value observed in the
    update or the number of training examples. ``detail`` adds those, for the hospital's own log.
    """

    def __init__(self, reason: str, *, detail: str) -> None:
        super().__init__(reason)
        self.detail = detail


class SecAggProtocolError(ValueError):
    """The coordinator's SecAgg+ parameters would weaken the protocol or differ from the run's."""


def check_protocol(msg: Message, context: Context) -> None:
    """Refuse protocol parameters that would let the coordinator unmask one hospital's update.

    Setup stage: the reconstruction threshold the run config gives for the number of shares,
    a strict majority of them (and >= 2), and the quantisation range and max weight the run
    config declares. Share-keys stage: at least ``threshold``
    hospitals (this one included) to share with. Unmask stage: the lists of active and dropped
    hospitals, against this hospital's state of the round (:func:`check_unmask`).

    Raises
    ------
    SecAggProtocolError
        Naming the parameter, the value received and the value required (unmask stage: the
        rule broken and the node ids at fault).
    """
    stage = secagg_stage(msg)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    run = run_config_of(context)
    if stage == "setup":
        threshold, shares = int(configs[Key.THRESHOLD]), int(configs[Key.SHARE_NUMBER])  # type: ignore[arg-type]
        max_weight = 1.0 if run.dp.client_level else run.secagg.max_weight
        problems = []
        if not 2 <= threshold <= shares:
            problems.append(
                f"reconstruction threshold {threshold} with {shares} shares (need 2 <= threshold <= shares)"
            )
        expected = expected_threshold(run.secagg.reconstruction_threshold, shares)
        if threshold != expected:
            problems.append(
                f"reconstruction threshold {threshold} with {shares} shares (run config "
                f"secagg.reconstruction-threshold = {run.secagg.reconstruction_threshold:g} "
                f"gives {expected})"
            )
        if 2 * threshold <= shares:
            problems.append(
                f"reconstruction threshold {threshold} is not a strict majority of the {shares} "
                "hospitals sharing keys (a minority could unmask one hospital's update)"
            )
        if float(configs[Key.CLIPPING_RANGE]) != run.secagg.clipping_range:  # type: ignore[arg-type]
            problems.append(
                f"clipping range {configs[Key.CLIPPING_RANGE]!r} (run config: {run.secagg.clipping_range:g})"
            )
        if float(configs[Key.MAX_WEIGHT]) != max_weight:  # type: ignore[arg-type]
            problems.append(f"max weight {configs[Key.MAX_WEIGHT]!r} (run config: {max_weight:g})")
        if problems:
            raise SecAggProtocolError("SecAgg+ setup rejected: " + "; ".join(problems))
    elif stage == "share_keys":
        state = context.state.config_records.get(RECORD_KEY_STATE)
        threshold = int(state["threshold"]) if state is not None and "threshold" in state else 2  # type: ignore[arg-type]
        peers = len([k for k in configs if k != Key.STAGE])
        if peers < max(threshold, 2):
            raise SecAggProtocolError(
                f"SecAgg+ share-keys rejected: {peers} hospital(s) to share with, fewer than the "
                f"reconstruction threshold {threshold}"
            )
    elif stage == Stage.UNMASK:
        check_unmask(configs, context)


def check_unmask(configs: ConfigRecord, context: Context) -> None:
    """Refuse an unmask request whose lists of active and dropped hospitals would reveal more
    than the protocol allows, before Flower's ``_unmask`` reveals any share.

    For each node listed as active the hospital reveals its share of that node's private mask
    seed (b_u), for each node listed as dropped its share of that node's secret key sk1: with
    both, from ``threshold`` hospitals, the coordinator removes every mask of that node's
    update. The lists are the coordinator's word; this hospital's own record of the round is
    Flower's ``SecAggPlusState`` (``Context.state``): its node id, the threshold of the setup
    stage, the public keys forwarded at share-keys (``public_keys_dict``) and the nodes whose
    key shares it holds (``rd_seed_share_dict`` / ``sk1_share_dict``: itself and the nodes that
    sent it their shares in the collect stage, i.e. those its masked vector was masked with).

    What Flower 1.41 already refuses (``secaggplus_mod``'s ``check_stage`` and
    ``check_configs``, then ``_unmask``), left to it: an unmask that does not follow this
    hospital's collect stage of the same round (so at most one unmask answered per masked
    vector); missing lists or lists of anything but ints; fewer than ``threshold`` entries in
    the active list (counted with repetitions); and, by a ``KeyError`` in its share look-up,
    a node whose shares this hospital does not hold (an exception, not a refusal naming a rule).

    What fedcare adds, each refused with the rule named:

    - no node listed both as active and as dropped (the attack above);
    - no node listed twice in one list (a repeated node would count twice towards Flower's
      threshold check, so only distinct active nodes count);
    - this hospital itself never listed as dropped (it is answering);
    - every listed node is one this hospital exchanged key shares with in this round: a node
      never in its key exchange, or one forwarded at share-keys that sent it no shares (it
      dropped before the collect stage, and this hospital's vector holds no mask with it), is
      refused by name.

    A refusal ends this hospital's part in the round: its key shares are erased from the state
    and the stage set to ``unmask``, so Flower answers any later request of this round with an
    error and only a new setup (fresh keys and seeds) starts another.

    Raises
    ------
    SecAggProtocolError
        Naming the rules broken and the node ids (the coordinator's own) at fault.
    """
    record = context.state.config_records.get(RECORD_KEY_STATE)
    active = _node_ids(configs.get(Key.ACTIVE_NODE_ID_LIST))
    dropped = _node_ids(configs.get(Key.DEAD_NODE_ID_LIST))
    if (
        record is None
        or record.get("current_stage") != Stage.COLLECT_MASKED_VECTORS
        or active is None
        or dropped is None
    ):
        return  # out of order or malformed: Flower refuses it before any share is read
    state = SecAggPlusState(**record)
    holds = set(state.rd_seed_share_dict) & set(state.sk1_share_dict)
    problems = []
    both = sorted(set(active) & set(dropped))
    if both:
        problems.append(
            f"node(s) {both} listed as both active and dropped (their mask seed and secret key "
            "together would unmask their update)"
        )
    for name, ids in (("active", active), ("dropped", dropped)):
        twice = sorted(nid for nid, count in Counter(ids).items() if count > 1)
        if twice:
            problems.append(f"node(s) {twice} listed more than once as {name}")
    if state.nid in dropped:
        problems.append("this hospital is listed as dropped while it answers")
    listed = set(active) | set(dropped)
    early = sorted((listed - holds) & set(state.public_keys_dict))
    if early:
        problems.append(
            f"node(s) {early} dropped before sending this hospital their key shares in this "
            "round (it holds no share of theirs to reveal)"
        )
    outside = sorted(listed - holds - set(state.public_keys_dict))
    if outside:
        problems.append(
            f"node(s) {outside} not among the hospitals this one exchanged keys with in this round"
        )
    if problems:
        _end_round(context, state)
        raise SecAggProtocolError("SecAgg+ unmask rejected: " + "; ".join(problems))


def _node_ids(value: Any) -> list[int] | None:
    """``value`` if it is a list of node ids as Flower's ``check_configs`` accepts them (ints,
    not bools), else None."""
    if isinstance(value, list) and all(type(v) is int for v in value):
        return list(value)
    return None


def _end_round(context: Context, state: SecAggPlusState) -> None:
    """Erase this round's key shares and mark its unmask stage as reached (Flower's
    ``check_stage`` then accepts only a new setup)."""
    state.current_stage = Stage.UNMASK
    state.rd_seed_share_dict, state.sk1_share_dict = {}, {}
    context.state.config_records[RECORD_KEY_STATE] = ConfigRecord(state.to_dict())  # type: ignore[arg-type]


def expected_threshold(configured: float, shares: int) -> int:
    """The reconstruction threshold ``SecAggPlusWorkflow`` derives from the run config's
    ``secagg.reconstruction-threshold`` for ``shares`` shares: a count (> 1) as it is, a
    fraction as ``max(round(fraction * shares), 2)`` (Flower 1.41's setup stage)."""
    if configured > 1:
        return int(configured)
    return max(round(configured * shares), 2)


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage of a protocol message from :mod:`server.secure_aggregation`
    (``setup``, ``share_keys``, ``collect_masked_vectors``, ``unmask``), else None."""
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
        return None
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if record is None else str(record.get(Key.STAGE, ""))


def secure_aggregation_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Flower mod: SecAgg+ for protocol messages, anything else straight to ``call_next``.

    A refusal by the handler (policy, budget, data) is returned as the handler's own error
    reply, and an update outside the protocol's range as an error reply naming the bound and the
    run-config key to change (the observed value and the example count go to the hospital's
    log only).

    Raises
    ------
    SecAggProtocolError
        Protocol parameters that :func:`check_protocol` rejects (the ClientApp answers with a
        refusal).
    """
    if secagg_stage(msg) is None:
        return call_next(msg, context)
    check_protocol(msg, context)

    def train_then_hand_over(inner: Message, ctx: Context) -> Message:
        protocol = inner.content.config_records.pop(RECORD_KEY_CONFIGS)
        token = _masking.set(True)
        try:
            reply = call_next(inner, ctx)
        finally:
            _masking.reset(token)
            inner.content.config_records[RECORD_KEY_CONFIGS] = protocol
        if reply.has_error():
            raise _Refused(reply)
        try:
            _add_fitres(reply, run_config_of(ctx))
        except SecAggRangeError as exc:  # the observed values go to this hospital's log only
            _log.warning("refused the SecAgg+ collect stage: %s (%s)", exc, exc.detail)
            hospital = str(reply.content.config_records["info"]["hospital"])
            reason = f"{exc} (the hospital's log has the details)"
            error = Error(code=HOSPITAL_REFUSED, reason=refusal_reason(hospital, reason))
            raise _Refused(Message(error, reply_to=inner)) from None
        return reply

    try:
        return secaggplus_mod(msg, context, train_then_hand_over)
    except _Refused as refused:
        return refused.reply


def _add_fitres(reply: Message, run: RunConfig) -> None:
    """Add the legacy ``fitres.*`` records ``secaggplus_mod`` reads (parameters in the
    ``arrays`` record's key order, weight = training examples, or 1 under client-level DP
    whose accountant needs equal weights).

    Raises
    ------
    SecAggRangeError
        A weight outside ``[-secagg.clipping-range, secagg.clipping-range]`` (the protocol would
        clip it silently) or more training examples than ``secagg.max-weight``; its text names
        the key and the configured bound only (see :class:`SecAggRangeError`).
    """
    arrays = [a.numpy() for a in reply.content.array_records["arrays"].values()]
    metrics = reply.content.metric_records["metrics"]
    weight = 1 if run.dp.client_level else int(metrics["num-examples"])  # type: ignore[arg-type]
    largest = max(float(np.max(np.abs(a))) for a in arrays) if arrays else 0.0
    bound = run.secagg.clipping_range
    if not largest <= bound:  # NaN too
        raise SecAggRangeError(
            f"its update does not fit SecAgg+'s quantisation range: a model weight lies outside "
            f"[-{bound:g}, {bound:g}] (secagg.clipping-range = {bound:g}); raise "
            "secagg.clipping-range",
            detail=f"largest |weight| {largest!r} > secagg.clipping-range {bound!r}",
        )
    if weight > run.secagg.max_weight:
        raise SecAggRangeError(
            f"its update's weight does not fit SecAgg+'s range: more training examples than "
            f"secagg.max-weight = {run.secagg.max_weight:g}; raise secagg.max-weight",
            detail=f"{weight} training examples > secagg.max-weight {run.secagg.max_weight!r}",
        )
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([np.asarray(a, dtype=np.float64) for a in arrays]),
        num_examples=weight,
        metrics={},
    )
    for name, record in compat.fitres_to_recorddict(fitres, keep_input=False).items():
        reply.content[name] = record


def client_clipping_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Flower's ``fixedclipping_mod`` on train messages of client-level DP runs; every other
    message goes straight to ``call_next``.

    Raises
    ------
    SecAggProtocolError
        A client-level DP run whose train request carries no clipping norm or another one than
        the run config's ``dp.client-clipping-norm`` (the ClientApp answers with a refusal).
    """
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type != MessageType.TRAIN or config is None:
        return call_next(msg, context)
    run = run_config_of(context)
    if run.dp.client_level:
        norm = config.get(KEY_CLIPPING_NORM)
        if norm is None or float(norm) != run.dp.client_clipping_norm:  # type: ignore[arg-type]
            raise SecAggProtocolError(
                f"client-level DP run: the coordinator asked for clipping norm {norm!r} but the run "
                f"config says dp.client-clipping-norm = {run.dp.client_clipping_norm:g}"
            )
    if KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
