"""Non-private baselines on the same simulated hospitals and test splits.

``pooled``: one model trained centrally on all hospitals' training data (the upper reference that
federated learning tries to approach). ``local``: each hospital trains alone on its own data and
is tested on its own test split (what a hospital gets without joining). Both use the same model,
optimizer, learning rate and number of epochs as the federated run, without DP.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import ConcatDataset, Dataset

from client.training import steps_per_round, train_round
from shared_models.config import RunConfig
from shared_models.metrics import binary_metrics, operating_point_metrics
from shared_models.models import model_for_run, predict_proba
from shared_models.tasks import SiteData


def _fit(run: RunConfig, data: Dataset):  # -> nn.Module
    model, _ = model_for_run(run)
    epochs = run.train.rounds * run.train.local_epochs
    train_round(
        model, data,
        steps=steps_per_round(len(data), run.train.batch_size, epochs),
        batch_size=run.train.batch_size, lr=run.train.lr, momentum=run.train.momentum,
        dp=None, seed=run.train.seed,
    )  # fmt: skip
    return model


def compute_baselines(run: RunConfig, sites: tuple[SiteData, ...]) -> dict[str, dict[str, Any]]:
    """Pooled and local non-private baselines: AUROC, accuracy, AUPRC and the operating point at
    sensitivity 0.8 on the pooled test splits, and the unweighted mean of per-hospital test
    accuracies."""
    x_test = np.concatenate([s.x_test for s in sites])
    y_test = np.concatenate([s.y_test for s in sites])

    pooled = _fit(run, ConcatDataset([s.train_set() for s in sites]))
    pooled_scores = predict_proba(pooled, x_test)
    overall = binary_metrics(y_test, pooled_scores)
    per_site = [binary_metrics(s.y_test, predict_proba(pooled, s.x_test)).accuracy for s in sites]
    out = {
        "pooled (centralised, non-private)": {
            "auroc": overall.auroc,
            "accuracy": overall.accuracy,
            "mean_client_accuracy": float(np.mean([a for a in per_site if a is not None])),
            "privacy": "none",
            **operating_point_metrics(y_test, pooled_scores)[0],
        }
    }
    local_acc, scores = [], []
    for s in sites:
        model = _fit(run, s.train_set())
        p = predict_proba(model, s.x_test)
        scores.append(p)
        local_acc.append(binary_metrics(s.y_test, p).accuracy)
    local = binary_metrics(y_test, np.concatenate(scores))
    out["local (each hospital alone, non-private)"] = {
        "auroc": local.auroc,
        "accuracy": local.accuracy,
        "mean_client_accuracy": float(np.mean([a for a in local_acc if a is not None])),
        "privacy": "none",
        **operating_point_metrics(y_test, np.concatenate(scores))[0],
    }
    return out
