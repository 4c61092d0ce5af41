"""Strategy registry: Flower's own strategies (``flwr.serverapp.strategy``), chosen by name."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import strategy as fl

from shared_models.config import StrategyConfig

# keys whose aggregate is the worst (largest) hospital value, not a weighted mean
WORST_CASE_KEYS = frozenset({"epsilon", "delta"})


def aggregate_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Aggregate reply MetricRecords: weighted mean per key over the replies where it is defined.

    A metric reported as NaN (undefined at that hospital, e.g. AUROC on a one-class test split)
    is left out of that metric's mean instead of poisoning it. ``epsilon`` and ``delta`` take the
    maximum over hospitals (the worst-case privacy loss). Used as Flower's
    ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn`` hook.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    worst: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        w = float(metrics[weighted_by_key])  # type: ignore[arg-type]
        for key, value in metrics.items():
            if key == weighted_by_key or isinstance(value, list):
                continue
            v = float(value)
            if math.isnan(v):
                continue
            if key in WORST_CASE_KEYS:
                worst[key] = max(worst.get(key, -math.inf), v)
            else:
                sums[key] = sums.get(key, 0.0) + w * v
                weights[key] = weights.get(key, 0.0) + w
    out = MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})
    for key, value in worst.items():
        out[key] = value
    return out


def _common(cfg: StrategyConfig) -> dict[str, Any]:
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": cfg.min_evaluate_nodes,
        "min_available_nodes": cfg.min_available_nodes,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }


STRATEGIES: dict[str, Callable[[StrategyConfig], fl.Strategy]] = {
    "fedavg": lambda c: fl.FedAvg(**_common(c)),
    # FedProx only sends `proximal-mu`; client.training applies the proximal term
    "fedprox": lambda c: fl.FedProx(**_common(c), proximal_mu=c.proximal_mu),
    "fedadam": lambda c: fl.FedAdam(**_common(c), eta=c.server_lr),
    "fedyogi": lambda c: fl.FedYogi(**_common(c), eta=c.server_lr),
    "fedmedian": lambda c: fl.FedMedian(**_common(c)),
    "fedtrimmedavg": lambda c: fl.FedTrimmedAvg(**_common(c), beta=c.trim_beta),
    "krum": lambda c: fl.Krum(**_common(c), num_malicious_nodes=c.num_malicious_nodes),
}


def build_strategy(cfg: StrategyConfig) -> fl.Strategy:
    """Build the Flower strategy named ``cfg.name`` with the run's sampling settings.

    Raises
    ------
    ValueError
        Unknown strategy name; the message lists the known ones.
    """
    if cfg.name not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {cfg.name!r}; known strategies: {', '.join(sorted(STRATEGIES))}"
        )
    return STRATEGIES[cfg.name](cfg)
