"""The hospital's Flower ClientApp: thin handlers over :mod:`client.training` and
:mod:`client.evaluation`, under the hospital's policy and privacy ledger.

Every guarantee here holds against a coordinator that sends any run config, any weights and any
number of messages:

- Train: the request is checked against the hospital policy (a hospital setting, never the run's)
  and the run's recorded plan; the round's DP-SGD steps are added to everything this run already
  released here and refused if that would cross the policy's ε caps at the hospital's δ; DP noise and
  Poisson sampling come from the OS CSPRNG; the accountant state is recorded in the ledger BEFORE
  the reply (``arrays``; ``metrics``: ``num-examples`` = training examples, cumulative
  ``epsilon`` and ``delta``; the train loss only where the policy allows exact metrics).
- Evaluate: exact metrics (AUROC, accuracy, sensitivity, specificity, AUPRC, the operating
  point at sensitivity 0.8) only where the policy allows them; otherwise per-class score
  histograms with Gaussian noise, each release charged to the same accountant.
- Explain (``query.explain``, once per run, after the last round): the global model's
  per-feature attributions on the test split, clipped per patient, summed and noised
  (:mod:`client.explanations`), only where the run asks for it (``explain.enabled``) and the
  policy allows it (``allow-explanations``, ``max-explanation-epsilon``, the ε caps); charged to
  the run's accountant as its own ledger entry before it leaves. An identical repeated request
  gets the same release again; any other second request is refused.
- Refusals name the run-config key and the policy bound that refused, never a number or text
  derived from the data (n, counts, the noise multiplier or ε the data would give, file names,
  exception text): those stay in the hospital's log and audit log. An unexpected exception is
  answered with its category only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import AuditLog
from client.dp_modes import grad_sample_mode_for
from client.evaluation import release_histograms
from client.explanations import release_attributions, release_epsilon, release_saliency
from client.hospital_data import (
    HospitalSettings,
    HospitalSetupError,
    load_hospital_data,
    run_config_of,
    simulation_node,
)
from client.ledger import Ledger, LedgerError, ReplayCache, RunRecord, fingerprint
from client.personal import load_personal, save_personal, train_personal
from client.policy import (
    DEFAULT_POLICY,
    SIMULATION_POLICY,
    HospitalPolicy,
    PolicyError,
    PolicyRefusal,
)
from client.secure_aggregation import (
    SecAggProtocolError,
    client_clipping_mod,
    handing_to_secagg,
    secagg_stage,
    secure_aggregation_mod,
)
from client.secure_dp import check_private_mode
from client.training import (
    DPPlan,
    PrivacyBudgetError,
    empty_accountant_state,
    plan_for_run,
    resolve_device,
    steps_exceeded,
    train_round,
)
from shared_models.config import ConfigError, RunConfig
from shared_models.metrics import ALL_METRIC_NAMES, evaluation_metrics, score_histograms
from shared_models.models import model_for_run, predict_proba
from shared_models.protocol import (
    EXPLAIN_ACTION,
    HOSPITAL_REFUSED,
    PERSONAL_PREFIX,
    UNIT_WEIGHT_KEY,
    refusal_reason,
)
from shared_models.tasks import DataError, HospitalData, get_task

_log = logging.getLogger("fedcare.hospital")

# refusals whose text is built from the run config, the policy's bounds and public values only:
# sent as they are (their ``detail``, if any, with the hospital's numbers, is logged here)
_PUBLIC = (PolicyRefusal, PrivacyBudgetError, ConfigError, SecAggProtocolError)
# refusals whose text may name local paths or data values: the coordinator gets the category
_PRIVATE = {
    DataError: "its data failed validation",
    LedgerError: "its privacy ledger cannot be used",
    PolicyError: "its hospital policy file is unusable",
    HospitalSetupError: "its hospital settings are incomplete",
    OSError: "a local file could not be read or written",
}
_EXPECTED: tuple[type[Exception], ...] = (*_PUBLIC, *_PRIVATE)
_UNEXPECTED = "an unexpected error at the hospital"  # any other exception: its category only


def _audit_protocol_mod(msg: Message, context: Context, call_next) -> Message:  # type: ignore[no-untyped-def]
    """Flower mod: audit every SecAgg+ protocol message (keys, shares, masked vectors) that the
    hospital receives and sends, with the stage; the handlers audit the rest themselves."""
    stage = secagg_stage(msg)
    target = _audit_target(context) if stage is not None else None
    if target is None:
        return call_next(msg, context)
    audit, run_id, hospital = target
    audit.message("received", msg, run_id=run_id, hospital=hospital, secagg_stage=stage)
    reply = call_next(msg, context)
    decision = "refused" if reply.has_error() else f"secagg {stage}"
    audit.message(
        "sent", reply, run_id=run_id, hospital=hospital, secagg_stage=stage, decision=decision
    )
    return reply


def _secagg_preflight_mod(msg: Message, context: Context, call_next) -> Message:  # type: ignore[no-untyped-def]
    """Flower mod: at the SecAgg+ setup stage, refuse a run this hospital would refuse to train
    (policy, ledger, data), before taking part in the key exchange; answer protocol parameters
    or clipping norms the inner mods reject with a refusal."""
    if secagg_stage(msg) == "setup":
        try:
            hospital = _Hospital.of(context)
            hospital.check_policy(hospital.record())
        except _EXPECTED as exc:
            return _refuse(msg, context, exc)
    try:
        return call_next(msg, context)
    except SecAggProtocolError as exc:  # protocol parameters or clipping norm rejected
        return _refuse(msg, context, exc)
    except Exception as exc:  # Flower's mods raise on malformed protocol messages: category only
        _log.exception("unexpected error in the SecAgg+ protocol")
        return _refuse(msg, context, exc)


# outermost first: audit the protocol, refuse early, run SecAgg+, clip (client-level DP), handler
app = ClientApp(
    mods=[_audit_protocol_mod, _secagg_preflight_mod, secure_aggregation_mod, client_clipping_mod]
)

_RECORD_KEY = "fedcare.run"  # this run's RunRecord (Context.state), for hospitals without a ledger
_PLAN_KEY = "fedcare.dp-plans"  # calibrated DP plans of this run, by their inputs


@dataclass(frozen=True)
class _Hospital:
    """What one message needs to know about this hospital and the run (built once per message)."""

    context: Context
    run: RunConfig
    settings: HospitalSettings
    data: HospitalData
    policy: HospitalPolicy
    ledger: Ledger | None

    @classmethod
    def of(cls, context: Context) -> _Hospital:
        """Raises the expected errors (bad run config, node config, data, policy file)."""
        run = run_config_of(context)
        try:  # names the coordinator sent, checked before any data is read
            task = get_task(run.task.name)
            task.resolve_model(run.model.name, task.resolve_preprocessing(run.task.preprocessing))
        except ValueError as exc:  # an unknown task, preprocessing or model: names only
            raise ConfigError(str(exc)) from None
        settings = HospitalSettings.from_node_config(context.node_config)
        data = load_hospital_data(settings, run)
        folder = _ledger_dir(context, settings, data.name)
        return cls(
            context, run, settings, data, _policy(context, settings),
            Ledger(folder) if folder is not None else None,
        )  # fmt: skip

    @property
    def run_key(self) -> str:
        """The fedcare run id (stable across a coordinator's resume), else Flower's run id."""
        return self.run.run_id or str(self.context.run_id)

    @property
    def private_evaluation(self) -> bool:
        """Evaluation leaves this hospital only as noisy counts: the policy forbids exact metrics, or
        the run is an evaluation-only run (which releases nothing else, whatever the policy)."""
        return not self.policy.exact_metrics or self.run.evaluation_only

    def record(self) -> RunRecord:
        """This run's record: from the ledger (or, without one, this node's Context), else new.

        Raises
        ------
        LedgerError
            The ledger file of this run is unreadable.
        """
        found = self.ledger.load(self.run_key) if self.ledger is not None else None
        if found is None and self.ledger is None and _RECORD_KEY in self.context.state:
            found = RunRecord.from_json(str(self.context.state[_RECORD_KEY]["json"]))  # type: ignore[index]
        record = found
        if record is None:
            record = RunRecord(
                run_id=self.run_key,
                task=self.run.task.name,
                delta=self.run.dp.target_delta,
                hospital_delta=self.policy.hospital_delta(self.data.n_train),
                plan=self.plan_signature(),
                accountant=empty_accountant_state(self.run.dp.accountant),
                # an evaluation-only run's release is DP whatever dp.* says: it composes with
                # every other DP run of the hospital (the lifetime cap counts sample-level records)
                sample_level_dp=self.run.dp.sample_level or self.run.evaluation_only,
            )
        record.saw_flower_run(self.context.run_id)  # saved with the next release
        return record

    def save(self, record: RunRecord) -> None:
        """Persist ``record`` (ledger: atomic and durable) BEFORE anything it covers leaves."""
        if self.ledger is not None:
            self.ledger.save(record)
        else:
            self.context.state[_RECORD_KEY] = ConfigRecord({"json": record.to_json()})

    def plan_signature(self) -> dict[str, Any]:
        """The run settings this hospital's privacy depends on; a run id keeps them for its life."""
        run = self.run
        signature = {
            "task": run.task.name, "preprocessing": run.task.preprocessing,
            "model": run.model.name, "rounds": run.train.rounds,
            "local-epochs": run.train.local_epochs, "batch-size": run.train.batch_size,
            "dp.enabled": run.dp.enabled, "dp.level": run.dp.level,
            "dp.target-epsilon": run.dp.target_epsilon, "dp.target-delta": run.dp.target_delta,
            "dp.max-grad-norm": run.dp.max_grad_norm, "dp.accountant": run.dp.accountant,
            "dp.eval-noise-multiplier": run.dp.eval_noise_multiplier,
            "eval.every": run.eval_every, "n-train": self.data.n_train,
            "private-evaluation": self.private_evaluation,
        }  # fmt: skip
        if run.evaluation_only:
            signature["evaluation-only"] = True
        if run.personal.enabled:  # one more evaluation release per evaluation round
            signature["personal.method"] = run.personal.method
        return signature

    def check_policy(self, record: RunRecord) -> DPPlan | None:
        """The run's DP plan here, after checking the run against the hospital policy and the plan
        this run id was first recorded with. A refusal changes nothing in the ledger.

        Raises
        ------
        PolicyRefusal, ConfigError
            Expected problems, answered with a refusal.
        """
        if record.plan is not None and record.plan != self.plan_signature():
            changed = sorted(k for k, v in self.plan_signature().items() if record.plan.get(k) != v)
            raise PolicyRefusal(
                f"run {self.run_key} was recorded here with other settings ({', '.join(changed)} "
                "changed); a changed run needs a new run id, and spends its own budget"
            )
        plan = None
        if self.run.dp.sample_level:
            plans = self.context.state.get(_PLAN_KEY)
            if not isinstance(plans, ConfigRecord):
                plans = self.context.state[_PLAN_KEY] = ConfigRecord()
            try:
                plan = plan_for_run(
                    self.run, n_train=self.data.n_train,
                    private_evaluation=self.private_evaluation, memo=plans,
                )  # fmt: skip
            except ValueError as exc:  # δ >= 1/n, or a budget that cannot be reached
                raise ConfigError(str(exc)) from None
        y = self.data.y_train
        preprocessing = get_task(self.run.task.name).resolve_preprocessing(
            self.run.task.preprocessing
        )
        self.policy.check_run(
            task=self.run.task.name, preprocessing=preprocessing, plan=plan,
            n_train=self.data.n_train,
            class_counts=(int((y == 0).sum()), int((y == 1).sum())),
            client_level=self.run.dp.client_level, secure_aggregation=self.run.secagg.enabled,
        )  # fmt: skip
        if plan is not None:  # a run that could not finish within the lifetime cap never starts
            self.check_release(plan.planned_state(), what="the run")
        return plan

    def check_evaluation_run(self, record: RunRecord) -> None:
        """An evaluation-only run (``eval.model``): the policy allows it
        (``allow-evaluation-runs``, ``allowed-tasks``, the hospital's δ) and the run id was first
        recorded with the same settings. Returns None: such a run has no DP-SGD plan.

        Raises
        ------
        PolicyRefusal
            Named by the policy key, as :meth:`check_policy`.
        """
        if record.plan is not None and record.plan != self.plan_signature():
            raise PolicyRefusal(
                f"run {self.run_key} was recorded here with other settings; a changed run needs "
                "a new run id, and spends its own budget"
            )
        self.policy.check_evaluation_run(
            task=self.run.task.name,
            preprocessing=get_task(self.run.task.name).resolve_preprocessing(
                self.run.task.preprocessing
            ),
            delta=self.run.dp.target_delta,
            n_train=self.data.n_train,
        )

    def check_release(self, state: dict[str, Any], what: str) -> None:
        """Refuse a release that would bring this run's or the hospital's lifetime ε over the caps.

        ``state`` is this run's accountant state with the release added (or its whole plan).
        """
        others = [
            r.accountant
            for r in (self.ledger.records() if self.ledger is not None else [])
            if r.run_id != self.run_key and r.sample_level_dp
        ]
        self.policy.check_release(
            this_run=state, other_runs=others, n_train=self.data.n_train, what=what
        )

    def model(self, msg: Message):  # type: ignore[no-untyped-def]
        """The run's model with the global weights of ``msg``, and the device to use."""
        try:
            model, _ = model_for_run(self.run)
        except ValueError as exc:  # unknown task, preprocessing or a model that does not fit
            raise ConfigError(str(exc)) from None
        weights = msg.content.array_records["arrays"].to_torch_state_dict()
        _check_global_weights(weights)
        try:
            model.load_state_dict(weights)
        except RuntimeError:  # other names or shapes than the run's model
            raise ConfigError(
                f"the global weights do not fit model {self.run.model.name!r} of task "
                f"{self.run.task.name!r} (other parameter names or shapes)"
            ) from None
        try:
            return model, resolve_device(self.settings.device)
        except ValueError as exc:
            raise HospitalSetupError(str(exc)) from None


