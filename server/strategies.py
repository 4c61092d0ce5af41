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


def _common(cfg: StrategyConfig, weighted_by_key: str) -> dict[str, Any]:
    return {
        "weighted_by_key": weighted_by_key,
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": cfg.min_evaluate_nodes,
        "min_available_nodes": cfg.min_available_nodes,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }


STRATEGIES: dict[str, Callable[[StrategyConfig, str], fl.Strategy]] = {
    "fedavg": lambda c, k: fl.FedAvg(**_common(c, k)),
    # FedAvg with server momentum (Hsu et al. 2019, arXiv:1909.06335), server learning rate 1
    "fedavgm": lambda c, k: fl.FedAvgM(
        **_common(c, k), server_learning_rate=1.0, server_momentum=c.server_momentum
    ),
    # FedProx only sends `proximal-mu`; client.training applies the proximal term
    "fedprox": lambda c, k: fl.FedProx(**_common(c, k), proximal_mu=c.proximal_mu),
    "fedadam": lambda c, k: fl.FedAdam(**_common(c, k), eta=c.server_lr),
    "fedyogi": lambda c, k: fl.FedYogi(**_common(c, k), eta=c.server_lr),
    "fedmedian": lambda c, k: fl.FedMedian(**_common(c, k)),
    "fedtrimmedavg": lambda c, k: fl.FedTrimmedAvg(**_common(c, k), beta=c.trim_beta),
    "krum": lambda c, k: fl.Krum(**_common(c, k), num_malicious_nodes=c.num_malicious_nodes),
}


def build_strategy(cfg: StrategyConfig, *, weighted_by_key: str = "num-examples") -> fl.Strategy:
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
    return STRATEGIES[cfg.name](cfg, weighted_by_key)


def client_dp_accountant(delta: float, hospitals: int):  # type: ignore[no-untyped-def]
    """Flower's RDP accountant for client-level DP over ``hospitals`` hospitals, all of them in
    every round (no amplification by sampling is claimed).

    Source: ``flwr.supercore.privacy_accounting.RdpAccountant`` (Google ``dp-accounting``).
    """
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=hospitals,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


def client_dp_epsilon(noise_multiplier: float, rounds: int, delta: float, hospitals: int) -> float:
    """ε after ``rounds`` Gaussian releases of the clipped mean with ``noise_multiplier``.

    Without amplification by sampling, ε does not depend on the number of ``hospitals``.
    """
    return _composed_accountant(noise_multiplier, delta, hospitals, rounds).get_epsilon(delta)


def _composed_accountant(noise_multiplier: float, delta: float, hospitals: int, releases: int):  # type: ignore[no-untyped-def]
    """:func:`client_dp_accountant` after ``releases`` identical Gaussian releases."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    accountant = client_dp_accountant(delta, hospitals)
    if releases:
        accountant.compose(GaussianPrivacyEvent(noise_multiplier, hospitals, hospitals), releases)
    return accountant


def calibrate_client_noise(
    target_epsilon: float, delta: float, rounds: int, hospitals: int
) -> float:
    """Smallest noise multiplier whose ε after ``rounds`` releases is <= ``target_epsilon``.

    ``dp_accounting.calibrate_dp_mechanism`` (Brent's method) over the RDP accountant that
    Flower's :func:`client_dp_accountant` wraps, with the same neighbouring relation and
    orders, so the ε Flower reports for the returned sigma stays within the target. Without
    amplification by sampling it does not depend on ``hospitals``.

    Raises
    ------
    ValueError
        No noise multiplier reaches the target (from ``dp_accounting``).
    """
    from dp_accounting import calibrate_dp_mechanism, dp_event, rdp
    from dp_accounting.privacy_accountant import NeighboringRelation

    return float(
        calibrate_dp_mechanism(
            lambda: rdp.RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE),
            lambda sigma: dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma), rounds),
            target_epsilon,
            delta,
        )
    )


def with_client_dp(
    strategy: fl.Strategy, *, noise_multiplier: float, clipping_norm: float, hospitals: int,
    delta: float, releases_done: int = 0,
) -> fl.Strategy:  # fmt: skip
    """Wrap ``strategy`` in Flower's ``DifferentialPrivacyClientSideFixedClipping`` (the
    hospitals clip with ``fixedclipping_mod``) with Flower's RDP accountant; a resumed run
    composes the ``releases_done`` releases it already made (every release is the same event).

    Raises
    ------
    ValueError
        From Flower: noise multiplier <= 0, clipping norm <= 0, fewer than 1 hospital.

    Source: Flower ``flwr.serverapp.strategy.DifferentialPrivacyClientSideFixedClipping``;
    McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018.
    """
    accountant = _composed_accountant(noise_multiplier, delta, hospitals, releases_done)
    return fl.DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=noise_multiplier, clipping_norm=clipping_norm,
        num_sampled_clients=hospitals, accountant=accountant,
    )  # fmt: skip


def _unwrap(strategy: fl.Strategy) -> fl.Strategy:
    """The strategy inside fedcare's :class:`ScheduledStrategy` wrapper (if any)."""
    return strategy.inner if isinstance(strategy, ScheduledStrategy) else strategy


