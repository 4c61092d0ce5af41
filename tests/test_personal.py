"""Personalised federated learning (run settings ``personal.*``): each hospital's personal model
stays at the hospital, survives a restart, and only its evaluation leaves, charged like any
release."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from client.client_app import HOSPITAL_REFUSED
from client.client_app import app as client_app
from shared_models.config import ConfigError, RunConfig
from shared_models.models import build_model, predict_proba
from tests.handlers import make_context, make_request, use_task_identity


@pytest.fixture(autouse=True)
def _task_identity():
    use_task_identity()


def _hospital_data(ctx):  # type: ignore[no-untyped-def]
    from client.hospital_data import HospitalSettings, load_hospital_data, run_config_of

    return load_hospital_data(
        HospitalSettings.from_node_config(ctx.node_config), run_config_of(ctx)
    )


def _personal(ledger: Path, run_id: str) -> dict[str, torch.Tensor]:
    return load_file(str(ledger / "personal" / f"{run_id}.safetensors"))


@pytest.fixture
def ditto_cfg(default_cfg):
    default_cfg.update(
        {
            "run.id": "run-ditto", "train.rounds": 3, "dp.target-epsilon": 3.0,
            "personal.method": "ditto", "personal.epochs": 2.0,
        }
    )  # fmt: skip
    return default_cfg


def test_unknown_personal_method_is_refused_by_name(default_cfg):
    default_cfg["personal.method"] = "fedper2"
    with pytest.raises(ConfigError, match="personal.method"):
        RunConfig.from_run_config(default_cfg)


def test_ditto_keeps_the_personal_model_at_the_hospital_across_a_restart(ditto_cfg, tmp_path):
    """Ditto trains a personal model every round, stores it in the state folder (0600) and never
    sends it; a restarted daemon (fresh Context) evaluates the stored one."""
    ledger = tmp_path / "ledger"
    node = {"partition-id": 0, "num-partitions": 3, "ledger-dir": str(ledger)}
    model = build_model("mlp", n_features=30)
    ctx = make_context(ditto_cfg, node)
    personal_after: list[dict[str, torch.Tensor]] = []
    for rnd in (1, 2):
        reply = client_app(make_request("train", model, rnd), ctx)
        assert not reply.has_error(), reply.error
        sent = reply.content["arrays"].to_torch_state_dict()
        personal_after.append(_personal(ledger, "run-ditto"))
        # the reply is the DP-SGD update of the global model, never the personal weights
        assert any(not torch.equal(sent[k], personal_after[-1][k]) for k in sent)
        model.load_state_dict(sent)
    assert any(not torch.equal(personal_after[0][k], personal_after[1][k]) for k in sent)
    path = ledger / "personal" / "run-ditto.safetensors"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700

    restarted = make_context(ditto_cfg, node)  # the daemon restarted: Context.state is empty
    reply = client_app(make_request("evaluate", model, 3), restarted)
    assert not reply.has_error(), reply.error
    assert "arrays" not in reply.content.array_records  # an evaluation reply carries no weights
    stored = build_model("mlp", n_features=30)
    stored.load_state_dict(_personal(ledger, "run-ditto"))
    assert all(torch.equal(stored.state_dict()[k], personal_after[1][k]) for k in sent)
    data = _hospital_data(restarted)
    expected = roc_auc_score(data.y_test, predict_proba(stored, data.x_test))
    metrics = reply.content["metrics"]
    assert metrics["personal-auroc"] == pytest.approx(expected)
    assert metrics["auroc"] == pytest.approx(
        roc_auc_score(data.y_test, predict_proba(model, data.x_test))
    )


def test_personal_evaluation_is_a_second_charged_release_at_a_private_hospital(
    default_cfg, tmp_path
):
    """Where the policy forbids exact metrics, the personal model's evaluation leaves only as
    noisy counts, charged as one more Gaussian release in the ledger and planned in the run's
    budget; a repeated request gets the same release, not a fresh free one."""
    from client.training import plan_for_run

    default_cfg.update(
        {"run.id": "run-private", "train.rounds": 2, "dp.target-epsilon": 3.0,
         "personal.method": "finetune", "personal.epochs": 1.0}
    )  # fmt: skip
    policy = tmp_path / "policy.toml"
    policy.write_text("exact-metrics = false\nmax-epsilon-per-run = 10.0\nmax-delta = 1e-4\n")
    ledger = tmp_path / "ledger"
    node = {
        "partition-id": 1, "num-partitions": 3, "ledger-dir": str(ledger),
        "policy-path": str(policy),
    }  # fmt: skip
    ctx = make_context(default_cfg, node)
    n_train = _hospital_data(ctx).n_train
    run = RunConfig.from_run_config(default_cfg)
    plan = plan_for_run(run, n_train=n_train, private_evaluation=True)
    assert plan.eval_releases == 2  # one evaluation round, global + personal
    model = build_model("mlp", n_features=30)
    for rnd in (1, 2):
        assert not client_app(make_request("train", model, rnd), ctx).has_error()
    request = make_request("evaluate", model, 2)
    reply = client_app(request, ctx)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert "personal-auroc" not in metrics  # no exact figure of the personal model leaves
    n_test = _hospital_data(ctx).n_test
    for prefix in ("", "personal-"):
        counts = np.add(metrics[f"{prefix}hist-neg"], metrics[f"{prefix}hist-pos"])
        assert all(float(c).is_integer() for c in counts)
        # noise of std 5 per bin on every count: the sum is n_test only by chance
        assert abs(counts.sum() - n_test) < 6 * 5 * np.sqrt(len(counts))
    entry = json.loads((ledger / "runs" / "run-private.json").read_text())
    assert entry["eval_releases"] == 2
    assert entry["accountant"]["history"][-1] == [5.0, 1.0, 2]
    again = client_app(request, ctx)  # the same request replayed: the same counts again
    assert again.content["metrics"]["personal-hist-pos"] == metrics["personal-hist-pos"]
    assert json.loads((ledger / "runs" / "run-private.json").read_text())["eval_releases"] == 2
    fresh = client_app(make_request("evaluate", model, 3), ctx)  # a third release: refused
    assert fresh.error.code == HOSPITAL_REFUSED and "evaluation release" in fresh.error.reason


def test_a_run_cannot_switch_personalisation_on_midway(ditto_cfg, tmp_path):
    """The personal model's releases are part of the run's plan: a coordinator that starts a
    run without personalisation and asks for it later under the same run id is refused."""
    ledger = tmp_path / "ledger"
    node = {"partition-id": 0, "num-partitions": 3, "ledger-dir": str(ledger)}
    model = build_model("mlp", n_features=30)
    plain = {**ditto_cfg, "personal.method": "none"}
    assert not client_app(make_request("train", model, 1), make_context(plain, node)).has_error()
    reply = client_app(make_request("train", model, 2), make_context(ditto_cfg, node))
    assert reply.error.code == HOSPITAL_REFUSED and "personal.method" in reply.error.reason
    assert not (ledger / "personal").exists()


@pytest.mark.slow
def test_no_reply_of_a_real_simulation_carries_personal_weights(tmp_path, monkeypatch):
    """A real simulation (Flower's engine, fedcare's ServerApp, in-process hospitals) with
    Ditto: every reply every hospital sent is inspected; none holds its personal weights, and the
    report shows the global and the personal model per hospital."""
    from rich.console import Console

    from server.run_config import RunOptions
    from simulations import engine
    from simulations.harness import SimulationRequest, run_simulation_job

    replies: list = []
    original = engine.InProcessBackend.process_message

    def spy(self, message, context):  # type: ignore[no-untyped-def]
        reply, ctx = original(self, message, context)
        replies.append(reply)
        return reply, ctx

    monkeypatch.setattr(engine.InProcessBackend, "process_message", spy)
    out = tmp_path / "run"
    options = RunOptions(
        task="breast-cancer", rounds=3, epsilon=3.0,
        run_config='personal.method="ditto" personal.epochs=2.0',
    )  # fmt: skip
    summary = run_simulation_job(
        SimulationRequest(options=options, hospitals=3, out=out, backend="in-process"),
        console=Console(file=io.StringIO()),
    )
    personal = [
        load_file(str(p)) for p in sorted((out / "hospitals").glob("*/personal/*.safetensors"))
    ]
    assert len(personal) == 3
    trains = [r for r in replies if not r.has_error() and "arrays" in r.content.array_records]
    assert len(trains) == 9  # 3 rounds x 3 hospitals
    for reply in replies:
        for record in reply.content.array_records.values() if not reply.has_error() else []:
            sent = record.to_torch_state_dict()
            for weights in personal:
                assert not any(torch.equal(sent[k], weights[k]) for k in weights)
    rows = summary["hospitals"]
    assert all(h["personal_metrics"]["auroc"] is not None for h in rows)
    assert "## Personal models (personal.method = ditto)" in (out / "report.md").read_text()
    assert "**Personalisation**: `ditto`" in (out / "model.md").read_text()