MAX_GLOBAL_WEIGHT = 1e6  # |w| above this could overflow float32 activations for some patients


def _check_global_weights(weights: Mapping[str, Any]) -> None:
    """Refuse global weights that are not finite or larger than :data:`MAX_GLOBAL_WEIGHT`.

    DP-SGD's guarantee assumes finite per-sample gradients. Weights chosen so that activations
    overflow to inf or NaN only for some patients (say, those with a feature above a threshold)
    would turn the whole update into NaN exactly when such a patient is in the batch: one bit
    about the data outside the noise. The check reads only the coordinator's own weights, so the
    refusal reveals nothing about the data.

    Raises
    ------
    PolicyRefusal
        A non-finite or too large global weight.
    """
    for name, tensor in weights.items():
        if not bool(torch.isfinite(tensor).all()):
            raise PolicyRefusal(f"the global weights {name!r} are not all finite")
        if tensor.numel() and float(tensor.abs().max()) > MAX_GLOBAL_WEIGHT:
            raise PolicyRefusal(
                f"the global weights {name!r} exceed {MAX_GLOBAL_WEIGHT:g} in magnitude (they "
                "could overflow this hospital's computations for some patients only)"
            )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this hospital's data (audited when the hospital keeps a ledger)."""
    return _audited(_train, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this hospital's test split (audited likewise)."""
    return _audited(_evaluate, msg, context)


@app.query(EXPLAIN_ACTION)
def explain(msg: Message, context: Context) -> Message:
    """Release DP feature attributions of the global model (audited likewise)."""
    return _audited(_explain, msg, context)


def _refuse(msg: Message, context: Context, exc: BaseException) -> Message:
    """An error reply naming this hospital and a reason safe to send: the text of a policy, budget
    or config refusal; for anything that may carry local paths or data values, only its
    category. The full text (and a refusal's ``detail``) goes to the hospital's log and audit
    log."""
    if isinstance(exc, _PUBLIC):
        reason, local = str(exc), getattr(exc, "detail", "")
    else:
        category = next((text for kind, text in _PRIVATE.items() if isinstance(exc, kind)), None)
        reason = f"{category or _UNEXPECTED} (the hospital's log has the details)"
        local = str(exc) if category else f"{type(exc).__name__}: {exc}"
    if local:
        _log.warning("refused %s: %s (%s)", msg.metadata.message_type, reason, local)
        target = _audit_target(context)
        if target is not None:
            target[0].write({"direction": "local", "hospital": target[2], "run_id": target[1],
                             "flower_run_id": context.run_id, "detail": local})  # fmt: skip
    return Message(
        Error(code=HOSPITAL_REFUSED, reason=refusal_reason(_hospital_name(context), reason)),
        reply_to=msg,
    )


def _hospital_name(context: Context) -> str:
    try:
        settings = HospitalSettings.from_node_config(context.node_config)
        if settings.simulated:  # the simulated hospital's name comes with its data (cached)
            return load_hospital_data(settings, run_config_of(context)).name
        return settings.name
    except _EXPECTED:
        return f"node {context.node_id}"


def _answered(handler, msg: Message, context: Context) -> Message:  # type: ignore[no-untyped-def]
    """``handler``'s reply; an exception it did not expect (a bug, an input no check foresaw)
    becomes a refusal with its category only (Flower would send its text), logged here."""
    try:
        return handler(msg, context)
    except Exception as exc:
        _log.exception("unexpected error answering %s", msg.metadata.message_type)
        return _refuse(msg, context, exc)


def _audited(handler, msg: Message, context: Context) -> Message:  # type: ignore[no-untyped-def]
    """Run ``handler``; with a ledger folder, log the request and the reply in its audit log."""
    try:
        _register_simulation_task(context)  # before anything reads the hospital's data
    except ConfigError as exc:
        return _refuse(msg, context, exc)
    target = _audit_target(context)
    if target is None:
        return _answered(handler, msg, context)
    audit, run_id, hospital = target
    config = msg.content.config_records.get("config")
    server_round = config.get("server-round", 0) if config is not None else 0
    audit.message("received", msg, run_id=run_id, hospital=hospital, round=server_round)
    reply = _answered(handler, msg, context)
    if reply.has_error():
        decision = "refused"
    elif msg.metadata.message_type.startswith("train"):
        decision = "replayed" if reply.content.config_records["info"].get("replayed") else "trained"
    elif msg.metadata.message_type.startswith("query"):
        decision = "explained"
    else:
        decision = "evaluated"
    epsilon = None if reply.has_error() else reply.content.metric_records["metrics"].get("epsilon")
    audit.message(
        "handed to SecAgg+ (masked before sending)" if handing_to_secagg() else "sent",
        reply,
        run_id=run_id,
        hospital=hospital,
        round=server_round,
        decision=decision,
        epsilon=epsilon,
    )
    return reply


def _audit_target(context: Context) -> tuple[AuditLog, str, str] | None:
    """(audit log, run id, hospital name) of a hospital that keeps a ledger folder, else None (also when
    the node config is unusable: the handler itself then answers with the reason)."""
    try:
        settings = HospitalSettings.from_node_config(context.node_config)
        name = _hospital_name(context)
        folder = _ledger_dir(context, settings, name)
    except _EXPECTED:
        return None
    if folder is None:
        return None
    run_id = str(context.run_config.get("run.id", "")) or str(context.run_id)
    return AuditLog(folder), run_id, name


def _round(msg: Message) -> int:
    return int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]


