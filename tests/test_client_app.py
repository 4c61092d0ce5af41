"""The ClientApp's handlers called with real Flower Message / Context objects (no engine)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from client.client_app import HOSPITAL_REFUSED
from client.client_app import app as client_app
from shared_models.models import build_model
from shared_models.tasks import get_task
from tests.handlers import make_context, make_request, permissive_policy, use_task_identity


@pytest.fixture(autouse=True)
def _task_identity():
    use_task_identity()


_context, _request = make_context, make_request


def _hospital_data(ctx):  # type: ignore[no-untyped-def]
    """The hospital's data as its ClientApp loads it (split, preprocessing)."""
    from client.hospital_data import HospitalSettings, load_hospital_data, run_config_of

    return load_hospital_data(
        HospitalSettings.from_node_config(ctx.node_config), run_config_of(ctx)
    )


def _steps(ctx) -> int:  # type: ignore[no-untyped-def]
    """DP steps per round at this hospital (default batch size 32, one local epoch)."""
    return math.ceil(_hospital_data(ctx).n_train / 32)


def _record(ctx):
    """The run's record a hospital without a ledger keeps in its Context."""
    from client.ledger import RunRecord

    return RunRecord.from_json(ctx.state["fedcare.run"]["json"])


@pytest.fixture
def sim_ctx(default_cfg):
    default_cfg.update({"train.rounds": 3, "dp.target-epsilon": 1.5})
    return _context(default_cfg, {"partition-id": 1, "num-partitions": 3})


def test_train_reports_cumulative_epsilon_and_keeps_accountant_state(sim_ctx):
    model = build_model("mlp", n_features=30)
    eps = []
    for rnd in (1, 2, 3):
        reply = client_app(_request("train", model, rnd), sim_ctx)
        assert not reply.has_error(), reply.error
        metrics = reply.content["metrics"]
        assert metrics["num-examples"] == _hospital_data(sim_ctx).n_train  # examples, not batches
        assert metrics["delta"] == pytest.approx(1e-5)
        assert reply.content["info"]["hospital"] == "hospital-2"
        eps.append(metrics["epsilon"])
        record = _record(sim_ctx)
        assert record.train_steps == rnd * metrics["steps"] == record.accountant["history"][0][2]
        assert "train-loss" in metrics  # simulated hospitals without --policy: exact metrics
    assert eps[0] < eps[1] < eps[2] <= 1.5
    assert eps[2] > 1.45  # the run's budget is spent by the last planned round
    # the returned weights are the trained ones, with the model's keys
    assert set(reply.content["arrays"].keys()) == set(model.state_dict().keys())


def test_noise_is_calibrated_once_per_run_and_used_at_every_round(sim_ctx):
    from client.training import DPPlan, plan_for_run
    from shared_models.config import RunConfig

    model = build_model("mlp", n_features=30)
    client_app(_request("train", model, 1), sim_ctx)
    plans = sim_ctx.state["fedcare.dp-plans"]  # kept in the hospital's Context by its SuperNode
    assert len(plans) == 1
    ((key, cached),) = plans.items()
    n_train = _hospital_data(sim_ctx).n_train
    fresh = plan_for_run(RunConfig.from_run_config(sim_ctx.run_config), n_train=n_train)
    assert DPPlan(**json.loads(cached)) == fresh
    # the memo is what round 2 uses: the sigma the accountant records is the memo's
    plans[key] = json.dumps({**json.loads(cached), "noise_multiplier": 7.5})
    client_app(_request("train", model, 2), sim_ctx)
    history = _record(sim_ctx).accountant["history"]
    assert [h[0] for h in history] == [fresh.noise_multiplier, 7.5]
    # other inputs (a longer run) are another entry, calibrated afresh
    assert (
        plan_for_run(
            RunConfig.from_run_config({**sim_ctx.run_config, "train.rounds": 4}),
            n_train=n_train,
            memo=plans,
        ).noise_multiplier
        > fresh.noise_multiplier  # more steps at the same epsilon need more noise
    )
    assert len(plans) == 2


