"""DP's randomness cannot be reproduced outside the hospital (client.secure_random, client.secure_dp).

The attack these tests keep out: a coordinator sends an MLP whose hidden units are all dead but
one, with batch size 1. The dead units' coordinates of the returned update are pure DP noise; a
search over the seeds of the noise generator finds the one that reproduces them, and subtracting
the regenerated noise leaves the sampled patient's clipped gradient. With torch's generator
seeded from ``secrets.randbits(64)`` that search covered 2**32 seeds (torch keeps the low 32
bits). Here every seed the code could consult is fixed, ``secrets`` is forced into a small
window, and no seed of that window, nor the global generators, reproduces the noise.
"""

from __future__ import annotations

import math
import random
import secrets
import traceback

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import TensorDataset

from client.evaluation import release_histograms
from client.secure_dp import SecurePoissonSampler
from client.secure_random import SecureRandom
from client.training import plan_dp, train_round
from shared_models.models import build_model
from tests.test_flower_internals import source_hash

N_FEATURES, HIDDEN, LR = 30, 32, 1.0


def _crafted_mlp() -> torch.nn.Module:
    """The coordinator's model: hidden unit 0 alive (bias 0), units 1..31 dead (bias -100)."""
    model = build_model("mlp", n_features=N_FEATURES, hidden=HIDDEN, seed=0)
    with torch.no_grad():
        model.net[0].bias.fill_(-100.0)
        model.net[0].bias[0] = 0.0
    return model


def _patients(n: int = 50) -> TensorDataset:
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(n, N_FEATURES)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def _plan():  # batch size 1, one step a round: the coordinator's choice
    return plan_dp(
        n_train=50, batch_size=1, local_epochs=0.02, rounds=5,
        target_epsilon=3.0, target_delta=1e-3, max_grad_norm=1.0,
    )  # fmt: skip


