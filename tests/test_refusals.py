"""Every refusal a coordinator can trigger carries nothing derived from the hospital's data.

A refusal reaches the coordinator as an error reply. The attack: send run configs until one is
refused and read the number in the text (``dp.target-delta=0.09`` refused with "not below 1/n =
0.00581 for 172 training records" gave away n, and switching ``task.preprocessing`` gave the
number of patients with a missing value; a SecAgg+ range error gave max |w|; an unknown name gave
a raw exception). Here each refusal, triggered through the real ClientApp at a deployed hospital,
may contain only numbers the coordinator sent or the hospital policy's bounds, never the hospital's
counts, noise multiplier, sampling rate, steps or ε, nor a path or an exception's text.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from client.client_app import HOSPITAL_REFUSED, MAX_GLOBAL_WEIGHT
from client.client_app import app as client_app
from client.hospital_data import HospitalSettings, load_hospital_data, run_config_of
from client.policy import DEFAULT_POLICY
from client.training import epsilon_spent, plan_for_run
from shared_models import config as config_module
from shared_models.hospitals import simulated_hospital_frames
from shared_models.models import build_model
from shared_models.tasks import get_task
from tests.handlers import make_context, make_request, use_task_identity

NUMBER = re.compile(r"\d[\d_]*(?:\.\d+)?(?:e[-+]?\d+)?")


@pytest.fixture(autouse=True)
def _task_identity():
    use_task_identity()


@pytest.fixture
def hospital(tmp_path, default_cfg):
    """A deployed breast-cancer hospital: ``hospital(policy_text=None, **overrides)`` -> a fresh
    Context (its own CSV, a ledger, fedcare's default policy unless ``policy_text``)."""
    task = get_task("breast-cancer")
    frame = simulated_hospital_frames(
        task, data_dir="", num_hospitals=3, scheme="iid", alpha=0.5, seed=0
    )
    path = tmp_path / "hospital-data.csv"
    task.write_file(frame[0][1], path)

    def make(policy_text: str | None = None, **overrides):  # type: ignore[no-untyped-def]
        node = {"data-path": str(path), "hospital": "a", "ledger-dir": str(tmp_path / "ledger")}
        if policy_text is not None:
            (tmp_path / "policy.toml").write_text(policy_text)
            node["policy-path"] = str(tmp_path / "policy.toml")
        return make_context({**default_cfg, "run.id": "r1", **overrides}, node)

    make.tmp_path = tmp_path  # type: ignore[attr-defined]
    return make


def _numbers(text: str) -> set[float]:
    return {float(t) for t in NUMBER.findall(text)}


def _data_numbers(ctx) -> set[float]:  # type: ignore[no-untyped-def]
    """What the coordinator must not learn from a refusal: the hospital's counts and what follows
    from them (sampling rate, steps, calibrated noise, ε at the hospital's δ, 1/n), under the run
    config of ``ctx`` or, where that config is invalid, the default one."""
    from server.run_config import default_run_config
    from shared_models.config import RunConfig

    try:
        run = run_config_of(ctx)
        get_task(run.task.name).resolve_preprocessing(run.task.preprocessing)
    except ValueError:
        run = RunConfig.from_run_config(default_run_config())
    data = load_hospital_data(HospitalSettings.from_node_config(ctx.node_config), run)
    y = data.y_train
    values = {
        data.n_train, data.n_test, data.n_train + data.n_test, int(y.sum()), int((1 - y).sum()),
        1.0 / data.n_train, 1.0 / (10 * data.n_train),
    }  # fmt: skip
    try:
        plan = plan_for_run(run, n_train=data.n_train, private_evaluation=True)
    except ValueError:
        return values
    hospital_delta = DEFAULT_POLICY.hospital_delta(data.n_train)
    return values | {
        plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, plan.total_steps,
        epsilon_spent(plan.planned_state(), delta=hospital_delta), hospital_delta,
    }  # fmt: skip


def _assert_leaks_nothing(  # type: ignore[no-untyped-def]
    reply, ctx, tmp_path, allowed: str = "", private: set[float] | None = None
) -> None:
    """``reply`` is a refusal whose every number is one the coordinator sent (the run config,
    the round), a bound of the hospital's policy (``allowed``: the policy text) or a constant of the
    code the coordinator ships (the run-config schema's ranges, the weight bound), and none of
    the hospital's own numbers; no path, no file name, no exception text."""
    assert reply.has_error() and reply.error.code == HOSPITAL_REFUSED, reply
    reason = reply.error.reason
    sent = " ".join(
        f"{v} {v:g}" if isinstance(v, float) else str(v) for v in ctx.run_config.values()
    )
    public = _numbers(sent) | _numbers(allowed) | _numbers(DEFAULT_POLICY.as_toml()) | {1.0}
    code = _numbers(Path(config_module.__file__).read_text()) | {MAX_GLOBAL_WEIGHT, 1e-5, 10.0}
    private = _data_numbers(ctx) if private is None else private
    for number in _numbers(reason):
        assert not any(math.isclose(number, p, rel_tol=1e-3) for p in private - public), (
            f"{number} in {reason!r} is derived from the hospital's data"
        )
        assert any(math.isclose(number, p, rel_tol=1e-3) for p in public | code), (
            f"{number} in {reason!r} is neither a value the coordinator sent nor a policy bound"
        )
    assert str(tmp_path) not in reason and "hospital-data" not in reason and ".csv" not in reason
    assert "Traceback" not in reason and "Error:" not in reason


MLP = build_model("mlp", n_features=30, seed=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"dp.target-delta": 0.09},  # not below 1/n: gave n away
        {"dp.target-delta": 0.001},  # below 1/n, above the hospital's delta
        {"dp.target-epsilon": 40.0},  # sigma below the policy minimum (gave sigma away)
        {"dp.target-epsilon": 3.2},  # planned epsilon at the hospital's delta above the cap
        {"dp.eval-noise-multiplier": 1.0},  # below the policy's evaluation minimum
        {"dp.max-grad-norm": 50.0},  # outside the policy's clipping range
        {"dp.enabled": False},
        {"dp.level": "client"},
        {"task.name": "nope"},
        {"task.preprocessing": "nope"},
        {"model.name": "nope"},
        {"model.name": "cnn"},  # a model that does not fit the task
        {"train.rounds": 0},
        {"train.batch-size": -3},
        {"dp.accountant": "nope"},
        {"secagg.enabled": True},  # a train request outside the SecAgg+ protocol
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_a_refused_run_config_reveals_nothing_of_the_data(hospital, overrides):
    ctx = hospital(**overrides)
    reply = client_app(make_request("train", MLP, 1), ctx)
    _assert_leaks_nothing(reply, ctx, hospital.tmp_path)


def test_policy_bounds_that_refuse_reveal_nothing_of_the_data(hospital):
    cases = {
        "min-cohort = 500\n": "min-cohort",
        'allowed-tasks = ["heart-disease"]\n': "not allowed",
        "require-secure-aggregation = true\n": "secure aggregation",
        "lifetime-epsilon = 1.0\n": "lifetime",
        "max-delta = 1e-7\n": "max-delta",
    }
    for policy, expected in cases.items():
        ctx = hospital(policy_text=policy)
        reply = client_app(make_request("train", MLP, 1), ctx)
        assert expected in reply.error.reason
        _assert_leaks_nothing(reply, ctx, hospital.tmp_path, allowed=policy)


def test_rounds_and_evaluations_past_the_plan_reveal_nothing(hospital):
    cfg = {"train.rounds": 2}
    for rnd in (1, 2):
        assert not client_app(make_request("train", MLP, rnd), hospital(**cfg)).has_error()
    ctx = hospital(**cfg)
    reply = client_app(make_request("train", MLP, 3), ctx)
    assert "steps the run was calibrated for" in reply.error.reason
    _assert_leaks_nothing(reply, ctx, hospital.tmp_path)
    ctx = hospital(**cfg)
    assert not client_app(make_request("evaluate", MLP, 2), ctx).has_error()
    reply = client_app(make_request("evaluate", build_model("mlp", n_features=30, seed=1), 3), ctx)
    assert "planned evaluation" in reply.error.reason
    _assert_leaks_nothing(reply, ctx, hospital.tmp_path)
    changed = hospital(**{**cfg, "train.batch-size": 16})  # the same run id, another plan
    reply = client_app(make_request("train", MLP, 1), changed)
    assert "other settings" in reply.error.reason and "batch-size" in reply.error.reason
    _assert_leaks_nothing(reply, changed, hospital.tmp_path)


@pytest.mark.parametrize("value", [math.inf, 1e7])
def test_crafted_weights_refused_reveal_nothing(hospital, value):
    model = build_model("mlp", n_features=30, seed=0)
    with torch.no_grad():
        model.net[0].weight[0, 0] = value
    ctx = hospital()
    _assert_leaks_nothing(client_app(make_request("train", model, 1), ctx), ctx, hospital.tmp_path)
    wrong = build_model("mlp", n_features=30, hidden=7, seed=0)
    ctx = hospital()
    _assert_leaks_nothing(client_app(make_request("train", wrong, 1), ctx), ctx, hospital.tmp_path)


def test_an_unexpected_exception_leaves_as_its_category_only(hospital, monkeypatch):
    import client.client_app as module

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError(
            f"patient 4711 at {hospital.tmp_path}/hospital-data.csv has value 97.531"
        )

    monkeypatch.setattr(module, "train_round", broken)
    ctx = hospital()
    reply = client_app(make_request("train", MLP, 1), ctx)
    assert "an unexpected error at the hospital" in reply.error.reason
    assert "4711" not in reply.error.reason and "97.531" not in reply.error.reason
    _assert_leaks_nothing(reply, ctx, hospital.tmp_path)
    audit = (hospital.tmp_path / "ledger" / "audit.jsonl").read_text()
    assert "97.531" in audit  # the hospital keeps the detail


def test_a_refusal_keeps_the_hospitals_numbers_in_its_own_audit_log(hospital):
    ctx = hospital(**{"dp.target-epsilon": 40.0})
    reply = client_app(make_request("train", MLP, 1), ctx)
    assert "noise multiplier" in reply.error.reason
    audit = (hospital.tmp_path / "ledger" / "audit.jsonl").read_text()
    assert re.search(r"noise multiplier \d\.\d{4}", audit)


def test_a_malformed_data_file_is_refused_by_category(hospital):
    ctx = hospital()
    private = _data_numbers(ctx)
    path = ctx.node_config["data-path"]
    with open(path, "a") as f:
        f.write("not,a,number," + ",".join(["x"] * 28) + "\n")
    reply = client_app(make_request("train", MLP, 1), ctx)
    assert "its data failed validation" in reply.error.reason
    _assert_leaks_nothing(reply, ctx, hospital.tmp_path, private=private)