def _train(msg: Message, context: Context) -> Message:
    """Train the global model on this hospital's data for one round (or re-send the update of
    an identical repeated request, see :class:`client.ledger.ReplayCache`)."""
    try:
        hospital = _Hospital.of(context)
        if hospital.run.evaluation_only:
            raise PolicyRefusal(
                "this is an evaluation-only run (eval.model): a hospital trains nothing in it and "
                "sends no model update"
            )
        if hospital.run.secagg.enabled and not handing_to_secagg():
            raise PolicyRefusal(
                "the run's config requires secure aggregation but this train request came "
                "outside the SecAgg+ protocol: the update is not sent unmasked"
            )
        model, device = hospital.model(msg)
        arrays = msg.content.array_records["arrays"]
        request = fingerprint("train", _round(msg), {k: a.data for k, a in arrays.items()})
        cache = ReplayCache(hospital.ledger, "train") if hospital.ledger is not None else None
        replay = cache.get(hospital.run_key, request) if cache is not None else None
        if replay is not None and hospital.run.secagg.enabled:
            raise PolicyRefusal(
                f"round {_round(msg)} was already answered in a secure aggregation session; "
                "the same update is not sent into a second one (two sums over different "
                "hospitals would reveal it), so this hospital sits the repeated round out"
            )
        if replay is not None:
            state_dict, metrics = replay
        else:
            state_dict, metrics = _train_locally(msg, hospital, model, device)
            if cache is not None:
                cache.put(hospital.run_key, request, state_dict, metrics)
            if hospital.run.personal.method == "ditto":  # after the update is recorded; stays here
                _ditto_step(msg, hospital, device)
    except _EXPECTED as exc:
        return _refuse(msg, context, exc)
    info = {"hospital": hospital.data.name, "device": device, "replayed": replay is not None}
    if hospital.settings.simulated and (node := simulation_node()) is not None:
        info["ray-node"] = node  # which node of a Ray cluster hosted this simulated hospital
    reply = RecordDict(
        {
            "arrays": ArrayRecord(state_dict),
            "metrics": MetricRecord(metrics),  # type: ignore[arg-type]
            "info": ConfigRecord(info),  # type: ignore[arg-type]
        }
    )
    return Message(content=reply, reply_to=msg)


