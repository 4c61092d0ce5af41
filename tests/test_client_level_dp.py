"""Client-level DP (dp.level = "client"): Flower's accountant, noise calibration, the hospital's
clipping mod and the coordinator's noise, pinned so that dropped or mis-scaled noise fails."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from opacus.accountants.utils import get_noise_multiplier

from client.client_app import app as client_app
from server.strategies import (
    build_strategy,
    calibrate_client_noise,
    client_dp_epsilon,
    privacy_spent,
    with_client_dp,
)
from shared_models.config import ConfigError, RunConfig
from shared_models.models import build_model
from shared_models.protocol import UNIT_WEIGHT_KEY
from tests.handlers import make_context, make_request, use_task_identity


@pytest.fixture(autouse=True)
def _task_identity():
    use_task_identity()


def test_accountant_pinned_and_agrees_with_opacus():
    # Gaussian mechanism (no sampling), δ = 1e-5, Google dp-accounting RDP; Opacus' RDPAccountant
    # at sample rate 1 gives the same 4.7285 for σ = 1, one release
    assert client_dp_epsilon(4.8057, 5, 1e-5, 10) == pytest.approx(2.0, abs=2e-3)
    assert client_dp_epsilon(1.0, 1, 1e-5, 10) == pytest.approx(4.7285, abs=1e-3)
    sigma = calibrate_client_noise(2.0, 1e-5, 5, 10)
    assert client_dp_epsilon(sigma, 5, 1e-5, 10) <= 2.0
    assert sigma == pytest.approx(4.806, abs=2e-3)
    # the same calibration through Opacus' RDP accountant at sample rate 1: within 1 %
    opacus = get_noise_multiplier(
        target_epsilon=2.0, target_delta=1e-5, sample_rate=1.0, steps=5, accountant="rdp"
    )
    assert sigma == pytest.approx(opacus, rel=0.01)


def _reply(arrays: dict[str, np.ndarray], node: int) -> Message:
    request = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train"
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()}),
            "metrics": MetricRecord({UNIT_WEIGHT_KEY: 1.0, "num-examples": 50.0}),
        }
    )
    return Message(content, reply_to=request)


def test_a_resumed_run_counts_the_releases_it_already_made(default_cfg):
    """A resumed coordinator starts its accountant at the releases the checkpoint recorded, so ε
    continues from there instead of restarting at 0."""
    run = RunConfig.from_run_config({**default_cfg, "dp.level": "client"})
    resumed = with_client_dp(
        build_strategy(run.strategy, weighted_by_key=UNIT_WEIGHT_KEY),
        noise_multiplier=2.0, clipping_norm=0.5, hospitals=4, delta=1e-5, releases_done=2,
    )  # fmt: skip
    eps, delta, releases = privacy_spent(resumed)
    assert releases == 2 and delta == 1e-5
    # two Gaussian releases at sigma 2 (pinned; Opacus' RDPAccountant at q = 1 gives the same)
    assert eps == pytest.approx(3.18899156, abs=1e-6)


def test_resume_counts_one_release_more_than_the_checkpoint_recorded():
    """The next round's model may have reached the hospitals before the coordinator stopped."""
    from server.history import RunHistory
    from server.server_app import _releases_before

    assert _releases_before(RunHistory()) == 0  # a fresh run
    spent = {r: {"epsilon": 0.5 * r, "delta": 1e-5, "releases": r} for r in (1, 2)}
    assert _releases_before(RunHistory(central_privacy=spent)) == 3