def privacy_spent(strategy: fl.Strategy) -> tuple[float, float, int] | None:
    """(ε, δ, number of releases) of a client-level DP strategy so far, else None."""
    inner = _unwrap(strategy)
    if isinstance(inner, fl.DifferentialPrivacyClientSideFixedClipping):
        spent = inner.privacy_spent()
        if spent is not None:
            return spent.epsilon, spent.delta, spent.num_releases
    return None


# attributes of Flower strategies that carry state between rounds: the FedOpt family's moments
# (FedAdam, FedYogi, FedAdagrad: dicts of layer name -> numpy array) and FedAvgM's momentum
# (a list of numpy arrays, in layer order)
STATEFUL_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def strategy_state(strategy: fl.Strategy) -> dict[str, np.ndarray]:
    """The strategy's between-round state as flat arrays (``"m_t/<layer>"``), for checkpoints."""
    inner = _unwrap(strategy)
    inner = getattr(inner, "strategy", inner)  # inside a DP wrapper
    out: dict[str, np.ndarray] = {}
    for attr in STATEFUL_ATTRIBUTES:
        value = getattr(inner, attr, None)
        if isinstance(value, dict):
            out.update({f"{attr}/{k}": np.asarray(v) for k, v in value.items()})
        elif isinstance(value, list):
            out.update({f"{attr}/{i}": np.asarray(v) for i, v in enumerate(value)})
    return out


def load_strategy_state(strategy: fl.Strategy, arrays: dict[str, np.ndarray]) -> None:
    """Restore what :func:`strategy_state` saved (e.g. FedAdam's first and second moments)."""
    inner = _unwrap(strategy)
    inner = getattr(inner, "strategy", inner)  # inside a DP wrapper
    for attr in STATEFUL_ATTRIBUTES:
        part = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(attr + "/")}
        if part:
            lists = attr == "momentum_vector"  # FedAvgM's: a list in layer order
            setattr(inner, attr, [part[str(i)] for i in range(len(part))] if lists else part)


class ScheduledStrategy(fl.Strategy):
    """Wraps a Flower strategy with the run's round numbering and evaluation schedule.

    Flower's ``Strategy.start`` counts rounds from 1 and evaluates after every round. A resumed
    run continues the numbering: ``offset`` (the rounds already completed) is added to the round
    every hook sees, so hospitals, checkpoints and reports see rounds ``offset + 1 ...``. And a
    federated evaluation costs privacy at hospitals that release noisy counts, so it only runs on
    the rounds ``evaluates(round)`` selects (``RunConfig.evaluates_in_round``: every
    ``eval.every``-th round and the last); on the others no evaluate message is sent.
    Everything else is the inner strategy's own behaviour.
    """

    def __init__(
        self, inner: fl.Strategy, *, offset: int = 0, evaluates: Callable[[int], bool]
    ) -> None:
        self.inner = inner
        self.offset = offset
        self.evaluates = evaluates

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        if not self.evaluates(server_round + self.offset):
            return []
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)
