"""Opacus per-sample gradient modes: every model's default mode computes the same clipped
gradient as Opacus' reference ``hooks`` mode, and the training loop runs in every mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from client.dp_modes import GRAD_SAMPLE_MODES, grad_sample_mode_for
from client.secure_dp import SANITISED_MODES
from client.training import DPPlan, train_round
from shared_models.models import build_model
from shared_models.tasks import TASKS
from tests.dp_gradients import clipped_gradient

_MODELS = sorted(
    {
        (task.name, model, tuple(task.input_shape(prep)))
        for task in TASKS.values()
        for prep in task.preprocessings
        for model in task.models_for(prep)
        if prep == task.resolve_preprocessing("default") or prep in task.preprocessing_models
    }
)


def _batch(shape, n=12):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((n, *shape), generator=gen)
    y = (torch.arange(n) % 2).float()
    return x, y


def _clipped(name, shape, mode, x, y):
    with torch.random.fork_rng():  # training-time augmentation draws the same in both
        torch.manual_seed(1)
        model = build_model(name, input_shape=shape, hidden=8, seed=3)
        return clipped_gradient(model, x, y, mode=mode, max_grad_norm=0.05)


@pytest.mark.parametrize(("task", "name", "shape"), _MODELS)
def test_default_mode_clips_like_hooks(task, name, shape):
    """The measured default (fastest matching mode) gives hooks' clipped gradient on a fixed
    batch; a small clipping norm makes sure every example is actually clipped."""
    mode = grad_sample_mode_for(build_model(name, input_shape=shape, hidden=8))
    x, y = _batch(shape)
    ref = _clipped(name, shape, "hooks", x, y)
    got = _clipped(name, shape, mode, x, y)
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
    # and it is the clipped gradient: its norm is at most the clipping norm (mean of <= C)
    assert torch.sqrt(sum((g**2).sum() for g in ref)) <= 0.05 + 1e-6


def test_unclipped_gradient_would_differ():
    """Guards the test above: without clipping (a huge norm) the gradient is another one."""
    shape = (1, 28, 28)
    x, y = _batch(shape)
    clipped = _clipped("cnn", shape, "hooks", x, y)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = build_model("cnn", input_shape=shape, hidden=8, seed=3)
        free = clipped_gradient(model, x, y, mode="hooks", max_grad_norm=1e6)
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(clipped, free, strict=True))


def test_unknown_mode():
    with pytest.raises(ValueError, match=r"grad-sample mode 'vmap'; choose one of"):
        grad_sample_mode_for(torch.nn.Linear(2, 1), "vmap")
    assert grad_sample_mode_for(torch.nn.Linear(2, 1)) == "hooks"  # Opacus' own default


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_train_round_in_every_mode(mode):
    """One DP round of the CNN: steps accounted, weights moved, Opacus' hooks removed."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (64, 1, 28, 28)).astype(np.float32))
    data = TensorDataset(x, torch.from_numpy((np.arange(64) % 2).astype(np.float32)))
    model = build_model("cnn", input_shape=(1, 28, 28))
    before = [p.detach().clone() for p in model.parameters()]
    plan = DPPlan(
        noise_multiplier=1.0, sample_rate=0.25, steps_per_round=3, total_steps=3,
        target_epsilon=10.0, target_delta=1e-5, max_grad_norm=1.0, accountant="rdp",
    )  # fmt: skip
    if mode not in SANITISED_MODES:  # ghost: no per-example gradients to check (test_secure_dp)
        with pytest.raises(ValueError, match="is not accepted for DP training"):
            train_round(model, data, steps=3, batch_size=16, lr=0.5, dp=plan, grad_sample_mode=mode)
        return
    result = train_round(
        model, data, steps=3, batch_size=16, lr=0.5, dp=plan, grad_sample_mode=mode
    )
    assert result.accountant_state is not None
    assert result.accountant_state["history"] == [[1.0, 0.25, 3]]
    assert result.epsilon is not None and result.epsilon > 0 and np.isfinite(result.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_augmentation_is_per_example_seeded_and_off_in_eval():
    """The CNN's training-time augmentation transforms each image by its own draw only (so
    per-sample clipping and accounting still hold), is reproducible from its seed, does
    nothing at evaluation, and keeps pixel values within the input's range."""
    from shared_models.image_models import RandomAffine, seed_augmentation

    augment = RandomAffine(15.0, 0.15, 2.0)
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    assert torch.equal(augment.eval()(x), x)
    augment.train()
    seed_augmentation(augment, 7)
    full = augment(x)
    seed_augmentation(augment, 7)
    changed = x.clone()
    changed[3] += 100.0  # another example's pixels change ...
    again = augment(changed)
    mask = torch.ones(6, dtype=torch.bool)
    mask[3] = False
    assert torch.equal(full[mask], again[mask])  # ... and no other output row moves
    assert not torch.allclose(full, x, atol=1e-3)
    assert full.min() >= -1 - 1e-5 and full.max() <= 1 + 1e-5  # bilinear, border replicated
    seed_augmentation(augment, 8)
    assert not torch.equal(augment(x), full)  # another seed, other draws
    off = RandomAffine(0.0, 0.0, 0.0).train()
    torch.testing.assert_close(off(x), x)


def test_augmentation_does_not_change_the_weights_layout():
    """Weights saved before augmentation existed still load (the module has no state)."""
    model = build_model("cnn", input_shape=(1, 28, 28), hidden=8)
    assert not any(k.startswith("augment") for k in model.state_dict())
    assert "features.0.weight" in model.state_dict()