def test_coordinator_adds_calibrated_noise_and_accounts_each_round(default_cfg):
    default_cfg.update({"dp.level": "client", "simulation.hospitals": 4})
    run = RunConfig.from_run_config(default_cfg)
    sigma, clip, hospitals = 2.0, 0.5, 4
    strategy = with_client_dp(
        build_strategy(run.strategy, weighted_by_key=UNIT_WEIGHT_KEY),
        noise_multiplier=sigma, clipping_norm=clip, hospitals=hospitals, delta=1e-5,
    )  # fmt: skip
    zeros = {"w": np.zeros(200_000, dtype=np.float32)}
    grid_nodes = list(range(1, hospitals + 1))

    class _Grid:  # only what FedAvg.configure_train reads: the connected node ids
        def get_node_ids(self):  # type: ignore[no-untyped-def]
            return grid_nodes

    for rnd in (1, 2):
        sent = list(
            strategy.configure_train(
                rnd, ArrayRecord({k: Array(v) for k, v in zeros.items()}), ConfigRecord({}), _Grid()
            )
        )
        assert len(sent) == hospitals
        assert all(m.content["config"][KEY_CLIPPING_NORM] == clip for m in sent)
        noisy, _ = strategy.aggregate_train(rnd, [_reply(zeros, n) for n in grid_nodes])
        std = float(np.std(noisy["w"].numpy()))
        # Flower adds N(0, (σ C / n)^2) to the mean of n clipped updates
        assert std == pytest.approx(sigma * clip / hospitals, rel=0.02)
        eps, delta, releases = privacy_spent(strategy)
        assert releases == rnd
        assert eps == pytest.approx(client_dp_epsilon(sigma, rnd, 1e-5, hospitals), rel=1e-9)
        assert delta == 1e-5


def test_hospital_clips_its_update_to_the_norm(default_cfg):
    default_cfg.update(
        {"dp.level": "client", "dp.client-clipping-norm": 0.05, "train.rounds": 2,
         "train.lr": 2.0, "simulation.hospitals": 3}
    )  # fmt: skip
    ctx = make_context(default_cfg, {"partition-id": 0, "num-partitions": 3})
    model = build_model("mlp", n_features=30)
    request = make_request("train", model)
    request.content["config"][KEY_CLIPPING_NORM] = 0.05
    reply = client_app(request, ctx)
    assert not reply.has_error(), reply.error
    sent = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    new = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    norm = math.sqrt(sum(float(np.sum((new[k] - sent[k]) ** 2)) for k in sent))
    assert norm == pytest.approx(0.05, rel=1e-4)  # clipped to exactly C (it was larger)
    metrics = reply.content["metrics"]
    assert metrics[UNIT_WEIGHT_KEY] == 1.0 and "epsilon" not in metrics  # no DP-SGD here
    # a coordinator that drops the clipping norm, or loosens it, is refused (nothing trained)
    for norm in (None, 5.0):
        request = make_request("train", model, server_round=2)
        if norm is not None:
            request.content["config"][KEY_CLIPPING_NORM] = norm
        refused = client_app(request, ctx)
        assert refused.has_error() and "dp.client-clipping-norm = 0.05" in refused.error.reason
    # in a sample-level run the mod passes train requests through unclipped
    default_cfg["dp.level"] = "sample"
    plain = client_app(
        make_request("train", model),
        make_context(default_cfg, {"partition-id": 0, "num-partitions": 3}),
    )
    moved = {k: a.numpy() for k, a in plain.content["arrays"].items()}
    assert math.sqrt(sum(float(np.sum((moved[k] - sent[k]) ** 2)) for k in sent)) > 0.05


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"strategy.name": "fedadam"}, "needs strategy.name fedavg or fedprox"),
        ({"strategy.fraction-train": 0.5}, "fraction-train = 1.0"),
        ({"dp.client-clipping-norm": 0.0}, "dp.client-clipping-norm"),
    ],
)
def test_client_level_config_errors(default_cfg, override, message):
    default_cfg.update({"dp.level": "client", **override})
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config(default_cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"strategy.name": "krum"}, "secure aggregation hides"),
        ({"secagg.num-shares": 2}, "as a count must be > 2"),
        ({"secagg.num-shares": 4, "secagg.reconstruction-threshold": 4}, "must be below"),
        ({"secagg.reconstruction-threshold": 2.5}, "a count"),
    ],
)
def test_secagg_config_errors(default_cfg, override, message):
    default_cfg.update({"secagg.enabled": True, **override})
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_run_config(default_cfg)
