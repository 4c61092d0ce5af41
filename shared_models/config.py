"""Run settings, parsed once from Flower's run config into frozen dataclasses.

The schema (keys and defaults) is ``[tool.flwr.app.config]`` in pyproject.toml; this module
checks types and ranges and names the key and the allowed range on any error. After parsing,
no code indexes ``context.run_config[...]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

ConfigValue = bool | int | float | str


class ConfigError(ValueError):
    """A run-config key is missing, has the wrong type, or is out of range."""


def _get(cfg: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in cfg:
        raise ConfigError(f"run config key '{key}' is missing (declare it in pyproject.toml)")
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"run config key '{key}' must be {kind.__name__}, got {value!r} "
            f"({type(value).__name__})"
        )
    return value


def _in_range(key: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and value <= hi
    if not ok or (isinstance(value, float) and math.isnan(value)):
        left = "(" if lo_open else "["
        raise ConfigError(f"run config key '{key}' = {value!r} is outside {left}{lo}, {hi}]")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"run config key '{key}' = {value!r}; choose one of {list(choices)}")


@dataclass(frozen=True)
class TaskConfig:
    name: str
    preprocessing: str


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden: int


@dataclass(frozen=True)
class StrategyConfig:
    name: str
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    proximal_mu: float
    server_lr: float
    server_momentum: float
    trim_beta: float
    num_malicious_nodes: int


@dataclass(frozen=True)
class TrainConfig:
    rounds: int
    local_epochs: float
    batch_size: int
    lr: float
    momentum: float
    seed: int
    round_timeout: float  # seconds
    poll_interval: float  # seconds


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy of a run.

    ``level = "sample"``: each hospital runs DP-SGD (Opacus) and holds its own (ε, δ) for its
    patients. ``level = "client"``: each hospital clips its whole update to
    ``client_clipping_norm`` (L2) and the coordinator adds Gaussian noise to the aggregate
    (Flower's ``DifferentialPrivacyClientSideFixedClipping``): one (ε, δ) for the released model
    that protects whole hospitals, trusting the coordinator to add the noise.
    """

    enabled: bool
    level: str  # "sample" | "client"
    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    accountant: str
    client_clipping_norm: float
    client_noise_multiplier: float  # 0 = calibrate to target_epsilon over the run's rounds
    eval_noise_multiplier: float  # Gaussian noise on the released evaluation counts (sensitivity 1)
    # Opacus per-sample gradients: default (the model's measured mode) | hooks | functorch | ghost
    grad_sample_mode: str

    @property
    def sample_level(self) -> bool:
        """Hospitals train with DP-SGD (Opacus) and keep sample-level ε in their ledgers."""
        return self.enabled and self.level == "sample"

    @property
    def client_level(self) -> bool:
        """The coordinator adds noise to the aggregate of clipped hospital updates."""
        return self.enabled and self.level == "client"


@dataclass(frozen=True)
class SecAggConfig:
    """Flower's SecAgg+ (Bell et al., CCS 2020) over the train replies: the coordinator only
    sees the sum of the hospitals' updates. ``num_shares`` and ``reconstruction_threshold`` are
    counts (int > 1) or fractions of the sampled hospitals (float <= 1), as in
    ``flwr.server.workflow.SecAggPlusWorkflow``; ``clipping_range`` bounds every weight
    (quantisation range), ``max_weight`` the number of training examples of one hospital."""

    enabled: bool
    num_shares: float
    reconstruction_threshold: float
    clipping_range: float
    max_weight: float


@dataclass(frozen=True)
class ExplainConfig:
    """The DP release of feature attributions after the last round (:mod:`client.explanations`).

    Each hospital clips every test example's ``[attribution, |attribution|]`` to L2 norm
    ``clip`` (logit units), sums, and adds Gaussian noise of standard deviation
    ``noise_multiplier * clip``: one Gaussian mechanism charged to its ledger, once per run.
    ``method``: ``auto`` (exact ``w_j x_j`` for logistic regression, Integrated Gradients
    otherwise), ``exact`` or ``integrated-gradients`` (``ig_steps`` quadrature points).
    """

    enabled: bool
    method: str
    clip: float
    noise_multiplier: float
    ig_steps: int


