"""Strategy registry: Flower's own strategies (``flwr.serverapp.strategy``), chosen by name."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
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


# attributes of Flower strategies that carry state between rounds (FedOpt family: FedAdam,
# FedYogi, FedAdagrad moments); each is a dict of layer name -> numpy array
STATEFUL_ATTRIBUTES = ("m_t", "v_t")


def strategy_state(strategy: fl.Strategy) -> dict[str, np.ndarray]:
    """The strategy's between-round state as flat arrays (``"m_t/<layer>"``), for checkpoints."""
    inner = strategy.inner if isinstance(strategy, ResumedStrategy) else strategy
    out: dict[str, np.ndarray] = {}
    for attr in STATEFUL_ATTRIBUTES:
        value = getattr(inner, attr, None)
        if isinstance(value, dict):
            out.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
    return out


def load_strategy_state(strategy: fl.Strategy, arrays: dict[str, np.ndarray]) -> None:
    """Restore what :func:`strategy_state` saved (e.g. FedAdam's first and second moments)."""
    inner = strategy.inner if isinstance(strategy, ResumedStrategy) else strategy
    for attr in STATEFUL_ATTRIBUTES:
        part = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(attr + "/")}
        if part:
            setattr(inner, attr, part)


class ResumedStrategy(fl.Strategy):
    """Wraps a Flower strategy so a resumed run continues the round numbering.

    Flower's ``Strategy.start`` counts rounds from 1; this wrapper adds ``offset`` (the rounds
    already completed) to the round every hook sees, so hospitals, checkpoints and reports see
    rounds ``offset + 1 ...``. Everything else is the inner strategy's own behaviour.
    """

    def __init__(self, inner: fl.Strategy, offset: int) -> None:
        self.inner = inner
        self.offset = offset

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)
