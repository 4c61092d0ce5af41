"""Model registry. Every model is Opacus-compatible (no BatchNorm; checked by a test with
``opacus.validators.ModuleValidator.validate(model, strict=True)``).

A builder takes the shape of one example (``input_shape``, e.g. ``(30,)`` for a tabular task,
``(48, 46, 3)`` for ICU stays: :mod:`shared_models.sequence_models`) and the run's
``model.hidden`` width; every model maps a batch ``[B, *input_shape]`` to logits
``[B]`` of the positive class.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .image_models import ChestCNN, ScatterLinear
from .sequence_models import GRUClassifier, SummaryLogisticRegression, TemporalCNN

if TYPE_CHECKING:
    from .config import RunConfig


class LogisticRegression(nn.Module):
    """Logistic regression: one linear layer producing a logit.

    ``x: [B, *input_shape] float32 -> logits: [B] float32`` (inputs are flattened).
    """

    grad_sample_mode = "hooks"  # measured fastest matching mode: benchmarks/dp_overhead.py

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)).squeeze(-1)  # [B]


class MLP(nn.Module):
    """Two-layer perceptron with a ReLU hidden layer.

    ``x: [B, *input_shape] float32 -> logits: [B] float32`` (inputs are flattened).
    """

    grad_sample_mode = "hooks"  # measured fastest matching mode: benchmarks/dp_overhead.py

    def __init__(self, n_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_features, hidden),  # [B, H]
            nn.ReLU(),
            nn.Linear(hidden, 1),  # [B, 1]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).squeeze(-1)  # [B]


ModelBuilder = Callable[[tuple[int, ...], int], nn.Module]  # (input_shape, hidden) -> model

_INIT_LOCK = threading.Lock()

MODELS: dict[str, ModelBuilder] = {
    "logreg": lambda shape, hidden: LogisticRegression(math.prod(shape)),
    "mlp": lambda shape, hidden: MLP(math.prod(shape), hidden),
    "cnn": lambda shape, hidden: ChestCNN(shape),
    "scatter-linear": lambda shape, hidden: ScatterLinear(shape),
    "icu-logreg": lambda shape, hidden: SummaryLogisticRegression(shape),
    "icu-tcn": lambda shape, hidden: TemporalCNN(shape, hidden),
    "icu-gru": lambda shape, hidden: GRUClassifier(shape, hidden),
}


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...] | None = None,
    n_features: int | None = None,
    hidden: int = 32,
    seed: int = 0,
) -> nn.Module:
    """Build the registered model ``name`` with deterministic initial weights.

    Parameters
    ----------
    name : str
        Registry key (see :data:`MODELS`).
    input_shape : tuple[int, ...]
        Shape of one example; ``n_features=F`` is shorthand for ``input_shape=(F,)``.
    hidden : int
        Hidden width (models that have one).
    seed : int
        Seed for the initial weights, so that every party builds the same initial model.

    Raises
    ------
    ValueError
        Unknown name (the message lists the known models), or no input shape given.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    shape = input_shape if input_shape is not None else (n_features,) if n_features else None
    if shape is None:
        raise ValueError("build_model needs input_shape (or n_features)")
    with _INIT_LOCK:  # threads (a simulation's ServerApp and its baselines) share torch's RNG
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return MODELS[name](tuple(shape), hidden)
        finally:
            torch.random.set_rng_state(gen_state)


def model_for_run(run: RunConfig) -> tuple[nn.Module, dict[str, object]]:
    """The run's model (task's input shape, ``model.name`` resolved, ``train.seed`` init) and its
    description for model cards: ``{"name", "input_shape", "hidden"}``.

    Raises
    ------
    ValueError
        Unknown task or preprocessing, or a model that does not fit the task.
    """
    from .tasks import get_task

    task = get_task(run.task.name)
    preprocessing = task.resolve_preprocessing(run.task.preprocessing)
    shape = task.input_shape(preprocessing)
    name = task.resolve_model(run.model.name, preprocessing)
    model = build_model(name, input_shape=shape, hidden=run.model.hidden, seed=run.train.seed)
    return model, {"name": name, "input_shape": list(shape), "hidden": run.model.hidden}


@torch.no_grad()
def predict_proba(
    model: nn.Module, x: np.ndarray, *, device: str = "cpu", batch_size: int = 1024
) -> np.ndarray:
    """Probabilities of class 1: ``x [N, *input_shape] float32 -> [N] float64``, in batches."""
    model.to(device).eval()
    out = [
        torch.sigmoid(model(torch.from_numpy(x[i : i + batch_size]).to(device))).double().cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)