def test_fourth_round_beyond_the_plan_is_refused(sim_ctx):
    model = build_model("mlp", n_features=30)
    for rnd in (1, 2, 3):
        client_app(_request("train", model, rnd), sim_ctx)
    reply = client_app(_request("train", model, 4), sim_ctx)
    assert reply.has_error() and reply.error.code == HOSPITAL_REFUSED
    assert "exceed the" in reply.error.reason and "hospital " in reply.error.reason


def test_evaluate_reports_metrics(sim_ctx):
    """A simulated hospital (exact metrics) reports its test split's metrics, recomputed here
    with scikit-learn from the same data and model."""
    from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

    from client.hospital_data import HospitalSettings, load_hospital_data, run_config_of
    from shared_models.models import predict_proba

    model = build_model("mlp", n_features=30, seed=5)
    reply = client_app(_request("evaluate", model, 1), sim_ctx)
    metrics = reply.content["metrics"]
    data = load_hospital_data(
        HospitalSettings.from_node_config(sim_ctx.node_config), run_config_of(sim_ctx)
    )
    scores = predict_proba(model, data.x_test)
    pred = (scores >= 0.5).astype(int)
    assert metrics["num-examples"] == data.n_test
    assert metrics["auroc"] == pytest.approx(roc_auc_score(data.y_test, scores))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(data.y_test, pred))
    assert metrics["sensitivity"] == pytest.approx(recall_score(data.y_test, pred))
    assert metrics["specificity"] == pytest.approx(recall_score(data.y_test, pred, pos_label=0))
    assert sum(metrics["hist-neg"]) + sum(metrics["hist-pos"]) == data.n_test  # exact counts


def test_deployment_hospital_file_and_undefined_auroc(default_cfg, heart_dir, tmp_path):
    """A hospital whose test split has one class gets NaN AUROC plus the reason, not a crash."""
    rows = [r for r in (heart_dir / "processed.switzerland.data").read_text().splitlines() if r]
    positives = [r for r in rows if not r.endswith(",0")]
    path = tmp_path / "processed.positive.data"
    path.write_text("\n".join(positives[:40]) + "\n")
    default_cfg.update({"task.name": "heart-disease", "dp.enabled": False})
    node = {
        "data-path": str(path), "hospital": "zurich", "policy-path": permissive_policy(tmp_path),
        "ledger-dir": str(tmp_path / "ledger"),
    }  # fmt: skip
    ctx = _context(default_cfg, node)
    task = get_task("heart-disease")
    model = build_model("mlp", input_shape=task.input_shape("flamby"))
    reply = client_app(_request("evaluate", model, 1), ctx)
    assert not reply.has_error()
    assert math.isnan(reply.content["metrics"]["auroc"])
    assert "only one class" in reply.content["info"]["undefined.auroc"]
    assert reply.content["info"]["hospital"] == "zurich"
    train = client_app(_request("train", model, 1), ctx)
    assert "epsilon" not in train.content["metrics"]  # no DP: no epsilon claimed


def test_malformed_hospital_file_is_refused_with_a_clear_reason(default_cfg, tmp_path):
    path = tmp_path / "bad.data"
    path.write_text("1,2,3\n")
    default_cfg["task.name"] = "heart-disease"
    ctx = _context(
        default_cfg, {"data-path": str(path), "hospital": "x", "ledger-dir": str(tmp_path / "l")}
    )
    reply = client_app(_request("train", build_model("mlp", n_features=13), 1), ctx)
    assert reply.error.code == HOSPITAL_REFUSED
    assert reply.error.reason == (
        "hospital x refused: its data failed validation (the hospital's log has the details)"
    )  # the coordinator learns neither the file's path nor what is in it
    ledger = tmp_path / "ledger"
    ctx = _context(
        default_cfg, {"data-path": str(path), "hospital": "x", "ledger-dir": str(ledger)}
    )
    client_app(_request("train", build_model("mlp", n_features=13), 1), ctx)
    local = (ledger / "audit.jsonl").read_text()  # ... the hospital's own audit log has it
    assert "line 1: expected 14 comma-separated values" in local and str(path) in local