def _train_locally(
    msg: Message, hospital: _Hospital, model: Any, device: str
) -> tuple[dict[str, Any], dict[str, float]]:
    """One round of (DP) training; the release is recorded before anything is returned."""
    run, data = hospital.run, hospital.data
    record = hospital.record()
    plan = hospital.check_policy(record)  # before any training
    steps = plan.steps_per_round if plan is not None else _steps(data.n_train, run)
    if plan is not None:
        if record.train_steps + steps > plan.total_steps:
            raise steps_exceeded(record.train_steps, steps, plan.total_steps)
        hospital.check_release(
            _with(record.accountant, plan.noise_multiplier, plan.sample_rate, steps),
            what=f"round {_round(msg)}'s DP-SGD steps",
        )
    mode = grad_sample_mode_for(model, run.dp.grad_sample_mode)
    if plan is not None:
        try:
            check_private_mode(mode)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    started = time.perf_counter()
    result = train_round(
        model,
        data.train_set(),
        steps=steps,
        batch_size=run.train.batch_size,
        lr=run.train.lr,
        momentum=run.train.momentum,
        dp=plan,
        accountant_state=record.accountant if plan is not None else None,
        steps_taken=record.train_steps,
        proximal_mu=float(msg.content.config_records["config"].get("proximal-mu", 0.0)),  # type: ignore[arg-type]
        seed=run.train.seed * 100_003 + _round(msg),  # batch order of NON-private runs only
        device=device,
        grad_sample_mode=mode,
    )
    record.updates += 1
    if plan is not None and result.accountant_state is not None:
        record.accountant, record.train_steps = result.accountant_state, record.train_steps + steps
    hospital.save(record)  # recorded BEFORE the update leaves the hospital
    metrics = {
        "num-examples": float(data.n_train),
        "steps": float(steps),
        "compute-seconds": time.perf_counter() - started,
    }
    if (
        hospital.policy.exact_metrics
    ):  # an exact function of the data: only where the hospital allows
        metrics["train-loss"] = result.loss
    if run.dp.client_level:  # Flower's client-level accountant needs equal weights
        metrics[UNIT_WEIGHT_KEY] = 1.0
    if plan is not None:
        metrics["epsilon"] = record.epsilon()
        metrics["delta"] = plan.target_delta
        metrics["noise-multiplier"] = plan.noise_multiplier
        metrics["sample-rate"] = plan.sample_rate
    return model.state_dict(), metrics


