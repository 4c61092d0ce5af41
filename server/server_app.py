"""The coordinator's Flower ServerApp: one ``@app.main()`` over a Flower strategy.

Per round: the strategy (chosen by name from ``flwr.serverapp.strategy``) samples hospitals,
aggregates, and runs federated evaluation; :class:`~server.history.RecordingGrid` records each
hospital's reply; ``evaluate_fn`` (Flower's documented per-round hook) checkpoints the global
model with a JSON sidecar and, in simulation, evaluates it on the pooled test splits. At the end:
final model, model card, summary.json, metrics.csv, report.md, curves.png. At the start, the
Flower run id is added to the run folder's ``flower-runs.json`` (a resumed run keeps its fedcare
run id under a new Flower run id); ``summary.json`` carries both (``run_id``,
``flower_run_ids``), as every hospital's ledger entry and audit line does.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from datetime import datetime
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log as flwr_log

from server.checkpoint import (
    latest_checkpoint,
    load_weights,
    package_versions,
    record_flower_run,
    save_weights,
    write_json_atomic,
)
from server.history import HospitalEvent, RecordingGrid, RunHistory, read_history
from server.model_card import write_model_card
from server.report import build_summary, write_reports
from server.secure_aggregation import run_secaggplus_round
from server.strategies import (
    ScheduledStrategy,
    build_strategy,
    calibrate_client_noise,
    load_strategy_state,
    privacy_spent,
    strategy_state,
    with_client_dp,
)
from shared_models.config import ConfigError, RunConfig
from shared_models.hospitals import simulated_hospitals_for
from shared_models.metrics import evaluation_metrics
from shared_models.models import model_for_run, predict_proba
from shared_models.protocol import UNIT_WEIGHT_KEY

app = ServerApp()
progress_log = logging.getLogger("fedcare.progress")
# Opacus configures the root logger when it is imported (opacus/utils/module_utils.py calls
# logging.basicConfig), so each line of Flower's logger, which has a handler of its own, reached
# the run's log stream twice and `fedcare server run` printed every round twice
logging.getLogger("flwr").propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation for ``train.rounds`` rounds (or the rest of a resumed run) and write the
    run folder."""
    run = RunConfig.from_run_config(context.run_config)
    if run.evaluation_only:
        _evaluation_run(grid, context, run)
        return
    out = Path(
        run.resume_from or run.output_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    model, model_info = model_for_run(run)
    history, done = RunHistory(), 0
    initial = ArrayRecord(model.state_dict())
    if run.resume_from:
        done, weights, sidecar = latest_checkpoint(out)
        history = read_history(out, sidecar).up_to(done)
    run_id = run.run_id or str(context.run_id)  # what hospitals key their ledgers on
    flower_run_ids = record_flower_run(
        out, run_id=run_id, flower_run_id=context.run_id, after_round=done
    )
    flwr_log(INFO, "[fedcare] run %s: Flower run id(s) %s", run_id, flower_run_ids)
    strategy = _strategy(run, grid, releases_done=_releases_before(history))
    if (
        run.resume_from
    ):  # continue from the last checkpoint: weights, rounds, strategy state, history
        initial = ArrayRecord(load_weights(weights))  # byte-identical to what hospitals were sent
        state_file = weights.with_name(weights.stem + ".strategy.safetensors")
        if state_file.exists():
            load_strategy_state(
                strategy, {k: v.numpy() for k, v in load_weights(state_file).items()}
            )
        flwr_log(INFO, "[fedcare] resuming %s after round %d of %d", out, done, run.train.rounds)
    strategy = ScheduledStrategy(strategy, offset=done, evaluates=run.evaluates_in_round)
    if run.simulated_hospitals:  # the engine registers hospitals while this thread starts
        _wait_for_hospitals(grid, run.simulated_hospitals)
    pooled = _pooled_test_set(run, grid) if run.centralized_eval else None
    t_start = time.monotonic()

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if local_round == 0:
            return None
        server_round = local_round + done
        state = arrays.to_torch_state_dict()
        metrics = None
        if pooled is not None:
            model.load_state_dict(state)
            metrics, _ = evaluation_metrics(pooled[1], predict_proba(model, pooled[0]))
            history.centralized[server_round] = metrics
        spent = privacy_spent(strategy)
        if spent is not None:  # client-level DP: the coordinator's accountant
            history.central_privacy[server_round] = {
                "epsilon": spent[0], "delta": spent[1], "releases": spent[2],
            }  # fmt: skip
        path = out / "checkpoints" / f"round-{server_round:03d}.safetensors"
        extra = strategy_state(strategy)
        if extra:  # written before the weights: a checkpoint is complete once its sidecar exists
            save_weights(path.with_name(path.stem + ".strategy.safetensors"),
                         {k: torch.from_numpy(v) for k, v in extra.items()}, {"round": server_round})  # fmt: skip
        # history first: a complete checkpoint's round is in history.json (resume reads it)
        write_json_atomic(out / "history.json", history.to_dict())
        sidecar = _sidecar(run, history, server_round, context)
        sidecar["elapsed_seconds"] = time.monotonic() - t_start  # since this (resumed) run began
        save_weights(path, state, sidecar)
        _report_progress(run, history, server_round, time.monotonic() - t_start)
        if metrics is None:
            return None
        return MetricRecord({k: math.nan if v is None else v for k, v in metrics.items()})

    secure_aggregation = None
    if run.secagg.enabled:

        def secure_aggregation(inner, sent, exchange, timeout):  # type: ignore[no-untyped-def]
            return run_secaggplus_round(
                inner, sent, run.secagg, exchange=exchange, timeout=timeout, context=context,
                unit_weights=run.dp.client_level,
            )  # fmt: skip

    result = strategy.start(
        grid=RecordingGrid(
            grid,
            history,
            poll_interval=run.train.poll_interval,
            secure_aggregation=secure_aggregation,
        ),  # fmt: skip
        initial_arrays=initial,
        num_rounds=run.train.rounds - done,
        timeout=run.train.round_timeout,
        train_config=ConfigRecord({"local-epochs": run.train.local_epochs}),
        evaluate_fn=evaluate_fn,
    )
    final = result.arrays.to_torch_state_dict() if result.arrays is not None else model.state_dict()
    explanations = (
        _request_explanations(grid, ArrayRecord(final), run) if run.explain.enabled else None
    )
    summary = {  # the run ids first: they join this run folder to the hospitals' ledgers
        "run_id": run_id,
        "flower_run_ids": flower_run_ids,
        **build_summary(run, history, wall_seconds=time.monotonic() - t_start),
    }
    if explanations is not None:
        summary["explanations"] = explanations
        if run.dp.sample_level and explanations["hospitals"]:
            summary["dp"]["guarantee"] += (
                "; the ε of each hospital that released explanations includes that release "
                "(its own ledger entry)"
            )
        for h in summary["hospitals"]:  # the run's ε at each hospital now includes the release
            released = next(
                (r for r in explanations["hospitals"] if r["hospital"] == h["name"]), None
            )
            if released is not None and released.get("epsilon") is not None:
                h["epsilon"] = released["epsilon"]
    card = _model_card(run, summary, model_info)
    card["training_data"] = released_training_data(history)
    save_weights(out / "model.safetensors", final, card)
    write_json_atomic(out / "history.json", history.to_dict())
    write_reports(out, run, history, summary)
    write_model_card(out)  # model.md next to model.safetensors + model.json


def _request_explanations(grid: Grid, arrays: ArrayRecord, run: RunConfig) -> dict:
    """After the last round: ask every connected hospital once for its DP explanation release
    of the final model (message ``query.explain``) and pool the replies
    (:func:`server.explanations.aggregate_explanations`); a hospital that refuses is named."""
    from flwr.app import Message, MessageType, RecordDict

    from server.explanations import aggregate_explanations, aggregate_saliency
    from shared_models.protocol import EXPLAIN_ACTION, parse_refusal
    from shared_models.tasks import get_task

    task = get_task(run.task.name)
    features = (
        []
        if task.attribution_axis is None
        else list(task.explained_features(run.task.preprocessing))
    )
    config = ConfigRecord({"server-round": run.train.rounds})
    messages = [
        Message(
            content=RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=node,
            message_type=f"{MessageType.QUERY}.{EXPLAIN_ACTION}",
        )
        for node in grid.get_node_ids()
    ]
    releases: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    for reply in grid.send_and_receive(messages, timeout=run.train.round_timeout):
        if reply.has_error():
            text = str(reply.error.reason)
            hospital, reason = parse_refusal(text) or (f"node {reply.metadata.src_node_id}", text)
            refused.append({"hospital": hospital, "reason": reason})
            continue
        m = reply.content.metric_records["metrics"]
        sums = {k: list(v) for k, v in m.items() if isinstance(v, list)}  # type: ignore[arg-type]
        if "attr-sum" in sums:
            sums["signed"], sums["absolute"] = sums.pop("attr-sum"), sums.pop("attr-abs-sum")
        releases.append({
            "hospital": str(reply.content.config_records["info"]["hospital"]),
            "n": int(m["num-examples"]),  # type: ignore[arg-type]
            **sums,
            "image_clip": float(m.get("explain-image-clip", 0.0)),  # type: ignore[arg-type]
            "noise_multiplier": float(m["explain-noise-multiplier"]),  # type: ignore[arg-type]
            "clip": float(m["explain-clip"]),  # type: ignore[arg-type]
            "epsilon_release": float(m["explain-epsilon"]),  # type: ignore[arg-type]
            "epsilon": float(m["epsilon"]) if "epsilon" in m else None,  # type: ignore[arg-type]
        })  # fmt: skip
    releases.sort(key=lambda r: str(r["hospital"]))
    flwr_log(INFO, "[fedcare] explanations: %d released, %d refused", len(releases), len(refused))
    if task.attribution_axis is None:
        return aggregate_saliency(releases, refused)
    return aggregate_explanations(releases, refused, features)


def _evaluation_run(grid: Grid, context: Context, run: RunConfig) -> None:
    """An evaluation-only run (``eval.model``, `fedcare server evaluate`): one ``evaluate``
    message with the saved model to every connected hospital (or those ``eval.hospitals``
    names), nothing trained; the replies (noisy histograms or refusals) become the report of
    :mod:`server.federated_evaluation` in ``output.dir``.

    Raises
    ------
    ConfigError
        The model file is unreadable or does not fit the run's task and model.
    """
    from server.federated_evaluation import write_evaluation

    model, _ = model_for_run(run)
    try:
        model.load_state_dict(load_weights(Path(run.eval_model)))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"eval.model {run.eval_model}: not a model of this run ({exc})") from None
    run_id = run.run_id or str(context.run_id)
    history = RunHistory()
    recording = RecordingGrid(grid, history, poll_interval=run.train.poll_interval)
    nodes = list(recording.get_node_ids())
    wanted = [n.strip() for n in run.eval_hospitals.split(",") if n.strip()]
    if wanted:
        names = {int(info.node_id): str(info.name) for info in grid.get_nodes()}
        nodes = [n for n in nodes if names.get(n) in wanted]
        for name in sorted(set(wanted) - {names.get(n) for n in nodes}):
            history.events.append(
                HospitalEvent(
                    round=1,
                    kind="evaluate",
                    node_id=-1,
                    hospital=name,
                    cause="offline",
                    error="offline: not connected when the evaluation started, so not asked",
                )  # fmt: skip
            )
    flwr_log(INFO, "[fedcare] evaluation-only run %s: asking %d hospital(s)", run_id, len(nodes))
    arrays = ArrayRecord(model.state_dict())
    messages = [
        Message(
            content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )  # fmt: skip
        for node in nodes
    ]
    recording.send_and_receive(messages, timeout=run.train.round_timeout)
    out = Path(run.output_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    write_evaluation(out, run, history, run_id=run_id, flower_run_id=context.run_id)
    flwr_log(INFO, "[fedcare] evaluation report written to %s", out / "report.md")


def _wait_for_hospitals(grid: Grid, count: int, timeout: float = 120.0) -> None:
    """Simulation: wait until all ``count`` simulated hospitals are registered, so that round 1
    samples from all of them (Flower's strategies size their sample from the nodes connected at
    that moment). After ``timeout`` seconds the run goes on with those present."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def _releases_before(history: RunHistory) -> int:
    """Client-level DP releases a resumed run already made: those the history recorded up to its
    last checkpoint, plus one, since the coordinator may have sent the next round's noisy
    model to the hospitals for evaluation before it stopped (never undercounting: ε may be
    overstated by one release). 0 for a fresh run (empty history)."""
    central = history.central_privacy
    if not central:
        return 0
    return int(central[max(central)]["releases"]) + 1


def _strategy(run: RunConfig, grid: Grid, *, releases_done: int):  # type: ignore[no-untyped-def]
    """The run's Flower strategy; under client-level DP wrapped in Flower's
    ``DifferentialPrivacyClientSideFixedClipping`` with its accountant."""
    if not run.dp.client_level:
        return build_strategy(run.strategy)
    hospitals = run.simulated_hospitals or len(list(grid.get_node_ids()))
    if hospitals < 2:
        raise ConfigError(
            f"dp.level = 'client': {hospitals} hospital(s) connected; client-level DP needs every "
            "hospital of the consortium connected when the run starts (the noise is scaled to "
            "their number), and at least 2"
        )
    sigma = run.dp.client_noise_multiplier or calibrate_client_noise(
        run.dp.target_epsilon, run.dp.target_delta, run.train.rounds, hospitals
    )
    flwr_log(
        INFO, "[fedcare] client-level DP: %d hospitals, noise multiplier %.4f, clipping norm %g",
        hospitals, sigma, run.dp.client_clipping_norm,
    )  # fmt: skip
    return with_client_dp(
        build_strategy(run.strategy, weighted_by_key=UNIT_WEIGHT_KEY),
        noise_multiplier=sigma, clipping_norm=run.dp.client_clipping_norm, hospitals=hospitals,
        delta=run.dp.target_delta, releases_done=releases_done,
    )  # fmt: skip


def _pooled_test_set(run: RunConfig, grid: Grid):  # -> (x [N, F], y [N])
    """Simulation only: the union of all simulated hospitals' test splits."""
    import numpy as np

    # the harness says how many hospitals it simulates; counting the Grid's nodes instead would race
    # with the Simulation Engine registering them
    num_hospitals = run.simulated_hospitals or len(list(grid.get_node_ids()))
    hospitals = simulated_hospitals_for(run, num_hospitals)
    return np.concatenate([s.x_test for s in hospitals]), np.concatenate(
        [s.y_test for s in hospitals]
    )


def _privacy(history: RunHistory) -> dict[str, dict[str, float | None]]:
    return {
        hospital: {"epsilon": ev.metrics.get("epsilon"), "delta": ev.metrics.get("delta")}
        for hospital, ev in history.latest("train").items()
    }


def _sidecar(run: RunConfig, history: RunHistory, server_round: int, context: Context) -> dict:
    return {
        "round": server_round,
        "run_id": context.run_id,
        "run_config": dict(context.run_config),
        "versions": package_versions(),
        "privacy": _privacy(history),
        # this round's replies only: the run's history is history.json (one copy, not one a round)
        "events": [asdict(ev) for ev in history.events if ev.round == server_round],
    }


def released_training_data(history: RunHistory) -> dict:
    """``model.json`` ``training_data`` in a deployment: only what the hospitals released.

    The prevalence is that of the hospitals' test splits, read from the score histograms of
    their latest evaluation (noisy where they released DP-noised counts, charged to their
    ledgers then); feature distributions are never released, so ``features`` is None and
    ``fedcare evaluate`` checks no feature shift against this card. A simulation replaces this
    block with exact figures (:func:`simulations.external_validation.simulation_training_data`).
    """
    per: dict[str, dict] = {}
    for name, ev in sorted(history.latest("evaluate").items()):
        if ev is None or not ev.histograms:
            continue
        pos = sum(max(0.0, v) for v in ev.histograms["hist-pos"])
        neg = sum(max(0.0, v) for v in ev.histograms["hist-neg"])
        noisy = ev.metrics.get("eval-noise-multiplier") is not None
        if pos + neg > 0:
            per[name] = {"prevalence": pos / (pos + neg), "noisy": noisy}
    pos_all = [p["prevalence"] for p in per.values()]
    return {
        "provenance": "released: test-split prevalence from the score histograms the hospitals "
        "released at their latest evaluation (DP-noised where marked noisy); no feature "
        "distributions are released in a deployment",
        "exact": False,
        "prevalence": sum(pos_all) / len(pos_all) if pos_all else None,
        "prevalence_method": "unweighted mean of the hospitals' released test-split prevalences",
        "hospitals": per,
        "features": None,
    }


def _model_card(run: RunConfig, summary: dict, model_info: dict) -> dict:
    return {
        "model": model_info,
        "task": run.task.name,
        "preprocessing": run.task.preprocessing,
        "training": {
            "strategy": run.strategy.name,
            "rounds": run.train.rounds,
            "hospitals": [
                {"name": h["name"], "n_train": h["n_train"], "rounds_trained": h["rounds_trained"]}
                for h in summary["hospitals"]
            ],
        },
        "privacy": {
            "guarantee": summary["dp"]["guarantee"],
            "per_hospital": {
                h["name"]: {"epsilon": h["epsilon"], "delta": h["delta"]}
                for h in summary["hospitals"]
            },
        },
        "metrics": {
            "hospitals": {h["name"]: h["metrics"] for h in summary["hospitals"]},
            "overall": summary["overall"],
        },
        "intended_use": "research on federated learning; not validated for clinical decisions",
        "versions": package_versions(),
    }


def _report_progress(
    run: RunConfig, history: RunHistory, server_round: int, seconds: float
) -> None:
    """Log the round's progress record: mean hospital AUROC (when the round evaluated; a noisy
    release too noisy to read, as the report and the console's table say, is left out), the
    largest ε after the round's training and, when the round made an evaluation release, after
    it too (what the end-of-run table shows), and every hospital that missed the round."""

    def max_epsilon(kind: str) -> float | None:
        values = [
            float(x)
            for e in history.events
            if e.round == server_round and e.kind == kind and not e.error
            if (x := e.metrics.get("epsilon")) is not None
        ]
        return max(values) if values else None

    evaluated = [
        e
        for e in history.events
        if e.round == server_round and e.kind == "evaluate" and not e.error
    ]
    from server.report import noise_intervals

    aurocs, too_noisy = [], 0  # a noisy release's AUROC counts only where the report shows it
    for e in evaluated:
        if (a := e.metrics.get("auroc")) is None:
            continue
        try:
            intervals = noise_intervals(e)
            readable = intervals is None or intervals["auroc"]["readable"]
        except (ValueError, KeyError, TypeError):  # a malformed release: shown nowhere either
            readable = False
        if not readable:
            too_noisy += 1
        else:
            aurocs.append(float(a))
    train_eps, eval_eps = max_epsilon("train"), max_epsilon("evaluate")
    if server_round in history.central_privacy:  # client-level DP: one ε for the released model
        train_eps, eval_eps = history.central_privacy[server_round]["epsilon"], None
    info = {
        "round": server_round,
        "rounds": run.train.rounds,
        "seconds": seconds,
        "evaluated": bool(evaluated),
        "mean_auroc": sum(aurocs) / len(aurocs) if aurocs else None,
        "auroc_too_noisy": too_noisy,
        "pooled_auroc": (history.centralized.get(server_round) or {}).get("auroc"),
        "max_epsilon": train_eps,
        "max_epsilon_evaluation": eval_eps,
        "failures": history.missed(server_round),
    }
    # in-process (simulation): a structured record; deployed: one log line `fedcare server run` parses
    progress_log.info("round %d done", server_round, extra={"fedcare_progress": info})
    flwr_log(INFO, "[fedcare] progress %s", json.dumps(info))
