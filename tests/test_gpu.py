"""Training on CUDA (skipped without a GPU): the chest X-ray CNN really trains on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from client.dp_modes import grad_sample_mode_for
from client.training import plan_dp, resolve_device, train_round
from shared_models.models import build_model, predict_proba

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def test_dp_round_on_cuda_keeps_model_and_data_on_the_gpu():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (512, 1, 28, 28)).astype(np.float32)
    y = (np.arange(512) % 2).astype(np.float32)
    x[y == 1, :, 8:20, 8:20] += 0.8  # learnable
    model = build_model("cnn", input_shape=(1, 28, 28))
    plan = plan_dp(n_train=512, batch_size=128, local_epochs=4, rounds=1, target_epsilon=8,
                   target_delta=1e-5, max_grad_norm=1.0)  # fmt: skip
    device = resolve_device("cuda")
    result = train_round(
        model, TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        steps=plan.total_steps, batch_size=128, lr=2.0, dp=plan, device=device,
        grad_sample_mode=grad_sample_mode_for(model),
    )  # fmt: skip
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert result.epsilon is not None and 0 < result.epsilon <= 8
    scores = predict_proba(model, x, device=device)
    assert scores[y == 1].mean() > scores[y == 0].mean()