def _ditto_step(msg: Message, hospital: _Hospital, device: str) -> None:
    """Ditto: this hospital's personal model (from its state folder; the global model the first
    time) trained one round towards the round's global weights, and stored again. Nothing of it
    is returned (see :mod:`client.personal`)."""
    personal, _ = hospital.model(msg)
    anchor = {k: v.detach().clone() for k, v in personal.state_dict().items()}
    load_personal(personal, hospital.ledger, hospital.context, hospital.run_key)
    train_personal(
        personal, hospital.data.train_set(), hospital.data.n_train, config=hospital.run.personal,
        global_weights=anchor, seed=hospital.run.train.seed * 100_003 + _round(msg), device=device,
    )  # fmt: skip
    save_personal(personal, hospital.ledger, hospital.context, hospital.run_key)


def _personal_scores(msg: Message, hospital: _Hospital, device: str) -> np.ndarray:
    """Test-split scores ``[n_test]`` of this hospital's personal model: ``finetune`` (or a Ditto
    hospital that has none yet) fine-tunes the message's global model here first and stores it."""
    personal, _ = hospital.model(msg)
    method = hospital.run.personal.method
    if method == "finetune" or not load_personal(
        personal, hospital.ledger, hospital.context, hospital.run_key
    ):
        train_personal(
            personal, hospital.data.train_set(), hospital.data.n_train, config=hospital.run.personal,
            global_weights=None, seed=hospital.run.train.seed * 100_003 + _round(msg), device=device,
        )  # fmt: skip
        save_personal(personal, hospital.ledger, hospital.context, hospital.run_key)
    return predict_proba(personal, hospital.data.x_test, device=device)


