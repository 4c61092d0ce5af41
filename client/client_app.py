"""The hospital's Flower ClientApp: thin handlers over :mod:`client.training`.

Train handler: load the site's data, train with Opacus DP-SGD (noise calibrated once for the
whole run), record the accountant's state (``context.state`` and, when the hospital has one, its
on-disk ledger) BEFORE replying, and reply with ``arrays`` and ``metrics`` (``num-examples`` =
training examples, ``train-loss``, cumulative ``epsilon`` and ``delta``).
Evaluate handler: test-split AUROC, accuracy, sensitivity, specificity, AUPRC and the operating
point at sensitivity 0.8 (NaN when undefined; the reason travels in the ``info`` ConfigRecord).
Expected problems (bad data, budget exhausted, bad run config, unreadable ledger) are answered
with an error reply whose reason the coordinator shows, never with a traceback.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import AuditLog
from client.ledger import Ledger, LedgerError, ReplayCache, fingerprint, run_entries
from client.policy import PolicyError, PolicyRefusal, SitePolicy
from client.secure_aggregation import (
    SecAggProtocolError,
    client_clipping_mod,
    handing_to_secagg,
    secagg_stage,
    secure_aggregation_mod,
)
from client.site import SiteSettings, load_site_data
from client.training import (
    AccountantState,
    PrivacyBudgetError,
    plan_for_run,
    resolve_device,
    steps_per_round,
    train_round,
)
from shared_models.config import ConfigError, RunConfig
from shared_models.metrics import ALL_METRIC_NAMES, evaluation_metrics
from shared_models.models import model_for_run, predict_proba
from shared_models.protocol import SITE_REFUSED, UNIT_WEIGHT_KEY
from shared_models.tasks import DataError, SiteData


def _audit_protocol_mod(msg: Message, context: Context, call_next) -> Message:  # type: ignore[no-untyped-def]
    """Flower mod: audit every SecAgg+ protocol message (keys, shares, masked vectors) that the
    hospital receives and sends, with the stage; the handlers audit the rest themselves."""
    stage = secagg_stage(msg)
    target = _audit_target(context) if stage is not None else None
    if target is None:
        return call_next(msg, context)
    audit, run_id, site = target
    audit.message("received", msg, run_id=run_id, site=site, secagg_stage=stage)
    reply = call_next(msg, context)
    decision = "refused" if reply.has_error() else f"secagg {stage}"
    audit.message("sent", reply, run_id=run_id, site=site, secagg_stage=stage, decision=decision)
    return reply


def _secagg_preflight_mod(msg: Message, context: Context, call_next) -> Message:  # type: ignore[no-untyped-def]
    """Flower mod: at the SecAgg+ setup stage, refuse a run this site would refuse to train
    (policy, ledger, data), before taking part in the key exchange; answer protocol parameters
    or clipping norms the inner mods reject with a refusal."""
    if secagg_stage(msg) == "setup":
        try:
            run = RunConfig.from_run_config(context.run_config)
            data = load_site_data(SiteSettings.from_node_config(context.node_config), run)
            ledger, run_key = _ledger(context), _run_key(context, run)
            if ledger is not None:
                ledger.load(run_key)  # an unreadable ledger refuses before any key exchange
            _check_policy(context, run, data, ledger, run_key)
        except _EXPECTED as exc:
            return _refuse(msg, _site_name(context), exc)
    try:
        return call_next(msg, context)
    except SecAggProtocolError as exc:  # protocol parameters or clipping norm rejected
        return _refuse(msg, _site_name(context), exc)


# outermost first: audit the protocol, refuse early, run SecAgg+, clip (client-level DP), handler
app = ClientApp(
    mods=[_audit_protocol_mod, _secagg_preflight_mod, secure_aggregation_mod, client_clipping_mod]
)

_STATE_KEY = "fedcare"
_PLAN_KEY = "fedcare.dp-plans"  # calibrated DP plans of this run, by their inputs
_EXPECTED = (
    DataError, PrivacyBudgetError, ConfigError, LedgerError, PolicyRefusal, PolicyError, ValueError,
    FileNotFoundError,
)  # fmt: skip


def _refuse(msg: Message, site: str, exc: Exception) -> Message:
    return Message(Error(code=SITE_REFUSED, reason=f"site {site} refused: {exc}"), reply_to=msg)


def _setup(msg: Message, context: Context):  # type: ignore[no-untyped-def]
    """-> (run config, site settings, site data, model with the global weights, device)."""
    run = RunConfig.from_run_config(context.run_config)
    site = SiteSettings.from_node_config(context.node_config)
    data = load_site_data(site, run)
    model, _ = model_for_run(run)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return run, site, data, model, resolve_device(site.device)


def _site_name(context: Context) -> str:
    try:
        site = SiteSettings.from_node_config(context.node_config)
        if site.simulated:  # the simulated hospital's name comes with its data (cached)
            return load_site_data(site, RunConfig.from_run_config(context.run_config)).name
        return site.name
    except _EXPECTED:
        return f"node {context.node_id}"


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this hospital's data (audited when the site keeps a ledger)."""
    return _audited(_train, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this hospital's test split (audited likewise)."""
    return _audited(_evaluate, msg, context)


def _audited(handler, msg: Message, context: Context) -> Message:  # type: ignore[no-untyped-def]
    """Run ``handler``; with a ledger folder, log the request and the reply in its audit log."""
    target = _audit_target(context)
    if target is None:
        return handler(msg, context)
    audit, run_id, site = target
    config = msg.content.config_records.get("config")
    server_round = config.get("server-round", 0) if config is not None else 0
    audit.message("received", msg, run_id=run_id, site=site, round=server_round)
    reply = handler(msg, context)
    if reply.has_error():
        decision = "refused"
    elif msg.metadata.message_type.startswith("train"):
        decision = "replayed" if reply.content.config_records["info"].get("replayed") else "trained"
    else:
        decision = "evaluated"
    epsilon = None if reply.has_error() else reply.content.metric_records["metrics"].get("epsilon")
    audit.message(
        "handed to SecAgg+ (masked before sending)" if handing_to_secagg() else "sent",
        reply,
        run_id=run_id,
        site=site,
        round=server_round,
        decision=decision,
        epsilon=epsilon,
    )
    return reply


def _audit_target(context: Context) -> tuple[AuditLog, str, str] | None:
    """(audit log, run id, site name) of a site that keeps a ledger folder, else None (also when
    the node config is unusable: the handler itself then answers with the reason)."""
    try:
        folder = _ledger_dir(context)
    except _EXPECTED:
        return None
    if folder is None:
        return None
    return AuditLog(folder), _audit_run_id(context), _site_name(context)


def _audit_run_id(context: Context) -> str:
    return str(context.run_config.get("run.id", "")) or str(context.run_id)


def _train(msg: Message, context: Context) -> Message:
    """Train the global model on this hospital's data for one round (or re-send the update of
    an identical repeated request, see :class:`client.ledger.ReplayCache`)."""
    try:
        run, _, data, model, device = _setup(msg, context)
        if run.secagg.enabled and not handing_to_secagg():
            raise PolicyRefusal(
                "the run's config requires secure aggregation but this train request came "
                "outside the SecAgg+ protocol: the update is not sent unmasked"
            )
        server_round = int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
        ledger, run_key = _ledger(context), _run_key(context, run)
        arrays = msg.content.array_records["arrays"]
        request = fingerprint(server_round, {k: a.data for k, a in arrays.items()})
        cache = ReplayCache(ledger) if ledger is not None else None
        replay = cache.get(run_key, request) if cache is not None else None
        replayed = replay is not None
        if replay is not None and run.secagg.enabled:
            raise PolicyRefusal(
                f"round {server_round} was already answered in a secure aggregation session; the "
                "same update is not sent into a second one (two sums over different hospitals "
                "would reveal it), so this hospital sits the repeated round out"
            )
        if replay is not None:
            state_dict, metrics = replay
        else:
            state_dict, metrics = _train_locally(
                msg, context, run, data, model, device, ledger, run_key
            )
            if cache is not None:
                cache.put(run_key, request, state_dict, metrics)
    except _EXPECTED as exc:
        return _refuse(msg, _site_name(context), exc)
    except OSError as exc:
        return _refuse(
            msg, _site_name(context), LedgerError(f"cannot write the privacy ledger: {exc}")
        )
    reply = RecordDict(
        {
            "arrays": ArrayRecord(state_dict),
            "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
            "info": ConfigRecord({"site": data.name, "device": device, "replayed": replayed}),
        }
    )
    return Message(content=reply, reply_to=msg)


def _train_locally(
    msg: Message,
    context: Context,
    run: RunConfig,
    data: SiteData,
    model: Any,
    device: str,
    ledger: Ledger | None,
    run_key: str,
) -> tuple[dict[str, Any], dict[str, float]]:
    """One round of (DP) training; the accountant state is recorded before anything is returned."""
    config = msg.content.config_records["config"]
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    state = ledger.load(run_key) if ledger is not None else _load_accountant(context)
    plan = _check_policy(context, run, data, ledger, run_key)  # before any training
    started = time.perf_counter()
    result = train_round(
        model,
        data.train_set(),
        steps=steps_per_round(data.n_train, run.train.batch_size, run.train.local_epochs),
        batch_size=run.train.batch_size,
        lr=run.train.lr,
        momentum=run.train.momentum,
        dp=plan,
        accountant_state=state,
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
        seed=_seed(run.train.seed, data.name, server_round),
        device=device,
    )
    metrics = {
        "num-examples": float(data.n_train),
        "train-loss": result.loss,
        "steps": float(result.steps),
        "compute-seconds": time.perf_counter() - started,
    }
    if run.dp.client_level:  # Flower's client-level accountant needs equal weights
        metrics[UNIT_WEIGHT_KEY] = 1.0
    if plan is not None and result.accountant_state is not None:
        context.state[_STATE_KEY] = ConfigRecord(
            {"accountant": json.dumps(result.accountant_state)}
        )
        if ledger is not None:  # recorded BEFORE the update leaves the hospital
            ledger.save(
                run_key, result.accountant_state, task=run.task.name, delta=plan.target_delta
            )
        metrics["epsilon"] = float(result.epsilon or 0.0)
        metrics["delta"] = plan.target_delta
        metrics["noise-multiplier"] = plan.noise_multiplier
        metrics["sample-rate"] = plan.sample_rate
    return model.state_dict(), metrics


def _check_policy(
    context: Context, run: RunConfig, data: SiteData, ledger: Ledger | None, run_key: str
):  # type: ignore[no-untyped-def]
    """The run's DP plan at this site, after checking it against the site policy (a refusal
    changes nothing in the ledger).

    Raises
    ------
    PolicyRefusal, PolicyError, LedgerError, ConfigError, PrivacyBudgetError
        Expected problems, answered with a refusal.
    """
    plan = None
    if run.dp.sample_level:
        plans = context.state.get(_PLAN_KEY)
        if not isinstance(plans, ConfigRecord):
            plans = context.state[_PLAN_KEY] = ConfigRecord()
        plan = plan_for_run(run, n_train=data.n_train, memo=plans)
    policy = _policy(context)
    if policy is not None:
        others = (
            [e["accountant"] for e in run_entries(ledger) if e["run_id"] != run_key]
            if ledger
            else []
        )
        policy.check_run(
            task=run.task.name, plan=plan, n_train=data.n_train, other_runs=others,
            client_level=run.dp.client_level, secure_aggregation=run.secagg.enabled,
        )  # fmt: skip
    return plan


def _evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this hospital's test split."""
    try:
        run, _, data, model, device = _setup(msg, context)
    except _EXPECTED as exc:
        return _refuse(msg, _site_name(context), exc)
    started = time.perf_counter()
    values, undefined = evaluation_metrics(
        data.y_test, predict_proba(model, data.x_test, device=device)
    )
    metrics = MetricRecord(
        {"num-examples": data.n_test, "compute-seconds": time.perf_counter() - started}
    )
    if run.dp.client_level:  # the strategy's weighting key (FedAvg weighs evaluation likewise)
        metrics[UNIT_WEIGHT_KEY] = 1.0
    for name, value in values.items():
        metrics[name] = math.nan if value is None else value
    info = ConfigRecord({"site": data.name})
    policy = _policy(context)
    if (
        policy is not None and data.n_test < policy.min_cohort
    ):  # no metric from fewer than k patients
        for name in ALL_METRIC_NAMES:
            metrics[name] = math.nan
            info[f"undefined.{name}"] = (
                f"withheld: {data.n_test} test patients < site policy min-cohort"
            )
    for name in ALL_METRIC_NAMES:
        if name in undefined and f"undefined.{name}" not in info:
            info[f"undefined.{name}"] = undefined[name]
    return Message(content=RecordDict({"metrics": metrics, "info": info}), reply_to=msg)


def _policy(context: Context) -> SitePolicy | None:
    """The hospital's site policy: node config ``policy-path`` (deployment) or, in simulation,
    run config ``simulation.policy`` (one policy for every simulated hospital)."""
    path = str(context.node_config.get("policy-path", "")) or str(
        context.run_config.get("simulation.policy", "")
    )
    return SitePolicy.load(Path(path)) if path else None


def _ledger_dir(context: Context) -> Path | None:
    """The hospital's ledger folder: node config ``ledger-dir`` (deployment) or, in simulation,
    ``<simulation.ledger-dir>/<site name>`` (one sub-folder per simulated hospital)."""
    folder = str(context.node_config.get("ledger-dir", ""))
    if folder:
        return Path(folder)
    root = str(context.run_config.get("simulation.ledger-dir", ""))
    if not root:
        return None
    run = RunConfig.from_run_config(context.run_config)
    return Path(root) / load_site_data(SiteSettings.from_node_config(context.node_config), run).name


def _ledger(context: Context) -> Ledger | None:
    """The hospital's on-disk ledger, if it has one."""
    folder = _ledger_dir(context)
    return Ledger(folder) if folder is not None else None


def _run_key(context: Context, run: RunConfig) -> str:
    """The fedcare run id (stable across a coordinator's resume), else Flower's run id."""
    return run.run_id or str(context.run_id)


def _load_accountant(context: Context) -> AccountantState | None:
    record = context.state.get(_STATE_KEY)
    if record is None:
        return None
    return json.loads(str(record["accountant"]))


def _seed(run_seed: int, site: str, server_round: int) -> int:
    """Distinct, reproducible seed per (run seed, site, round)."""
    return (run_seed * 1_000_003 + zlib.crc32(site.encode()) * 101 + server_round) % (2**31)
