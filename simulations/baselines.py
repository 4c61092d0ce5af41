"""Non-private baselines on the same simulated hospitals and test splits.

``pooled``: one model trained centrally on all hospitals' training data (the upper reference that
federated learning tries to approach). ``local``: each hospital trains alone on its own data and
is tested on its own test split (what a hospital gets without joining). Both use the same model,
optimizer, learning rate and number of epochs as the federated run, without DP.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from client.training import steps_per_round, train_round
from shared_models.config import RunConfig
from shared_models.metrics import binary_metrics
from shared_models.models import build_model, predict_proba
from shared_models.tasks import SiteData, get_task


def _fit(run: RunConfig, x: np.ndarray, y: np.ndarray, n_features: int):  # -> nn.Module
    model = build_model(
        run.model.name, n_features=n_features, hidden=run.model.hidden, seed=run.train.seed
    )
    epochs = run.train.rounds * run.train.local_epochs
    train_round(
        model, x, y,
        steps=steps_per_round(len(y), run.train.batch_size, epochs),
        batch_size=run.train.batch_size, lr=run.train.lr, momentum=run.train.momentum,
        dp=None, seed=run.train.seed,
    )  # fmt: skip
    return model


def compute_baselines(run: RunConfig, sites: tuple[SiteData, ...]) -> dict[str, dict[str, Any]]:
    """Pooled and local non-private baselines: AUROC and accuracy on the pooled test splits,
    and the unweighted mean of per-hospital test accuracies."""
    task = get_task(run.task.name)
    n_features = task.n_features(task.resolve_preprocessing(run.task.preprocessing))
    x_test = np.concatenate([s.x_test for s in sites])
    y_test = np.concatenate([s.y_test for s in sites])

    pooled = _fit(
        run,
        np.concatenate([s.x_train for s in sites]),
        np.concatenate([s.y_train for s in sites]),
        n_features,
    )
    overall = binary_metrics(y_test, predict_proba(pooled, x_test))
    per_site = [binary_metrics(s.y_test, predict_proba(pooled, s.x_test)).accuracy for s in sites]
    out = {
        "pooled (centralised, non-private)": {
            "auroc": overall.auroc,
            "accuracy": overall.accuracy,
            "mean_client_accuracy": float(np.mean([a for a in per_site if a is not None])),
            "privacy": "none",
        }
    }
    local_acc, scores = [], []
    for s in sites:
        model = _fit(run, s.x_train, s.y_train, n_features)
        p = predict_proba(model, s.x_test)
        scores.append(p)
        local_acc.append(binary_metrics(s.y_test, p).accuracy)
    local = binary_metrics(y_test, np.concatenate(scores))
    out["local (each hospital alone, non-private)"] = {
        "auroc": local.auroc,
        "accuracy": local.accuracy,
        "mean_client_accuracy": float(np.mean([a for a in local_acc if a is not None])),
        "privacy": "none",
    }
    return out