def _steps(n_train: int, run: RunConfig) -> int:
    from client.training import steps_per_round

    return steps_per_round(n_train, run.train.batch_size, run.train.local_epochs)


def _with(state: Mapping[str, Any], sigma: float, q: float, steps: int) -> dict[str, Any]:
    """``state`` with ``steps`` more releases of (sigma, q) (not recorded: for the cap checks)."""
    return {"mechanism": state["mechanism"], "history": [*state["history"], [sigma, q, steps]]}


def _evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this hospital's test split: exact metrics where the policy
    allows them, else a noisy, accounted release of per-class score histograms."""
    try:
        hospital = _Hospital.of(context)
        model, device = hospital.model(msg)
        started = time.perf_counter()
        plan = None  # an evaluation-only run has no training plan: its one release is checked
        if hospital.run.evaluation_only:
            hospital.check_evaluation_run(hospital.record())
        else:
            plan = hospital.check_policy(hospital.record())
        scores = predict_proba(model, hospital.data.x_test, device=device)
        personal = (  # trained only once the request is known not to be a replay
            (lambda: _personal_scores(msg, hospital, device))
            if hospital.run.personal.enabled and not hospital.run.evaluation_only
            else None
        )
        if hospital.private_evaluation:
            metrics = _release_privately(msg, hospital, plan, scores, personal)
            info = ConfigRecord({"hospital": hospital.data.name})
        else:
            metrics, info = _exact_metrics(hospital, scores)
            if personal is not None:
                extra, extra_info = _exact_metrics(hospital, personal())
                metrics.update({f"{PERSONAL_PREFIX}{k}": v for k, v in extra.items()})
                for key, why in extra_info.items():
                    if key.startswith("undefined."):
                        info[f"undefined.{PERSONAL_PREFIX}{key.removeprefix('undefined.')}"] = why
    except _EXPECTED as exc:
        return _refuse(msg, context, exc)
    metrics["num-examples"] = float(hospital.data.n_test)
    metrics["compute-seconds"] = time.perf_counter() - started
    if (
        hospital.run.dp.client_level
    ):  # the strategy's weighting key (FedAvg weighs evaluation likewise)
        metrics[UNIT_WEIGHT_KEY] = 1.0
    return Message(
        content=RecordDict({"metrics": MetricRecord(metrics), "info": info}),  # type: ignore[arg-type]
        reply_to=msg,
    )


def _exact_metrics(hospital: _Hospital, scores: np.ndarray) -> tuple[dict[str, Any], ConfigRecord]:
    """Exact test metrics and per-class score histograms (hospitals whose policy allows them),
    withheld below ``min-cohort`` patients of either class."""
    values, undefined = evaluation_metrics(hospital.data.y_test, scores)
    metrics: dict[str, Any] = {
        name: math.nan if value is None else value for name, value in values.items()
    }
    info = ConfigRecord({"hospital": hospital.data.name})
    y = hospital.data.y_test
    if min(int((y == 0).sum()), int((y == 1).sum())) < hospital.policy.min_cohort:
        for name in ALL_METRIC_NAMES:
            metrics[name] = math.nan
            info[f"undefined.{name}"] = "withheld: a test class has fewer patients than min-cohort"
    else:  # the exact counts too, so the coordinator can pool them across hospitals
        negatives, positives = score_histograms(y, scores, bins=hospital.run.eval_histogram_bins)
        metrics["hist-neg"], metrics["hist-pos"] = negatives.tolist(), positives.tolist()
    for name in ALL_METRIC_NAMES:
        if name in undefined and f"undefined.{name}" not in info:
            info[f"undefined.{name}"] = undefined[name]
    return metrics, info


def _release_privately(
    msg: Message,
    hospital: _Hospital,
    plan: DPPlan | None,
    scores: np.ndarray,
    personal: Callable[[], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Per-class score histograms with Gaussian noise, charged to the run's accountant and
    recorded before they leave; an identical repeated request gets the same release again.
    With ``personal`` (computes the personal model's scores; not called for a replay), a second
    release of its histograms, charged as one more Gaussian release."""
    arrays = msg.content.array_records["arrays"]
    request = fingerprint("evaluate", _round(msg), {k: a.data for k, a in arrays.items()})
    cache = ReplayCache(hospital.ledger, "evaluate") if hospital.ledger is not None else None
    replay = cache.get(hospital.run_key, request) if cache is not None else None
    if replay is not None:
        return replay[1]
    record = hospital.record()
    sigma = hospital.run.dp.eval_noise_multiplier
    if sigma < hospital.policy.min_eval_noise_multiplier:
        raise PolicyRefusal(
            f"evaluation noise multiplier {sigma:g} is below the policy's minimum "
            f"{hospital.policy.min_eval_noise_multiplier:g} (dp.eval-noise-multiplier)"
        )
    evaluation_only = (
        hospital.run.evaluation_only
    )  # one release, whatever train.* and eval.every say
    count = 1 if personal is None else 2
    if evaluation_only:
        allowed = 1
    else:
        allowed = (
            plan.eval_releases
            if plan is not None
            else hospital.run.evaluation_rounds_count * hospital.run.releases_per_evaluation
        )
    if record.eval_releases + count > allowed:
        raise PrivacyBudgetError(
            f"this run already received its {allowed} planned evaluation release(s) from this "
            "hospital (eval.every, personal.method; an evaluation-only run has one); each further one "
            "would spend privacy budget"
        )
    if plan is not None or evaluation_only:
        hospital.check_release(
            _with(record.accountant, sigma, 1.0, count), what=f"round {_round(msg)}'s evaluation"
        )
    bins = hospital.run.eval_histogram_bins
    negatives, positives = release_histograms(
        hospital.data.y_test, scores, noise_multiplier=sigma, bins=bins
    )
    metrics: dict[str, Any] = {
        "hist-neg": negatives,
        "hist-pos": positives,
        "eval-noise-multiplier": sigma,
    }
    if personal is not None:
        p_neg, p_pos = release_histograms(
            hospital.data.y_test, personal(), noise_multiplier=sigma, bins=bins
        )
        metrics[f"{PERSONAL_PREFIX}hist-neg"], metrics[f"{PERSONAL_PREFIX}hist-pos"] = p_neg, p_pos
    record.accountant = _with(record.accountant, sigma, 1.0, count)
    record.eval_releases += count
    hospital.save(record)  # recorded BEFORE the counts leave the hospital
    if plan is not None or evaluation_only:
        metrics["epsilon"] = record.epsilon()
        metrics["delta"] = hospital.run.dp.target_delta
    if cache is not None:
        cache.put(hospital.run_key, request, {}, metrics)
    return metrics