@dataclass(frozen=True)
class DataConfig:
    dir: str
    partition: str
    alpha: float
    test_fraction: float
    split_seed: int  # simulation: partition + train/test split seed; -1 = train.seed
    split: str  # simulation: per-record (keyed hash) | stratified (FLamby's)


@dataclass(frozen=True)
class PersonalConfig:
    """Personalised federated learning: a model of each hospital's own, kept at the hospital.

    ``method``: ``none``; ``finetune`` (the global model fine-tuned on the hospital's training
    split at each evaluation; Wang et al. 2019, arXiv:1910.10252; Yu, Bagdasaryan & Shmatikov
    2020, arXiv:2002.04758); ``ditto`` (a personal model trained each round towards the global
    one, loss + lambda/2 ||v - w_global||^2; Li, Hu, Beirami & Smith, ICML 2021,
    arXiv:2012.04221). The personal model never leaves the hospital and trains without DP; only
    its evaluation leaves, as a release like the global model's (exact where the hospital policy
    allows, else noisy counts charged to the ledger). ``epochs`` are local epochs of personal
    training (per evaluation for ``finetune``, per round for ``ditto``), ``lam`` Ditto's lambda,
    ``lr`` and ``batch_size`` its SGD settings.
    """

    method: str
    epochs: float
    lam: float
    lr: float
    batch_size: int

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass(frozen=True)
class RunConfig:
    """All run-wide settings (identical at every hospital), parsed from ``context.run_config``.

    Hospital settings (data path, hospital name, device) are NOT here: they come from
    ``context.node_config`` at each hospital.
    """

    task: TaskConfig
    model: ModelConfig
    strategy: StrategyConfig
    train: TrainConfig
    dp: DPConfig
    data: DataConfig
    secagg: SecAggConfig
    output_dir: str
    centralized_eval: bool
    eval_every: int  # federated evaluation every k rounds and after the last; 0 = last round only
    run_id: str
    resume_from: str
    simulated_hospitals: int
    settings_from: str  # JSON {run-config key: the layer that set it} (shared_models.recipes)
    simulated_hold_out: str  # simulation: the hospital left out of the federation (--hold-out)
    explain: ExplainConfig
    eval_histogram_bins: int  # bins of the released score histograms (even)
    eval_model: str  # evaluation-only run: the model file on the coordinator (server evaluate)
    eval_hospitals: str  # evaluation-only run: registered names to ask, comma-separated
    personal: PersonalConfig

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> RunConfig:
        """Parse and validate a flat Flower run config (dotted kebab-case keys).

        Raises
        ------
        ConfigError
            Naming the key and the allowed range or choices.
        """
        s = "strategy."
        run = cls(
            task=TaskConfig(
                name=_get(cfg, "task.name", str),
                preprocessing=_get(cfg, "task.preprocessing", str),
            ),
            model=ModelConfig(
                name=_get(cfg, "model.name", str), hidden=_get(cfg, "model.hidden", int)
            ),
            strategy=StrategyConfig(
                name=_get(cfg, s + "name", str),
                fraction_train=_get(cfg, s + "fraction-train", float),
                fraction_evaluate=_get(cfg, s + "fraction-evaluate", float),
                min_train_nodes=_get(cfg, s + "min-train-nodes", int),
                min_evaluate_nodes=_get(cfg, s + "min-evaluate-nodes", int),
                min_available_nodes=_get(cfg, s + "min-available-nodes", int),
                proximal_mu=_get(cfg, s + "proximal-mu", float),
                server_lr=_get(cfg, s + "server-lr", float),
                server_momentum=_get(cfg, s + "server-momentum", float),
                trim_beta=_get(cfg, s + "trim-beta", float),
                num_malicious_nodes=_get(cfg, s + "num-malicious-nodes", int),
            ),
            train=TrainConfig(
                rounds=_get(cfg, "train.rounds", int),
                local_epochs=_get(cfg, "train.local-epochs", float),
                batch_size=_get(cfg, "train.batch-size", int),
                lr=_get(cfg, "train.lr", float),
                momentum=_get(cfg, "train.momentum", float),
                seed=_get(cfg, "train.seed", int),
                round_timeout=_get(cfg, "train.round-timeout", float),
                poll_interval=_get(cfg, "train.poll-interval", float),
            ),
            dp=DPConfig(
                enabled=_get(cfg, "dp.enabled", bool),
                level=_get(cfg, "dp.level", str),
                target_epsilon=_get(cfg, "dp.target-epsilon", float),
                target_delta=_get(cfg, "dp.target-delta", float),
                max_grad_norm=_get(cfg, "dp.max-grad-norm", float),
                accountant=_get(cfg, "dp.accountant", str),
                client_clipping_norm=_get(cfg, "dp.client-clipping-norm", float),
                client_noise_multiplier=_get(cfg, "dp.client-noise-multiplier", float),
                eval_noise_multiplier=_get(cfg, "dp.eval-noise-multiplier", float),
                grad_sample_mode=_get(cfg, "dp.grad-sample-mode", str),
            ),
            data=DataConfig(
                dir=_get(cfg, "data.dir", str),
                partition=_get(cfg, "data.partition", str),
                alpha=_get(cfg, "data.alpha", float),
                test_fraction=_get(cfg, "data.test-fraction", float),
                split_seed=_get(cfg, "data.split-seed", int),
                split=_get(cfg, "data.split", str),
            ),
            secagg=SecAggConfig(
                enabled=_get(cfg, "secagg.enabled", bool),
                num_shares=_get(cfg, "secagg.num-shares", float),
                reconstruction_threshold=_get(cfg, "secagg.reconstruction-threshold", float),
                clipping_range=_get(cfg, "secagg.clipping-range", float),
                max_weight=_get(cfg, "secagg.max-weight", float),
            ),
            output_dir=_get(cfg, "output.dir", str),
            centralized_eval=_get(cfg, "eval.centralized", bool),
            eval_every=_get(cfg, "eval.every", int),
            run_id=_get(cfg, "run.id", str),
            resume_from=_get(cfg, "run.resume-from", str),
            simulated_hospitals=_get(cfg, "simulation.hospitals", int),
            settings_from=_get(cfg, "run.settings-from", str),
            simulated_hold_out=_get(cfg, "simulation.hold-out", str),
            explain=ExplainConfig(
                enabled=_get(cfg, "explain.enabled", bool),
                method=_get(cfg, "explain.method", str),
                clip=_get(cfg, "explain.clip", float),
                noise_multiplier=_get(cfg, "explain.noise-multiplier", float),
                ig_steps=_get(cfg, "explain.ig-steps", int),
            ),
            eval_histogram_bins=_get(cfg, "eval.histogram-bins", int),
            eval_model=_get(cfg, "eval.model", str),
            eval_hospitals=_get(cfg, "eval.hospitals", str),
            personal=PersonalConfig(
                method=_get(cfg, "personal.method", str),
                epochs=_get(cfg, "personal.epochs", float),
                lam=_get(cfg, "personal.lambda", float),
                lr=_get(cfg, "personal.lr", float),
                batch_size=_get(cfg, "personal.batch-size", int),
            ),
        )
        run._validate()
        return run

    def _validate(self) -> None:
        st, tr, dp, da = self.strategy, self.train, self.dp, self.data
        _in_range("model.hidden", self.model.hidden, 1, 4096)
        _in_range("strategy.fraction-train", st.fraction_train, 0.0, 1.0, lo_open=True)
        _in_range("strategy.fraction-evaluate", st.fraction_evaluate, 0.0, 1.0)
        _in_range("strategy.min-train-nodes", st.min_train_nodes, 1, 10_000)
        _in_range("strategy.min-evaluate-nodes", st.min_evaluate_nodes, 0, 10_000)
        _in_range("strategy.min-available-nodes", st.min_available_nodes, 1, 10_000)
        _in_range("strategy.proximal-mu", st.proximal_mu, 0.0, 100.0)
        _in_range("strategy.server-lr", st.server_lr, 0.0, 10.0, lo_open=True)
        _in_range("strategy.server-momentum", st.server_momentum, 0.0, 0.999)
        _in_range("strategy.trim-beta", st.trim_beta, 0.0, 0.5)
        _in_range("strategy.num-malicious-nodes", st.num_malicious_nodes, 0, 10_000)
        _in_range("train.rounds", tr.rounds, 1, 100_000)
        _in_range("train.local-epochs", tr.local_epochs, 0.0, 1000.0, lo_open=True)
        _in_range("train.batch-size", tr.batch_size, 1, 1_000_000)
        _in_range("train.lr", tr.lr, 0.0, 100.0, lo_open=True)
        _in_range("train.momentum", tr.momentum, 0.0, 0.999)
        _in_range("train.round-timeout", tr.round_timeout, 0.0, 86_400.0, lo_open=True)
        _in_range("train.poll-interval", tr.poll_interval, 0.0, 60.0)
        _choice("dp.accountant", dp.accountant, ("rdp", "prv"))
        _choice("dp.level", dp.level, ("sample", "client"))
        _choice(
            "dp.grad-sample-mode", dp.grad_sample_mode, ("default", "hooks", "functorch", "ghost")
        )
        if dp.client_level:
            _in_range("dp.client-clipping-norm", dp.client_clipping_norm, 0.0, 1e6, lo_open=True)
            _in_range("dp.client-noise-multiplier", dp.client_noise_multiplier, 0.0, 1e6)
            if st.name not in ("fedavg", "fedprox"):  # Flower's accountant needs FedAvg's mean
                raise ConfigError(
                    f"dp.level = 'client' needs strategy.name fedavg or fedprox (Flower's "
                    f"client-level accountant requires FedAvg aggregation), not {st.name!r}"
                )
            if st.fraction_train != 1.0:
                raise ConfigError(
                    "dp.level = 'client' needs strategy.fraction-train = 1.0 (the accountant "
                    "takes no credit for sampling hospitals)"
                )
        sa = self.secagg
        if sa.enabled:
            if st.name in ("fedmedian", "fedtrimmedavg", "krum"):
                raise ConfigError(
                    f"secagg.enabled: strategy {st.name!r} needs every hospital's update, which "
                    "secure aggregation hides; use fedavg, fedavgm, fedprox, fedadam or fedyogi"
                )
            for key, value in (
                ("secagg.num-shares", sa.num_shares),
                ("secagg.reconstruction-threshold", sa.reconstruction_threshold),
            ):
                _in_range(key, value, 0.0, 10_000, lo_open=True)
                if value > 1 and not float(value).is_integer():
                    raise ConfigError(
                        f"run config key '{key}' = {value!r}: a count (int > 1) or a fraction (<= 1)"
                    )
            if 1 < sa.num_shares <= 2:  # Flower's SecAggPlusWorkflow rule
                raise ConfigError("run config key 'secagg.num-shares' as a count must be > 2")
            if 1 < sa.num_shares <= sa.reconstruction_threshold:
                raise ConfigError(
                    "run config key 'secagg.reconstruction-threshold' must be below "
                    "'secagg.num-shares' when both are counts"
                )
            _in_range("secagg.clipping-range", sa.clipping_range, 0.0, 1e6, lo_open=True)
            _in_range("secagg.max-weight", sa.max_weight, 0.0, 1e9, lo_open=True)
        if dp.enabled:
            _in_range("dp.target-epsilon", dp.target_epsilon, 0.0, 100.0, lo_open=True)
            _in_range("dp.target-delta", dp.target_delta, 0.0, 0.1, lo_open=True)
            _in_range("dp.max-grad-norm", dp.max_grad_norm, 0.0, 1e6, lo_open=True)
        _in_range("dp.eval-noise-multiplier", dp.eval_noise_multiplier, 0.0, 1e6, lo_open=True)
        _in_range("eval.every", self.eval_every, 0, 100_000)
        ex = self.explain
        _choice("explain.method", ex.method, ("auto", "exact", "integrated-gradients"))
        _in_range("explain.clip", ex.clip, 0.0, 1e6, lo_open=True)
        _in_range("explain.noise-multiplier", ex.noise_multiplier, 0.0, 1e6, lo_open=True)
        _in_range("explain.ig-steps", ex.ig_steps, 2, 1024)
        _in_range("eval.histogram-bins", self.eval_histogram_bins, 2, 100)
        if self.eval_histogram_bins % 2:
            raise ConfigError(
                f"run config key 'eval.histogram-bins' = {self.eval_histogram_bins}: use an even "
                "number (the threshold 0.5 must be a bin edge)"
            )
        _choice("data.partition", da.partition, ("iid", "dirichlet", "natural"))
        _in_range("data.alpha", da.alpha, 0.0, 1e6, lo_open=True)
        _in_range("data.split-seed", da.split_seed, -1, 2**32 - 1)
        _choice("data.split", da.split, ("per-record", "stratified"))
        pe = self.personal
        _choice("personal.method", pe.method, ("none", "finetune", "ditto"))
        _in_range("personal.epochs", pe.epochs, 0.0, 1000.0, lo_open=True)
        _in_range("personal.lambda", pe.lam, 0.0, 1e4)
        _in_range("personal.lr", pe.lr, 0.0, 100.0, lo_open=True)
        _in_range("personal.batch-size", pe.batch_size, 1, 1_000_000)
        if da.test_fraction != 0.0:  # 0 = the task's default split
            _in_range("data.test-fraction", da.test_fraction, 0.05, 0.9)

    def evaluates_in_round(self, server_round: int) -> bool:
        """Whether round ``server_round`` has a federated evaluation (``eval.every`` k: every
        k-th round and the last; 0: the last round only)."""
        every = self.eval_every
        return server_round == self.train.rounds or (every > 0 and server_round % every == 0)

    @property
    def evaluation_only(self) -> bool:
        """An evaluation-only run (``eval.model`` set, `fedcare server evaluate`): hospitals
        train nothing and make one noisy evaluation release each."""
        return bool(self.eval_model)

    @property
    def evaluation_rounds_count(self) -> int:
        """Number of rounds with a federated evaluation."""
        every, rounds = self.eval_every, self.train.rounds
        return rounds // every + (rounds % every != 0) if every > 0 else 1

    @property
    def releases_per_evaluation(self) -> int:
        """Evaluation releases of a hospital per evaluation round: the global model's, and the
        personal model's when the run personalises."""
        return 2 if self.personal.enabled else 1

    def recipe_values(self) -> dict[str, Any]:
        """The training settings a recipe chooses (:data:`shared_models.recipes.RECIPE_KEYS`),
        by run-config key."""
        return {
            "task.preprocessing": self.task.preprocessing,
            "model.name": self.model.name,
            "model.hidden": self.model.hidden,
            "train.rounds": self.train.rounds,
            "train.local-epochs": self.train.local_epochs,
            "train.batch-size": self.train.batch_size,
            "train.lr": self.train.lr,
            "train.momentum": self.train.momentum,
            "dp.max-grad-norm": self.dp.max_grad_norm,
        }

    def to_dict(self) -> dict[str, Any]:
        """Nested plain-dict view (for JSON sidecars and reports)."""
        return asdict(self)
