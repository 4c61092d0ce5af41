"""Model registry. Every model is Opacus-compatible (no BatchNorm; checked by a test with
``opacus.validators.ModuleValidator.validate(model, strict=True)``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


class LogisticRegression(nn.Module):
    """Logistic regression: one linear layer producing a logit.

    ``x: [B, F] float32 -> logits: [B] float32``.
    """

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)  # [B]


class MLP(nn.Module):
    """Two-layer perceptron with a ReLU hidden layer.

    ``x: [B, F] float32 -> logits: [B] float32``.
    """

    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden),  # [B, H]
            nn.ReLU(),
            nn.Linear(hidden, 1),  # [B, 1]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # [B]


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "logreg": lambda n_features, hidden: LogisticRegression(n_features),
    "mlp": lambda n_features, hidden: MLP(n_features, hidden),
}


def build_model(name: str, *, n_features: int, hidden: int = 32, seed: int = 0) -> nn.Module:
    """Build the registered model ``name`` with deterministic initial weights.

    Parameters
    ----------
    name : str
        Registry key (``logreg`` or ``mlp``).
    n_features : int
        Input width F.
    hidden : int
        Hidden width (MLP only).
    seed : int
        Seed for the initial weights, so that every party builds the same initial model.

    Raises
    ------
    ValueError
        Unknown name; the message lists the known models.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return MODELS[name](n_features, hidden)
    finally:
        torch.random.set_rng_state(gen_state)


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, *, device: str = "cpu") -> np.ndarray:
    """Probabilities of class 1: ``x [N, F] float32 -> [N] float64``."""
    model.to(device).eval()
    logits = model(torch.from_numpy(x).to(device))
    return torch.sigmoid(logits).double().cpu().numpy()