def _explain(msg: Message, context: Context) -> Message:
    """Release the noisy sums of clipped per-feature attributions of the global model on this
    hospital's test split (:mod:`client.explanations`), once per run; an identical repeated
    request is answered with the same release again."""
    try:
        hospital = _Hospital.of(context)
        if not hospital.run.explain.enabled:
            raise ConfigError("the run's config does not ask for explanations (explain.enabled)")
        task = get_task(hospital.run.task.name)
        if task.attribution_axis is None and not task.saliency_grid:
            raise ConfigError(f"task {hospital.run.task.name!r} has no explanation release")
        model, device = hospital.model(msg)
        arrays = msg.content.array_records["arrays"]
        request = fingerprint("explain", _round(msg), {k: a.data for k, a in arrays.items()})
        cache = ReplayCache(hospital.ledger, "explain") if hospital.ledger is not None else None
        replay = cache.get(hospital.run_key, request) if cache is not None else None
        metrics = replay[1] if replay is not None else _release_explanation(hospital, model, device)
        if cache is not None and replay is None:
            cache.put(hospital.run_key, request, {}, metrics)
    except _EXPECTED as exc:
        return _refuse(msg, context, exc)
    metrics["num-examples"] = float(hospital.data.n_test)
    info = ConfigRecord({"hospital": hospital.data.name, "replayed": replay is not None})
    return Message(
        content=RecordDict({"metrics": MetricRecord(metrics), "info": info}),  # type: ignore[arg-type]
        reply_to=msg,
    )


