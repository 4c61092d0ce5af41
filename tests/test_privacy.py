"""DP-SGD accounting and noise: pinned values and bands, so silently dropped noise fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import TensorDataset

from client.training import (
    PrivacyBudgetError,
    epsilon_spent,
    plan_dp,
    steps_per_round,
    train_round,
)
from shared_models.models import build_model


def _data(n=200, f=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.float32)
    return x, y


def _ds(x, y):
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def test_pinned_rdp_epsilon():
    """Opacus RDP: sigma=1.0, q=0.01, 1000 steps, delta=1e-5 -> epsilon 2.1014 (pinned)."""
    state = {"mechanism": "rdp", "history": [[1.0, 0.01, 1000]]}
    assert epsilon_spent(state, delta=1e-5) == pytest.approx(2.1013652716, abs=1e-6)


def test_calibration_pinned_and_within_target():
    plan = plan_dp(
        n_train=200, batch_size=20, local_epochs=1, rounds=3,
        target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1.0,
    )  # fmt: skip
    assert plan.sample_rate == pytest.approx(0.1)
    assert plan.steps_per_round == 10 and plan.total_steps == 30
    assert plan.noise_multiplier == pytest.approx(2.63671875)
    spent = epsilon_spent(
        {"mechanism": "rdp", "history": [[plan.noise_multiplier, 0.1, 30]]}, delta=1e-5
    )
    assert 0.98 <= spent <= 1.0  # reaches the target, never exceeds it


def test_delta_must_be_below_one_over_n():
    with pytest.raises(ValueError, match="not below 1/n"):
        plan_dp(
            n_train=50, batch_size=10, local_epochs=1, rounds=1,
            target_epsilon=1.0, target_delta=0.05, max_grad_norm=1.0,
        )  # fmt: skip


def test_cumulative_epsilon_equals_one_accountant_over_all_steps():
    """epsilon after k rounds == one Opacus accountant stepped over all k x steps."""
    x, y = _data()
    plan = plan_dp(
        n_train=len(y), batch_size=20, local_epochs=1, rounds=4,
        target_epsilon=2.0, target_delta=1e-5, max_grad_norm=1.0,
    )  # fmt: skip
    state, eps = None, []
    for rnd in range(4):
        model = build_model("logreg", n_features=5)
        res = train_round(
            model, _ds(x, y), steps=plan.steps_per_round, batch_size=20, lr=0.1,
            dp=plan, accountant_state=state, seed=rnd,
        )  # fmt: skip
        state = res.accountant_state
        eps.append(res.epsilon)
        reference = RDPAccountant()
        for _ in range((rnd + 1) * plan.steps_per_round):
            reference.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        assert res.epsilon == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-9)
    assert all(a < b for a, b in zip(eps, eps[1:], strict=False))  # strictly increasing
    assert eps[-1] <= 2.0


def test_exceeding_the_planned_steps_is_refused():
    x, y = _data()
    plan = plan_dp(
        n_train=len(y), batch_size=20, local_epochs=1, rounds=1,
        target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1.0,
    )  # fmt: skip
    res = train_round(build_model("logreg", n_features=5), _ds(x, y), steps=plan.steps_per_round,
                      batch_size=20, lr=0.1, dp=plan)  # fmt: skip
    with pytest.raises(PrivacyBudgetError, match="exceed the steps the run was calibrated for"):
        train_round(build_model("logreg", n_features=5), _ds(x, y), steps=plan.steps_per_round,
                    batch_size=20, lr=0.1, dp=plan, accountant_state=res.accountant_state)  # fmt: skip


def test_noise_magnitude_band():
    """With clipping at ~0 the update is pure noise: per step, each parameter moves by
    lr * sigma * C / B (B = expected batch size). The empirical std must sit in a two-sided band
    around that value: dropping the noise (std ~ 0) or doubling it fails."""
    x, y = _data(n=400, f=2000)  # 2001 weights: the std is estimated within ~2 %
    plan = plan_dp(
        n_train=400, batch_size=40, local_epochs=1, rounds=1,
        target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1e-6,
    )  # fmt: skip
    model = build_model("logreg", n_features=2000)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train_round(model, _ds(x, y), steps=1, batch_size=40, lr=1.0, dp=plan, seed=0)
    delta = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    expected = plan.noise_multiplier * 1e-6 / 40  # lr = 1
    assert 0.9 * expected < float(delta.std()) < 1.1 * expected


def test_non_private_training_learns():
    x, y = _data()
    model = build_model("logreg", n_features=5)
    res = train_round(
        model, _ds(x, y), steps=steps_per_round(len(y), 20, 5), batch_size=20, lr=0.5, dp=None
    )
    assert res.epsilon is None and res.accountant_state is None
    assert res.loss < 0.5


def test_clip_per_sample_is_the_dp_sgd_update_without_noise():
    """The non-private baselines of a DP run: one step moves the weights by exactly lr times the
    mean of the per-example gradients, each clipped to the norm (computed here one example at a
    time), and neither by the batch-clipped gradient nor by anything random."""
    x, y = _data(n=16)
    model = build_model("logreg", n_features=5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    clipped = []
    for i in range(16):
        model.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(torch.from_numpy(x[i : i + 1])), torch.from_numpy(y[i : i + 1])
        )
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        clipped.append(g * min(1.0, 0.05 / float(g.norm())))
    assert max(float(c.norm()) for c in clipped) == pytest.approx(0.05)  # clipping binds
    expected = -0.5 * torch.stack(clipped).mean(0)
    res = train_round(
        model, _ds(x, y), steps=1, batch_size=16, lr=0.5, dp=None, clip_per_sample=0.05
    )
    step = torch.cat([(model.state_dict()[k] - start[k]).flatten() for k in start])
    assert torch.allclose(step, expected, atol=1e-6)
    assert res.epsilon is None and res.accountant_state is None
    with pytest.raises(ValueError, match="non-private"):
        plan = plan_dp(n_train=16, batch_size=16, local_epochs=1, rounds=1, target_epsilon=1.0,
                       target_delta=1e-3, max_grad_norm=1.0)  # fmt: skip
        train_round(model, _ds(x, y), steps=1, batch_size=16, lr=0.5, dp=plan, clip_per_sample=1)


def test_fedprox_term_pulls_towards_global_weights():
    x, y = _data()
    free = build_model("logreg", n_features=5)
    prox = build_model("logreg", n_features=5)
    start = torch.cat([p.detach().flatten().clone() for p in free.parameters()])
    for model, mu in ((free, 0.0), (prox, 5.0)):
        train_round(
            model, _ds(x, y), steps=30, batch_size=20, lr=0.1, dp=None, proximal_mu=mu, seed=1
        )
    dist = [
        float((torch.cat([p.detach().flatten() for p in m.parameters()]) - start).norm())
        for m in (free, prox)
    ]
    assert dist[1] < 0.5 * dist[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_dp_training_runs_on_cuda():
    x, y = _data()
    plan = plan_dp(
        n_train=len(y), batch_size=20, local_epochs=1, rounds=1,
        target_epsilon=1.0, target_delta=1e-5, max_grad_norm=1.0,
    )  # fmt: skip
    model = build_model("mlp", n_features=5)
    res = train_round(
        model, _ds(x, y), steps=plan.steps_per_round, batch_size=20, lr=0.1, dp=plan, device="cuda"
    )
    assert next(model.parameters()).device.type == "cuda"
    assert 0 < res.epsilon <= 1.0
