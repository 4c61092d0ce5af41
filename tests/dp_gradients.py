"""One batch's DP-SGD gradient in each Opacus per-sample gradient mode, for
``tests/test_dp_modes.py`` and ``benchmarks/dp_overhead.py`` (not shipped: fedcare trains with
:func:`client.training.train_round`)."""

from __future__ import annotations

import warnings

import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_private_fixed(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mode: str,
    max_grad_norm: float = 1.0,
    noise_multiplier: float = 0.0,
    lr: float = 0.1,
):  # -> (private module, DPOptimizer, criterion)
    """Wrap ``model`` with Opacus for a fixed batch ``x [B, *shape]``, ``y [B]`` (benchmarks and
    tests: the data loader is left as it is, ``poisson_sampling=False``)."""
    criterion = nn.BCEWithLogitsLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure RNG off; hooks firing on inputs without grad
        engine = PrivacyEngine()
        out = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=lr),
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode=mode,
            criterion=criterion,
        )
    if mode == "ghost":
        net, optimizer, criterion, _ = out
    else:
        net, optimizer, _ = out
    return net, optimizer, criterion


def clipped_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, mode: str, max_grad_norm: float = 1.0
) -> list[torch.Tensor]:
    """The DP-SGD gradient of one batch without noise: per-sample gradients clipped to
    ``max_grad_norm`` (L2, flat), summed and divided by the batch size, as Opacus'
    ``DPOptimizer.pre_step`` leaves it in ``p.grad`` (one tensor per parameter).

    ``model`` is left unwrapped afterwards (its weights untouched).
    """
    net, optimizer, criterion = make_private_fixed(
        model, x, y, mode=mode, max_grad_norm=max_grad_norm
    )
    try:
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            criterion(net(x), y).backward()
        optimizer.pre_step()  # clip, add (zero) noise, scale
        return [p.grad.detach().clone() for p in model.parameters()]
    finally:
        if isinstance(net, AbstractGradSampleModule):
            net.cleanup()
