"""A hostile coordinator against the real ClientApp (handlers and mods, called as Flower calls
them): each test runs one attack and fails if it works.

The coordinator may send any run config, any weights and any number of messages, and reads every
reply. The hospitals here are deployed ones (their own data file, no policy file: fedcare's
default policy) unless a test says otherwise.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from client.client_app import HOSPITAL_REFUSED
from client.client_app import app as client_app
from client.ledger import Ledger
from client.policy import DEFAULT_POLICY, HospitalPolicy, PolicyError
from client.training import epsilon_spent
from shared_models.hospitals import simulated_hospital_frames
from shared_models.metrics import score_histograms
from shared_models.models import build_model, predict_proba
from shared_models.tasks import get_task
from tests.handlers import make_context, make_request, use_task_identity


@pytest.fixture(autouse=True)
def _task_identity():
    use_task_identity()


@pytest.fixture
def hospital(tmp_path, default_cfg):
    """A deployed breast-cancer hospital (190 patients, its own CSV, a ledger, no policy file):
    ``hospital(**run_config_overrides)`` -> a fresh Context, as for each Flower message."""
    task = get_task("breast-cancer")
    frame = simulated_hospital_frames(
        task, data_dir="", num_hospitals=3, scheme="iid", alpha=0.5, seed=0
    )
    path = tmp_path / "hospital.csv"
    task.write_file(frame[0][1], path)
    node = {"data-path": str(path), "hospital": "a", "ledger-dir": str(tmp_path / "ledger")}

    def make(**overrides):  # type: ignore[no-untyped-def]
        cfg = {**default_cfg, "run.id": "r1", **overrides}
        return make_context(cfg, dict(node))

    make.ledger = Ledger(tmp_path / "ledger")  # type: ignore[attr-defined]
    make.frame = frame[0][1]  # type: ignore[attr-defined]
    return make


def _flat(state_dict) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return torch.cat([v.flatten().double() for v in state_dict.values()])


def test_one_bit_replay_leaves_the_dp_noise_in_the_difference(hospital):
    """The same round sent twice with weights one bit apart (so the replay cache does not apply)
    is trained twice with independent noise: the difference of the two updates keeps
    sigma * C * sqrt(2 * steps) / B of noise per weight instead of cancelling it to one
    patient's gradient (which is what seeding the noise from the run config allowed)."""
    lr, batch = 0.01, 1
    cfg = {"model.name": "mlp", "train.batch-size": batch, "train.lr": lr, "train.rounds": 5}
    model = build_model("mlp", n_features=30, seed=3)
    twin = build_model("mlp", n_features=30, seed=3)
    with torch.no_grad():  # flip the lowest mantissa bit of one weight
        w = twin.net[0].weight
        w.view(-1)[0] = torch.from_numpy(
            np.frombuffer((w.view(-1)[0].numpy().view(np.int32) ^ 1).tobytes(), np.float32).copy()
        )[0]
    replies = [client_app(make_request("train", m, 1), hospital(**cfg)) for m in (model, twin)]
    assert not any(r.has_error() for r in replies), [r.error for r in replies]
    assert not replies[1].content["info"]["replayed"]
    start = _flat(model.state_dict())
    updates = [_flat(r.content["arrays"].to_torch_state_dict()) - start for r in replies]
    metrics = replies[0].content["metrics"]
    sigma, steps = metrics["noise-multiplier"], metrics["steps"]
    expected = lr * sigma * 1.0 * math.sqrt(2 * steps) / batch  # per weight; C = 1
    measured = float((updates[0] - updates[1]).std())
    assert 0.85 * expected < measured < 1.15 * expected, (measured, expected)
    # both trainings were charged: the ledger holds 2 x steps at this hospital
    record = hospital.ledger.load("r1")
    assert record.train_steps == 2 * steps and record.updates == 2


def test_noise_differs_between_two_honest_runs_with_the_same_seed(hospital, tmp_path):
    model = build_model("mlp", n_features=30)
    a = client_app(make_request("train", model, 1), hospital(**{"run.id": "x1"}))
    b = client_app(make_request("train", model, 1), hospital(**{"run.id": "x2"}))
    wa, wb = (_flat(r.content["arrays"].to_torch_state_dict()) for r in (a, b))
    assert float((wa - wb).abs().max()) > 1e-3


def test_a_run_without_dp_is_refused_without_a_policy_file(hospital):
    reply = client_app(
        make_request("train", build_model("mlp", n_features=30), 1),
        hospital(**{"dp.enabled": False}),
    )
    assert reply.error.code == HOSPITAL_REFUSED
    assert "trains without differential privacy and the policy requires DP" in reply.error.reason
    assert hospital.ledger.records() == []