def _released_noise(randomness: SecureRandom | None = None) -> torch.Tensor:
    """One DP step on the crafted model, every non-cryptographic seed fixed; returns the noise
    of the dead units' first-layer weights ``[31, 30]`` as the coordinator reads it off the
    update (``-delta * B / lr``; their clipped gradient is exactly 0)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = _crafted_mlp()
    before = model.net[0].weight.detach().clone()
    plan = _plan()
    assert plan.steps_per_round == 1
    train_round(
        model, _patients(), steps=1, batch_size=1, lr=LR, dp=plan, seed=0, randomness=randomness
    )
    return (before - model.net[0].weight.detach())[1:] * 1 / LR  # expected batch size 1


@pytest.fixture
def small_seed_window(monkeypatch):
    """``secrets`` (and ``random.getrandbits``) answer from a 64-value window, so that a seed
    taken from them would be found by searching it."""
    counter = iter(range(10**6))
    window = lambda k: next(counter) % 64  # noqa: E731
    monkeypatch.setattr(secrets, "randbits", window)
    monkeypatch.setattr(random, "getrandbits", window)
    return range(64)


def test_the_dead_unit_attack_cannot_regenerate_the_noise(small_seed_window):
    first, second = _released_noise(), _released_noise()
    sigma = _plan().noise_multiplier  # C = 1, B = 1, lr = 1: the noise itself
    assert 0.8 * sigma < float(first.std()) < 1.2 * sigma  # the release is noise, as planned
    assert float((first - second).abs().max()) > 0.1 * sigma  # two steps, two different draws
    candidates = []
    for seed in small_seed_window:  # the attacker's search, Opacus' draw order (param 0 first)
        generator = torch.Generator().manual_seed(seed)
        candidates.append(torch.normal(0.0, sigma, size=(HIDDEN, N_FEATURES), generator=generator))
        torch.manual_seed(seed)  # Opacus without a generator draws from the global one
        candidates.append(torch.normal(0.0, sigma, size=(HIDDEN, N_FEATURES)))
        rng = np.random.default_rng(seed)
        candidates.append(torch.from_numpy(rng.normal(0.0, sigma, size=(HIDDEN, N_FEATURES))))
    for released in (first, second):
        for noise in candidates:
            assert not torch.allclose(noise[1:].float(), released, rtol=1e-4, atol=1e-6)


def test_the_noise_path_draws_from_no_torch_or_numpy_generator(monkeypatch):
    """A spy on every draw of torch's, numpy's and Python's generators during a DP round finds
    none, except the worker seed torch's DataLoader iterator takes from the global generator
    (``_BaseDataLoaderIter.__init__``: it seeds worker processes; fedcare uses none)."""
    calls: list[tuple[str, str]] = []

    def spy(name, original):  # type: ignore[no-untyped-def]
        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            caller = traceback.extract_stack(limit=2)[0]
            calls.append((name, f"{caller.filename}:{caller.name}"))
            return original(*args, **kwargs)

        return wrapped

    model = build_model("mlp", n_features=N_FEATURES, hidden=HIDDEN, seed=0)
    data = _patients()
    plan = plan_dp(
        n_train=50, batch_size=10, local_epochs=1, rounds=1,
        target_epsilon=3.0, target_delta=1e-3, max_grad_norm=1.0,
    )  # fmt: skip
    for name in ("normal", "randn", "rand", "randint", "randperm", "bernoulli", "poisson"):
        monkeypatch.setattr(torch, name, spy(f"torch.{name}", getattr(torch, name)))
    for name in ("normal_", "uniform_", "bernoulli_", "random_", "exponential_"):
        monkeypatch.setattr(torch.Tensor, name, spy(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for name in ("normal", "standard_normal", "rand", "randn", "random", "default_rng"):
        monkeypatch.setattr(np.random, name, spy(f"np.random.{name}", getattr(np.random, name)))
    monkeypatch.setattr(random, "gauss", spy("random.gauss", random.gauss))
    train_round(model, data, steps=plan.steps_per_round, batch_size=10, lr=0.1, dp=plan)
    worker_seed = ("Tensor.random_", f"{torch.utils.data.dataloader.__file__}:__init__")
    assert [call for call in calls if call != worker_seed] == []


def test_with_a_fixed_key_the_noise_is_reproducible_whatever_the_other_seeds():
    """The key is the only source: a fixed key reproduces the release exactly although torch's,
    numpy's and Python's seeds differ between the two runs; another key does not."""
    releases = []
    for key, other_seed in ((bytes(32), 1), (bytes(32), 2), (b"\x01" * 32, 1)):
        torch.manual_seed(other_seed)
        np.random.seed(other_seed)
        random.seed(other_seed)
        model = build_model("mlp", n_features=N_FEATURES, hidden=HIDDEN, seed=0)
        plan = plan_dp(
            n_train=50, batch_size=10, local_epochs=1, rounds=1,
            target_epsilon=3.0, target_delta=1e-3, max_grad_norm=1.0,
        )  # fmt: skip
        train_round(
            model, _patients(), steps=plan.steps_per_round, batch_size=10, lr=0.1, dp=plan,
            seed=other_seed, randomness=SecureRandom(key),
        )  # fmt: skip
        releases.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(releases[0], releases[1])
    assert not torch.allclose(releases[0], releases[2])


def test_secure_normal_is_standard_normal():
    z = SecureRandom(bytes(32)).standard_normal(200_001)  # odd: the last pair is cut
    assert z.shape == (200_001,) and z.dtype == np.float64
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01
    assert stats.kstest(z, "norm").pvalue > 0.01  # a fixed key: the same sample every run
    assert float(np.abs(z).max()) < math.sqrt(-2 * math.log(2.0**-53))  # Box-Muller's bound


def test_secure_poisson_sampling_rate_and_independence():
    randomness = SecureRandom(bytes(32))
    sampler = SecurePoissonSampler(num_samples=1000, sample_rate=0.05, randomness=randomness)
    batches = [b for _ in range(20) for b in sampler]  # 20 epochs of 20 batches
    sizes = np.array([len(b) for b in batches])
    assert len(batches) == 400 and len(set(map(tuple, batches))) == 400
    assert abs(sizes.mean() - 50) < 2.5  # 50 expected, sd of the mean 0.34
    assert 0.8 * math.sqrt(47.5) < sizes.std() < 1.2 * math.sqrt(47.5)  # binomial spread
    counts = np.bincount(np.concatenate(batches), minlength=1000)
    assert stats.chisquare(counts).pvalue > 0.01  # every patient equally likely


def test_bernoulli_edges_and_key_length():
    randomness = SecureRandom(bytes(32))
    assert not randomness.bernoulli(0.0, 1000).any()
    assert randomness.bernoulli(1.0, 1000).all()
    with pytest.raises(ValueError, match="32 bytes"):
        SecureRandom(b"short")
    assert SecureRandom().bytes(16) != SecureRandom().bytes(16)  # keys from the OS CSPRNG


def test_evaluation_releases_are_whole_numbers_with_the_planned_noise():
    y = np.array([0] * 60 + [1] * 40, dtype=np.float32)
    scores = np.linspace(0.01, 0.99, 100)
    randomness = SecureRandom(bytes(32))
    exact = np.concatenate(release_histograms(y, scores, noise_multiplier=1e-9))
    noisy = np.array(
        [
            np.concatenate(
                release_histograms(y, scores, noise_multiplier=5.0, randomness=randomness)
            )
            for _ in range(100)
        ]
    )
    assert np.array_equal(noisy, np.rint(noisy))  # nothing of the float representation leaves
    measured = float((noisy - exact).std())
    assert 0.95 * 5.0 < measured < 1.05 * 5.0  # sqrt(25 + 1/12) with the rounding
    assert not np.array_equal(
        release_histograms(y, scores, noise_multiplier=5.0),
        release_histograms(y, scores, noise_multiplier=5.0),
    )


def _overflowing_patient_round(*, secure: bool, with_target: bool) -> torch.Tensor:
    """One DP step at sample rate 1 on an MLP whose output weights are 1e6 (allowed), with or
    without a patient whose (finite) value makes their gradient overflow float32: the returned
    flat weights, from fedcare's engine (``secure``) or Opacus' own."""
    from opacus import PrivacyEngine

    from client.secure_dp import SecurePrivacyEngine

    data = _patients(20)
    x, y = data.tensors
    if with_target:
        x, y = x.clone(), y.clone()
        x[0, 0], y[0] = 1e33, 0.0  # a finite value; times 1e6 in the backward pass: inf
    model = build_model("mlp", n_features=N_FEATURES, hidden=HIDDEN, seed=0)
    with torch.no_grad():
        model.net[0].weight.fill_(0.01)  # every hidden unit passes the patient's value on
        model.net[2].weight.fill_(1e6)
    loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=len(x))
    engine = (
        SecurePrivacyEngine(accountant="rdp", randomness=SecureRandom())
        if secure
        else PrivacyEngine()
    )
    net, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1e-3), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
    )  # fmt: skip
    optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(net(x), y).backward()
    optimizer.step()
    net.cleanup()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_one_patients_overflowing_gradient_cannot_turn_the_update_into_nan():
    """Crafted global weights (finite, below the 1e6 bound) make one patient's gradient
    overflow. With Opacus' clipping the whole update becomes NaN exactly when that patient is
    in the batch (the attack's precondition, shown on Opacus' own engine); fedcare's engine
    zeroes that example's gradient, so the update is finite either way and the sensitivity
    stays C."""
    assert torch.isnan(_overflowing_patient_round(secure=False, with_target=True)).any()
    assert torch.isfinite(_overflowing_patient_round(secure=False, with_target=False)).all()
    for with_target in (True, False):
        assert torch.isfinite(
            _overflowing_patient_round(secure=True, with_target=with_target)
        ).all()


def test_ghost_clipping_is_refused_for_dp_training():
    from client.secure_dp import check_private_mode

    check_private_mode("hooks")
    check_private_mode("functorch")
    with pytest.raises(ValueError, match="sums the examples' gradients before each can be"):
        check_private_mode("ghost")
    plan = _plan()
    with pytest.raises(ValueError, match="dp.grad-sample-mode = 'ghost' is not accepted"):
        train_round(
            _crafted_mlp(), _patients(), steps=1, batch_size=1, lr=LR, dp=plan,
            grad_sample_mode="ghost",
        )  # fmt: skip


# Opacus' private code that client/secure_dp.py overrides, mirrors or calls, pinned by source:
# an Opacus upgrade that changes one fails here; re-check client/secure_dp.py, then update.
OPACUS_PINNED = {
    "opacus.privacy_engine:PrivacyEngine.make_private": "df2d90dcbe7d1786",
    "opacus.privacy_engine:PrivacyEngine._prepare_optimizer": "64580519904ec063",
    "opacus.privacy_engine:PrivacyEngine._prepare_data_loader": "64d149ce58648002",
    "opacus.optimizers.optimizer:DPOptimizer.add_noise": "4380705bf5d8f89b",
    "opacus.optimizers.optimizer_fast_gradient_clipping:"
    "DPOptimizerFastGradientClipping.add_noise": "bb77e6ade482875a",
    "opacus.optimizers:get_optimizer_class": "dc115f8fdb9d40d2",
    "opacus.data_loader:DPDataLoader.__init__": "907c7d67b05d6bdb",
    "opacus.data_loader:DPDataLoader.from_data_loader": "2327af954ae7b49b",
    "opacus.optimizers.optimizer:DPOptimizer.clip_and_accumulate": "28dc9fe15da665d3",
    "opacus.optimizers.optimizer:DPOptimizer.grad_samples.fget": "6d410a4618184853",
    "opacus.optimizers.optimizer:DPOptimizer._get_flat_grad_sample": "a9aed91bbcb2091a",
    "opacus.utils.uniform_sampler:UniformWithReplacementSampler.__iter__": "af6b9adbea9ec9a4",
}


def test_the_opacus_code_secure_dp_relies_on_is_unchanged():
    changed = [name for name, pin in OPACUS_PINNED.items() if source_hash(name) != pin]
    assert not changed, (
        f"Opacus' {', '.join(changed)} changed since client/secure_dp.py was written against "
        "opacus 1.6.0: re-check that module against the new source, then update the hash here"
    )


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_secure_clipping_equals_opacus_clipping_on_finite_gradients(mode):
    """Without noise, fedcare's optimizer leaves exactly Opacus' clipped mean gradient."""
    from opacus import PrivacyEngine

    from client.secure_dp import SecurePrivacyEngine

    x, y = _patients(40).tensors
    grads = []
    for engine in (
        PrivacyEngine(),
        SecurePrivacyEngine(accountant="rdp", randomness=SecureRandom()),
    ):
        model = build_model("mlp", n_features=N_FEATURES, hidden=HIDDEN, seed=4)
        loader = torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=len(x))
        net, optimizer, _ = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.05,
            poisson_sampling=False, grad_sample_mode=mode,
        )  # fmt: skip
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net(x), y).backward()
        optimizer.pre_step()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        net.cleanup()
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(*grads, strict=True))