def _release_explanation(hospital: _Hospital, model: Any, device: str) -> dict[str, Any]:
    """Check the release against the policy and the ledger, compute it, record it, return it."""
    ex = hospital.run.explain
    record = hospital.record()
    plan = hospital.check_policy(record)
    if record.explanations:
        raise PrivacyBudgetError(
            "this run already received its explanation release from this hospital; a second one "
            "would spend privacy budget again (one release per run, explain.enabled)"
        )
    hospital.policy.check_explanation(
        noise_multiplier=ex.noise_multiplier, n_train=hospital.data.n_train
    )
    charged = _with(record.accountant, ex.noise_multiplier, 1.0, 1)
    hospital.check_release(charged, what="the explanation release")  # also in runs without DP-SGD
    released = _explanation_sums(hospital, model, device)
    record.accountant = charged
    record.explanations.append(ex.noise_multiplier)
    hospital.save(record)  # recorded BEFORE the sums leave the hospital
    metrics: dict[str, Any] = {
        **released,
        "explain-noise-multiplier": ex.noise_multiplier,
        "explain-clip": ex.clip,
        # ε of this release alone at the run's δ (the policy's cap is checked at the hospital's)
        "explain-epsilon": release_epsilon(ex.noise_multiplier, delta=hospital.run.dp.target_delta),
    }
    if plan is not None:
        metrics["epsilon"] = record.epsilon()
        metrics["delta"] = plan.target_delta
    return metrics


def _explanation_sums(hospital: _Hospital, model: Any, device: str) -> dict[str, Any]:
    """The noisy sums: per feature (``attr-sum``, ``attr-abs-sum``), or for an image task per
    class (``saliency-c``, ``image-c``, ``count-c``: :func:`client.explanations.release_saliency`)."""
    from shared_models.attributions import feature_attributions, spatial_saliency

    ex, x = hospital.run.explain, hospital.data.x_test
    task = get_task(hospital.run.task.name)
    try:
        if task.attribution_axis is None:
            saliency, images = spatial_saliency(
                model, x, grid=task.saliency_grid, method=ex.method, steps=ex.ig_steps,
                device=device,
            )  # fmt: skip
            image_clip = float(images.shape[1])  # pixels in [-1, 1]: no image is clipped
            released: dict[str, Any] = release_saliency(
                saliency, images, hospital.data.y_test, clip=ex.clip, image_clip=image_clip,
                noise_multiplier=ex.noise_multiplier,
            )  # fmt: skip
            return {**released, "explain-image-clip": image_clip}
        per_example = feature_attributions(
            model, x, axis=task.attribution_axis, method=ex.method, steps=ex.ig_steps,
            device=device,
        )  # fmt: skip
    except ValueError as exc:  # explain.method 'exact' for a model that is not linear
        raise ConfigError(str(exc)) from None
    signed, absolute = release_attributions(
        per_example, clip=ex.clip, noise_multiplier=ex.noise_multiplier
    )
    return {"attr-sum": signed, "attr-abs-sum": absolute}


def _policy(context: Context, settings: HospitalSettings) -> HospitalPolicy:
    """The hospital's policy. Deployed: node config ``policy-path``, else
    :data:`~client.policy.DEFAULT_POLICY`. Simulated hospitals only (the researcher holds all
    the data): run config ``simulation.policy``, else :data:`~client.policy.SIMULATION_POLICY`.

    Raises
    ------
    PolicyError
        The policy file is missing or invalid.
    """
    path = str(context.node_config.get("policy-path", ""))
    if path:
        return HospitalPolicy.load(Path(path))
    if not settings.simulated:  # no run-config key reaches a file at a deployed hospital
        return DEFAULT_POLICY
    sim_path = str(context.run_config.get("simulation.policy", ""))
    return HospitalPolicy.load(Path(sim_path)) if sim_path else SIMULATION_POLICY


def _register_simulation_task(context: Context) -> None:
    """Simulated hospitals only: register the task file text of run config
    ``simulation.task-file`` (``fedcare simulate --task PATH``; see
    :func:`shared_models.tasks.register_task_text`). A deployed hospital's tasks are the task
    files of the bundle it approved: no run-config key adds one there.

    Raises
    ------
    ConfigError
        The text is not a valid task file.
    """
    text = str(context.run_config.get("simulation.task-file", ""))
    if not text:
        return
    try:
        if not HospitalSettings.from_node_config(context.node_config).simulated:
            return  # a deployed hospital: never
    except HospitalSetupError:
        return  # the handler refuses the node config itself
    from shared_models.tasks import TaskFileError, register_task_text

    try:
        register_task_text(text, source="the simulation's task file")
    except TaskFileError as exc:
        raise ConfigError(str(exc)) from None


def _ledger_dir(context: Context, settings: HospitalSettings, name: str) -> Path | None:
    """The hospital's ledger folder: node config ``ledger-dir``; for simulated hospitals only,
    ``<simulation.ledger-dir>/<hospital name>`` (one sub-folder per simulated hospital)."""
    folder = str(context.node_config.get("ledger-dir", ""))
    if folder:
        return Path(folder)
    root = str(context.run_config.get("simulation.ledger-dir", ""))
    if not root or not settings.simulated:
        return None
    return Path(root) / name


__all__ = ["EXPLAIN_ACTION", "HOSPITAL_REFUSED", "app"]