def test_the_run_config_cannot_point_a_deployed_hospital_at_a_file(hospital, tmp_path):
    """``simulation.policy`` / ``simulation.ledger-dir`` are for simulated hospitals only: a
    deployed one neither reads the coordinator's policy file nor writes where it says."""
    permissive = tmp_path / "evil-policy.toml"
    permissive.write_text("allow-non-dp = true\nexact-metrics = true\n")
    elsewhere = tmp_path / "elsewhere"
    ctx = hospital(**{
        "dp.enabled": False, "simulation.policy": str(permissive),
        "simulation.ledger-dir": str(elsewhere),
    })  # fmt: skip
    reply = client_app(make_request("train", build_model("mlp", n_features=30), 1), ctx)
    assert "policy requires DP" in reply.error.reason
    ctx = hospital(**{"simulation.policy": "/dev/zero"})  # would hang a reader
    reply = client_app(make_request("train", build_model("mlp", n_features=30), 1), ctx)
    assert not reply.has_error()
    assert not elsewhere.exists()


def test_a_changed_plan_under_the_same_run_id_is_refused_before_training(hospital):
    """train.rounds 5 -> 10 under the same run id after five rounds: refused, and the run's ε
    never exceeds the per-run cap."""
    model = build_model("mlp", n_features=30)
    cfg = {"dp.target-epsilon": 3.0, "train.rounds": 5}
    for rnd in range(1, 6):
        assert not client_app(make_request("train", model, rnd), hospital(**cfg)).has_error()
    before = hospital.ledger.load("r1")
    reply = client_app(make_request("train", model, 6), hospital(**{**cfg, "train.rounds": 10}))
    assert reply.error.code == HOSPITAL_REFUSED
    assert "recorded here with other settings (rounds changed)" in reply.error.reason
    after = hospital.ledger.load("r1")
    assert after.accountant == before.accountant and after.train_steps == before.train_steps
    hospital_delta = DEFAULT_POLICY.hospital_delta(133)
    assert after.epsilon(hospital_delta) <= DEFAULT_POLICY.max_epsilon_per_run
    # a sixth round under the old plan is refused as well: its steps exceed the plan
    reply = client_app(make_request("train", model, 6), hospital(**cfg))
    assert "would exceed the steps the run was calibrated for" in reply.error.reason


def test_fresh_run_ids_cannot_grow_the_lifetime_budget(hospital):
    """Each run fits the per-run cap, but the lifetime cap (10) stops the series; the ledger's
    composed ε never exceeds it."""
    from client.ledger import lifetime_epsilon

    model = build_model("mlp", n_features=30)
    refused = None
    for i in range(40):
        reply = client_app(
            make_request("train", model, 1),
            hospital(**{"run.id": f"run-{i}", "dp.target-epsilon": 3.0, "train.rounds": 1}),
        )
        if reply.has_error():
            refused = reply.error.reason
            break
    assert refused is not None and "lifetime ε" in refused
    records = hospital.ledger.records()
    total = lifetime_epsilon(
        [r.accountant for r in records], delta=DEFAULT_POLICY.hospital_delta(133)
    )
    assert total <= DEFAULT_POLICY.lifetime_epsilon


def test_a_larger_delta_than_the_hospital_allows_is_refused(hospital):
    # delta 2.4e-3 is below 1/n (so the run itself is valid) but above the hospital's 1e-5
    reply = client_app(
        make_request("train", build_model("mlp", n_features=30), 1),
        hospital(**{"dp.target-delta": 2.4e-3}),
    )
    assert reply.error.code == HOSPITAL_REFUSED
    assert "dp.target-delta = 0.0024 is above this hospital's δ" in reply.error.reason


def test_threshold_model_evaluation_gets_only_noisy_counts_charged_to_the_ledger(hospital):
    """w = M e_j, b = -M t turns exact sensitivity/specificity into counts of patients with
    x_j > t. The hospital answers with noisy per-class histograms only, and charges the release
    (a Gaussian mechanism, sensitivity 1) to the run's accountant."""
    j, t, big = 0, 0.1, 1e4
    model = build_model("logreg", n_features=30)
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.weight[0, j] = big
        model.linear.bias.fill_(-big * t)
    ctx = hospital(**{"model.name": "logreg"})
    reply = client_app(make_request("evaluate", model, 1), ctx)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert not {"auroc", "accuracy", "sensitivity", "specificity", "train-loss"} & set(metrics)
    sigma = metrics["eval-noise-multiplier"]
    assert sigma == pytest.approx(5.0)
    # the exact histograms the attacker wanted, recomputed here from the hospital's own data
    data = _hospital_data(ctx)
    exact = np.concatenate(score_histograms(data.y_test, predict_proba(model, data.x_test)))
    noise = np.asarray(metrics["hist-neg"] + metrics["hist-pos"]) - exact
    assert 0.4 * sigma < float(noise.std()) < 1.8 * sigma  # 20 Gaussian draws of std sigma
    record = hospital.ledger.load("r1")
    assert record.eval_releases == 1
    assert record.accountant["history"] == [[sigma, 1.0, 1]]
    assert metrics["epsilon"] == pytest.approx(
        epsilon_spent({"mechanism": "rdp", "history": [[sigma, 1.0, 1]]}, delta=1e-5)
    )
    # a second release is beyond the run's plan (one evaluation, after the last round)
    again = build_model("logreg", n_features=30, seed=4)
    reply = client_app(make_request("evaluate", again, 5), hospital(**{"model.name": "logreg"}))
    assert reply.error.code == HOSPITAL_REFUSED and "planned evaluation" in reply.error.reason
    # ... but the very same request is answered with the same release, at no cost
    same = client_app(make_request("evaluate", model, 1), hospital(**{"model.name": "logreg"}))
    assert same.content["metrics"]["hist-pos"] == metrics["hist-pos"]
    assert hospital.ledger.load("r1").eval_releases == 1