def test_ledger_survives_a_daemon_restart(default_cfg, tmp_path):
    """A hospital daemon restarted mid-run (fresh Context) continues epsilon from its ledger and
    ends with the same epsilon as an uninterrupted run."""
    default_cfg.update({"train.rounds": 3, "run.id": "run-abc"})
    node = {"partition-id": 0, "num-partitions": 3, "ledger-dir": str(tmp_path / "ledger")}
    model = build_model("mlp", n_features=30)
    first = _context(default_cfg, node)
    client_app(_request("train", model, 1), first)
    restarted = _context(default_cfg, node)  # context.state is empty again
    eps = [
        client_app(_request("train", model, r), restarted).content["metrics"]["epsilon"]
        for r in (2, 3)
    ]
    uninterrupted = _context(default_cfg, {"partition-id": 0, "num-partitions": 3})
    ref = [
        client_app(_request("train", model, r), uninterrupted).content["metrics"]["epsilon"]
        for r in (1, 2, 3)
    ]
    assert eps == pytest.approx(ref[1:], rel=1e-12)
    entry = json.loads((tmp_path / "ledger" / "runs" / "run-abc.json").read_text())
    steps = entry["train_steps"] // 3
    assert entry["train_steps"] == sum(h[2] for h in entry["accountant"]["history"]) == 3 * steps
    assert steps == _steps(first)


def test_corrupted_ledger_is_refused_and_never_reset(default_cfg, tmp_path):
    default_cfg["run.id"] = "run-x"
    path = tmp_path / "ledger" / "runs" / "run-x.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"run_id": "run-x", "accountant": {"mechanism": "rdp", "hist')  # truncated
    ctx = _context(
        default_cfg,
        {"partition-id": 0, "num-partitions": 3, "ledger-dir": str(tmp_path / "ledger")},
    )
    reply = client_app(_request("train", build_model("mlp", n_features=30), 1), ctx)
    assert reply.error.code == HOSPITAL_REFUSED
    assert "its privacy ledger cannot be used" in reply.error.reason
    local = (tmp_path / "ledger" / "audit.jsonl").read_text()
    assert "run-x.json is unreadable" in local and "never reset" in local
    assert path.read_text().endswith('"hist')  # untouched


def test_a_repeated_request_is_answered_again_without_spending_budget(default_cfg, tmp_path):
    """A coordinator that resumes from an older checkpoint repeats round k's request: the hospital
    re-sends the update it already released and its epsilon does not move."""
    default_cfg.update({"train.rounds": 3, "run.id": "run-r"})
    ctx = _context(
        default_cfg, {"partition-id": 0, "num-partitions": 3, "ledger-dir": str(tmp_path)}
    )
    model = build_model("mlp", n_features=30)
    first = client_app(_request("train", model, 1), ctx)
    again = client_app(_request("train", model, 1), _context(default_cfg, dict(ctx.node_config)))
    assert again.content["metrics"]["epsilon"] == first.content["metrics"]["epsilon"]
    a, b = (
        first.content["arrays"].to_torch_state_dict(),
        again.content["arrays"].to_torch_state_dict(),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    entry = json.loads((tmp_path / "runs" / "run-r.json").read_text())
    assert entry["train_steps"] == _steps(ctx) and entry["updates"] == 1  # trained once
    other = build_model("mlp", n_features=30, seed=1)  # different global weights: a new request
    assert (
        client_app(_request("train", other, 1), ctx).content["metrics"]["epsilon"]
        > first.content["metrics"]["epsilon"]
    )
