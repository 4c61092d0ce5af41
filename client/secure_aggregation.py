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
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.site import SITE_REFUSED
from shared_models.config import RunConfig

Handler = Callable[[Message, Context], Message]
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
    """The hospital's update does not fit the protocol's quantisation range or max weight."""


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage of a protocol message from :mod:`server.secure_aggregation`
    (``setup``, ``share_keys``, ``collect_masked_vectors``, ``unmask``), else None."""
    if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
        return None
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if record is None else str(record.get(Key.STAGE, ""))


def secure_aggregation_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """Flower mod: SecAgg+ for protocol messages, anything else straight to ``call_next``.

    Raises
    ------
    Nothing for expected problems: a refusal by the handler (policy, budget, data) is returned as
    the handler's own error reply, and an update outside the protocol's range as an error reply
    naming the bound and the run-config key to change.
    """
    if secagg_stage(msg) is None:
        return call_next(msg, context)

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
            _add_fitres(reply, RunConfig.from_run_config(ctx.run_config))
        except SecAggRangeError as exc:
            site = str(reply.content.config_records["info"]["site"])
            error = Error(code=SITE_REFUSED, reason=f"site {site} refused: {exc}")
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
        clip it silently) or more training examples than ``secagg.max-weight``.
    """
    arrays = [a.numpy() for a in reply.content.array_records["arrays"].values()]
    metrics = reply.content.metric_records["metrics"]
    weight = 1 if run.dp.client_level else int(metrics["num-examples"])  # type: ignore[arg-type]
    largest = max(float(np.max(np.abs(a))) for a in arrays) if arrays else 0.0
    if largest > run.secagg.clipping_range:
        raise SecAggRangeError(
            f"a model weight of magnitude {largest:.3g} exceeds secagg.clipping-range "
            f"{run.secagg.clipping_range:g}; raise secagg.clipping-range"
        )
    if weight > run.secagg.max_weight:
        raise SecAggRangeError(
            f"{weight} training examples exceed secagg.max-weight {run.secagg.max_weight:g}; "
            "raise secagg.max-weight"
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
    """Flower's ``fixedclipping_mod`` on train messages that carry a clipping norm (client-level
    DP runs); every other message goes straight to ``call_next``."""
    config = msg.content.config_records.get("config")
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and config is not None
        and KEY_CLIPPING_NORM in config
    ):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