def _hospital_data(ctx):  # type: ignore[no-untyped-def]
    from client.hospital_data import HospitalSettings, load_hospital_data, run_config_of

    return load_hospital_data(
        HospitalSettings.from_node_config(ctx.node_config), run_config_of(ctx)
    )


def test_the_train_loss_does_not_leave_under_the_default_policy(hospital):
    reply = client_app(make_request("train", build_model("mlp", n_features=30), 1), hospital())
    assert "train-loss" not in reply.content["metrics"]
    assert reply.content["metrics"]["epsilon"] > 0


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('allow-non-dp = "false"\n', "allow-non-dp must be true or false"),
        ("max-epsilon-per-run = nan\n", "max-epsilon-per-run must be a finite"),
        ("lifetime-epsilon = inf\n", "lifetime-epsilon must be a finite"),
        ("min-noise-multiplier = -1.0\n", "min-noise-multiplier must be a finite, non-negative"),
        ('min-cohort = "10"\n', "min-cohort must be a number"),
        ("max-delta = 2.0\n", "max-delta must be in (0, 1)"),
        ("max-grad-norm = [5.0, 1.0]\n", "low <= high"),
        ("allow-everything = true\n", "unknown key(s) ['allow-everything']"),
    ],
)
def test_malformed_policy_values_fail_closed(tmp_path, text, key):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        HospitalPolicy.load(path)
    assert key in str(err.value)


def test_a_policy_file_changes_only_the_keys_it_names(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("lifetime-epsilon = 20.0\n")
    policy = HospitalPolicy.load(path)
    assert policy.lifetime_epsilon == 20.0
    assert not policy.allow_non_dp and not policy.exact_metrics  # still the safe defaults


def test_non_finite_data_is_refused_naming_the_column_and_no_value_leaves(hospital, tmp_path):
    path = tmp_path / "inf.csv"
    frame = hospital.frame.copy()
    frame.loc[7, "mean radius"] = float("inf")
    get_task("breast-cancer").write_file(frame, path)
    from shared_models.tasks import DataError

    with pytest.raises(
        DataError,
        match=r"column 'mean radius': 1 row\(s\) not a finite number \(first at data row 8\)",
    ):
        get_task("breast-cancer").read_file(path)
    ctx = hospital()
    ctx.node_config["data-path"] = str(path)
    reply = client_app(make_request("train", build_model("mlp", n_features=30), 1), ctx)
    assert reply.error.code == HOSPITAL_REFUSED
    assert str(tmp_path) not in reply.error.reason and "inf" not in reply.error.reason
    assert "its data failed validation" in reply.error.reason
    audit = (tmp_path / "ledger" / "audit.jsonl").read_text()
    assert "mean radius" in audit  # the hospital's own log keeps the detail


def test_refusal_texts_carry_no_local_path(hospital, tmp_path):
    ledger_file = tmp_path / "ledger" / "runs" / "r1.json"
    ledger_file.parent.mkdir(parents=True)
    ledger_file.write_text("{not json")
    reply = client_app(make_request("train", build_model("mlp", n_features=30), 1), hospital())
    assert reply.error.code == HOSPITAL_REFUSED and str(tmp_path) not in reply.error.reason
    entries = [json.loads(line) for line in (tmp_path / "ledger" / "audit.jsonl").open()]
    assert any(str(ledger_file) in e.get("detail", "") for e in entries)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e20])
def test_weights_that_could_overflow_for_some_patients_only_are_refused(hospital, value):
    """Huge weights could make activations overflow (and the update NaN) exactly when a patient
    with some feature value is in the batch: one bit outside the DP noise. Refused before any
    computation on the data, by a check on the coordinator's own weights."""
    model = build_model("mlp", n_features=30)
    with torch.no_grad():
        model.net[0].weight[0, 0] = value
    for kind in ("train", "evaluate"):
        reply = client_app(make_request(kind, model, 1), hospital())
        assert reply.error.code == HOSPITAL_REFUSED and "global weights" in reply.error.reason
    assert hospital.ledger.records() == []
