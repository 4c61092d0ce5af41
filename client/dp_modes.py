"""Opacus' per-sample gradient modes: which one a model trains with, and what each computes.

Opacus offers several ways to get the per-sample gradient norms DP-SGD clips by (``hooks``:
per-layer per-sample gradients from the layer's activations and backprops; ``functorch``:
the same through ``torch.func.vmap``; ``ghost``: fast gradient clipping, the norms without the
per-sample gradients and a second backward pass weighted by the clipping coefficients, Li et
al. ICLR 2022, Bu et al. 2022). They compute the same clipped gradient, so the privacy
guarantee does not depend on the mode; their speed and memory do, per architecture.
``benchmarks/dp_overhead.py`` measures them for every registered model; each model class
records its fastest mode whose gradients match ``hooks`` (class attribute
``grad_sample_mode``), which is what run config ``dp.grad-sample-mode = "default"`` picks.
"""

from __future__ import annotations

import warnings

import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")


def grad_sample_mode_for(model: nn.Module, requested: str = "default") -> str:
    """The Opacus per-sample gradient mode to train ``model`` with.

    ``"default"`` -> the model class's measured mode (class attribute ``grad_sample_mode``;
    ``"hooks"``, Opacus' own default, for a model without one); other names pass through.

    Raises
    ------
    ValueError
        An unknown mode.
    """
    mode = getattr(model, "grad_sample_mode", "hooks") if requested == "default" else requested
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad-sample mode {mode!r}; choose one of {list(GRAD_SAMPLE_MODES)}")
    return mode


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
