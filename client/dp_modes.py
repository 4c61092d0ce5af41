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
``tests/test_dp_modes.py`` checks that match (with ``tests/dp_gradients.py``).
"""

from __future__ import annotations

from torch import nn

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
