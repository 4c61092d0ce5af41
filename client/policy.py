"""The hospital's policy: what any run may do at this hospital, set by the hospital alone.

The policy is a hospital setting (``fedcare client start --policy FILE``); no run-config key
reaches it. A deployed hospital without a policy file runs under :data:`DEFAULT_POLICY`, and a
policy file only changes the keys it names: every other key keeps the default's value, so a file
that only raises the lifetime budget still requires DP. Example (``policy.toml``)::

    max-epsilon-per-run = 3.0          # ε of one run at this hospital (training + evaluation), at max-delta
    lifetime-epsilon = 10.0            # every run in the ledger composed with one accountant
    max-delta = 1e-5                   # the hospital's δ; default min(1e-5, 1 / (10 n_train))
    min-noise-multiplier = 0.5         # DP-SGD noise multiplier, at least
    min-eval-noise-multiplier = 2.0    # Gaussian noise on released evaluation counts, at least
    max-grad-norm = [0.01, 10.0]       # allowed clipping bound range
    allowed-tasks = ["heart-disease"]  # default: every registered task; "TASK:PREPROCESSING"
                                       # allows a task with that preprocessing only
    min-cohort = 10                    # patients per class, at least, behind any exact metric
    allow-non-dp = false               # true also admits client-level-only DP runs
    exact-metrics = false              # true: exact evaluation metrics and train loss leave the hospital
    require-secure-aggregation = false # true: only runs with SecAgg+ (secagg.enabled)
    allow-explanations = true          # false: refuse every DP explanation release (explain.*)
    max-explanation-epsilon = 1.0      # ε of the one explanation release alone, at max-delta
    allow-evaluation-runs = true       # false: refuse evaluation-only runs (`fedcare server evaluate`)

Values are strictly typed: a string where a boolean belongs, a NaN, an infinity or a negative
number is an error naming the key, and the hospital daemon refuses to start on it.

``fedcare simulate`` gives its simulated hospitals :data:`SIMULATION_POLICY` (the researcher
holds all the data: exact metrics and non-DP runs allowed, no caps) unless ``--policy`` is given.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `fedcare client start` loads a policy without torch
    from client.training import AccountantState, DPPlan


class PolicyError(ValueError):
    """The policy file is unreadable or has an unknown key or a wrong value."""


class PolicyRefusal(RuntimeError):
    """A run's request falls outside the hospital policy; the message says which bound and why.

    The message reaches the coordinator: it names the run-config key and the policy's bound,
    never a number derived from the hospital's data (n, counts, the noise multiplier or ε this hospital
    would reach). ``detail``, with those numbers, stays in the hospital's log and audit log.
    """

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class HospitalPolicy:
    """Bounds a hospital sets for every run it takes part in (see the module docstring).

    Attributes
    ----------
    max_epsilon_per_run, lifetime_epsilon : float
        ε caps, enforced at :meth:`hospital_delta` before every round and every evaluation release.
    max_delta : float or None
        The hospital's δ (None: ``min(1e-5, 1 / (10 n_train))``); a run asking for more is refused.
    min_noise_multiplier, min_eval_noise_multiplier : float
        Lower bounds on DP-SGD's and the evaluation release's noise multipliers.
    max_grad_norm : (float, float)
        Allowed range of the DP-SGD clipping bound.
    allowed_tasks : tuple[str, ...] or None
        None: every registered task. An entry ``"task:preprocessing"`` allows the task with that
        (resolved) preprocessing only, e.g. ``"heart-disease:flamby"``: the training-set sizes
        under two preprocessings that drop different records would tell how many were dropped.
    min_cohort : int
        Patients per class, at least, in the training split and behind any exact metric.
    allow_non_dp, exact_metrics, require_secure_aggregation : bool
        See the module docstring.
    allow_explanations : bool
        False: the hospital refuses the DP explanation release (:mod:`client.explanations`).
    max_explanation_epsilon : float
        Cap on the ε of the explanation release alone, at :meth:`hospital_delta` (the run's and
        the lifetime caps apply to it as well).
    allow_evaluation_runs : bool
        Evaluation-only runs (``fedcare server evaluate``: one noisy score-histogram release of
        a finished model on the test split, charged to the ledger within the ε caps) may run
        here. True by default: such a run releases what the last evaluation of a training run
        releases, under the same caps; a hospital that reviews every model it sees sets false.
    """

    max_epsilon_per_run: float = 3.0
    lifetime_epsilon: float = 10.0
    max_delta: float | None = None
    min_noise_multiplier: float = 0.5
    min_eval_noise_multiplier: float = 2.0
    max_grad_norm: tuple[float, float] = (0.01, 10.0)
    allowed_tasks: tuple[str, ...] | None = None
    min_cohort: int = 10
    allow_non_dp: bool = False
    exact_metrics: bool = False
    require_secure_aggregation: bool = False
    allow_explanations: bool = True
    max_explanation_epsilon: float = 1.0
    allow_evaluation_runs: bool = True

    @classmethod
    def load(cls, path: Path) -> HospitalPolicy:
        """Read a policy TOML file; keys it does not name keep :data:`DEFAULT_POLICY`'s value.

        Raises
        ------
        PolicyError
            Missing file, TOML syntax error, unknown key, or a value of the wrong type or range
            (the message names the key).
        """
        try:
            raw: dict[str, Any] = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"hospital policy {path}: {exc}") from None
        known = {_key(f.name): f.name for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise PolicyError(
                f"hospital policy {path}: unknown key(s) {unknown}; known: {sorted(known)}"
            )
        try:
            values = {known[key]: _parse(key, value) for key, value in raw.items()}
        except PolicyError as exc:
            raise PolicyError(f"hospital policy {path}: {exc}") from None
        return replace(DEFAULT_POLICY, **values)

    def as_toml(self) -> str:
        """The effective policy as the TOML a hospital would write (for ``client start``)."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                text = {"max_delta": "min(1e-5, 1/(10 n_train))", "allowed_tasks": "all tasks"}
                lines.append(f"# {_key(f.name)} = {text[f.name]}")
                continue
            if isinstance(value, bool):
                rendered = "true" if value else "false"
            elif isinstance(value, tuple):
                rendered = "[" + ", ".join(repr(v) for v in value) + "]"
            else:
                rendered = repr(value)
            lines.append(f"{_key(f.name)} = {rendered}")
        return "\n".join(lines) + "\n"

    def hospital_delta(self, n_train: int) -> float:
        """The hospital's δ: ``max-delta``, else ``min(1e-5, 1 / (10 n_train))``."""
        if self.max_delta is not None:
            return self.max_delta
        return min(1e-5, 1.0 / (10 * max(n_train, 1)))

    def check_run(
        self,
        *,
        task: str,
        preprocessing: str = "",
        plan: DPPlan | None,
        n_train: int,
        class_counts: tuple[int, int],
        client_level: bool = False,
        secure_aggregation: bool = False,
    ) -> None:
        """Refuse a run whose settings fall outside the policy (before any training).

        Parameters
        ----------
        task, preprocessing : str
            The run's task and its resolved preprocessing (``allowed-tasks``).
        plan : DPPlan or None
            The run's DP plan at this hospital (None: the run trains without sample-level DP).
        n_train : int
            Training examples at this hospital.
        class_counts : (int, int)
            Negative and positive training examples (checked against ``min-cohort``).
        client_level : bool
            The run has client-level DP only (noise added by the coordinator, not here).
        secure_aggregation : bool
            The run aggregates with SecAgg+ (``secagg.enabled``).

        Raises
        ------
        PolicyRefusal
            Naming the bound and the run-config key; never a number derived from the data.
        """
        if self.allowed_tasks is not None and not (
            task in self.allowed_tasks or f"{task}:{preprocessing}" in self.allowed_tasks
        ):
            raise PolicyRefusal(
                f"task {task!r} with preprocessing {preprocessing!r} is not allowed by the "
                f"policy (task.name, task.preprocessing; allowed: {list(self.allowed_tasks)})"
            )
        if self.require_secure_aggregation and not secure_aggregation:
            raise PolicyRefusal(
                "the run does not use secure aggregation (secagg.enabled = false) and the policy "
                "requires it"
            )
        if min(class_counts) < self.min_cohort:
            raise PolicyRefusal(
                f"a class of the training split has fewer patients than the policy's min-cohort "
                f"{self.min_cohort}"
            )
        if plan is None:
            if not self.allow_non_dp:
                raise PolicyRefusal(
                    "the run has only client-level DP (noise added by the coordinator, no "
                    "per-patient DP at this hospital) and the policy requires DP here (allow-non-dp)"
                    if client_level
                    else "the run trains without differential privacy and the policy requires DP"
                )
            return
        hospital_delta = self.hospital_delta(n_train)
        if plan.target_delta > hospital_delta:
            bound = (
                f"the policy's max-delta {self.max_delta:g}"
                if self.max_delta is not None
                else "this hospital's δ (min(1e-5, 1/(10 n_train)); the policy sets no max-delta)"
            )
            raise PolicyRefusal(
                f"dp.target-delta = {plan.target_delta:g} is above {bound}",
                detail=f"hospital δ {hospital_delta:g} for {n_train} training records",
            )
        if plan.noise_multiplier < self.min_noise_multiplier:
            raise PolicyRefusal(
                f"the noise multiplier this run gives at this hospital is below the policy's minimum "
                f"{self.min_noise_multiplier:g} (lower dp.target-epsilon, or train fewer rounds "
                "or epochs)",
                detail=f"noise multiplier {plan.noise_multiplier:.4f}",
            )
        if plan.eval_releases and plan.eval_noise_multiplier < self.min_eval_noise_multiplier:
            raise PolicyRefusal(
                f"evaluation noise multiplier {plan.eval_noise_multiplier:g} is below the "
                f"policy's minimum {self.min_eval_noise_multiplier:g} (dp.eval-noise-multiplier)"
            )
        lo, hi = self.max_grad_norm
        if not lo <= plan.max_grad_norm <= hi:
            raise PolicyRefusal(
                f"max_grad_norm {plan.max_grad_norm:g} is outside the policy's [{lo:g}, {hi:g}]"
            )
        from client.training import epsilon_spent

        planned = epsilon_spent(plan.planned_state(), delta=hospital_delta)
        if planned > self.max_epsilon_per_run:
            raise PolicyRefusal(
                f"the run's planned ε at this hospital's δ is above the policy's "
                f"max-epsilon-per-run {self.max_epsilon_per_run:g} (dp.target-epsilon)",
                detail=f"planned ε {planned:.3f} at δ {hospital_delta:g}",
            )

    def check_evaluation_run(
        self, *, task: str, preprocessing: str, delta: float, n_train: int
    ) -> None:
        """Refuse an evaluation-only run (``eval.model``) that the policy does not allow.

        Parameters
        ----------
        task, preprocessing : str
            The run's task and its resolved preprocessing (``allowed-tasks``).
        delta : float
            The run's δ (``dp.target-delta``), at which the release's ε is reported.
        n_train : int
            Training examples at this hospital (for the hospital's default δ).

        Raises
        ------
        PolicyRefusal
            ``allow-evaluation-runs`` is false, the task is not allowed, or δ is above the
            hospital's; naming the key, never a number derived from the data.
        """
        if not self.allow_evaluation_runs:
            raise PolicyRefusal(
                "evaluation-only runs (eval.model, `fedcare server evaluate`) are not allowed by "
                "the policy (allow-evaluation-runs = false)"
            )
        if self.allowed_tasks is not None and not (
            task in self.allowed_tasks or f"{task}:{preprocessing}" in self.allowed_tasks
        ):
            raise PolicyRefusal(
                f"task {task!r} with preprocessing {preprocessing!r} is not allowed by the "
                f"policy (task.name, task.preprocessing; allowed: {list(self.allowed_tasks)})"
            )
        if delta > self.hospital_delta(n_train):
            raise PolicyRefusal(
                f"dp.target-delta = {delta:g} is above this hospital's δ (the policy's max-delta, "
                "else min(1e-5, 1/(10 n_train)))",
                detail=f"hospital δ {self.hospital_delta(n_train):g}",
            )

    def check_release(
        self,
        *,
        this_run: AccountantState,
        other_runs: list[AccountantState],
        n_train: int,
        what: str,
    ) -> tuple[float, float]:
        """Refuse a release (a round's training, an evaluation) that would cross a cap.

        ``this_run`` is the run's recorded accountant state WITH the release added; the caps
        are checked at the hospital's δ over everything actually recorded, not over the plan.

        Returns
        -------
        (float, float)
            ε of this run and lifetime ε after the release, at :meth:`hospital_delta`.

        Raises
        ------
        PolicyRefusal
            The release would bring the run's ε above ``max-epsilon-per-run`` or the hospital's
            lifetime ε above ``lifetime-epsilon``.
        """
        from client.ledger import lifetime_epsilon
        from client.training import epsilon_spent

        delta = self.hospital_delta(n_train)
        run_eps = epsilon_spent(this_run, delta=delta)
        if run_eps > self.max_epsilon_per_run + 1e-9:
            raise PolicyRefusal(
                f"{what} would bring the run's ε above the policy's max-epsilon-per-run "
                f"{self.max_epsilon_per_run:g}",
                detail=f"run ε would be {run_eps:.3f} at δ {delta:g}",
            )
        total = lifetime_epsilon([*other_runs, this_run], delta=delta)
        if total > self.lifetime_epsilon + 1e-9:
            raise PolicyRefusal(
                f"{what} would bring the hospital's lifetime ε above the policy's lifetime-epsilon "
                f"{self.lifetime_epsilon:g}",
                detail=f"lifetime ε would be {total:.3f} at δ {delta:g}",
            )
        return run_eps, total

    def check_explanation(self, *, noise_multiplier: float, n_train: int) -> float:
        """Refuse an explanation release the policy forbids or whose ε alone is above
        ``max-explanation-epsilon`` (the caps of :meth:`check_release` are checked apart).

        Returns
        -------
        float
            ε of the release alone at :meth:`hospital_delta`.

        Raises
        ------
        PolicyRefusal
            ``allow-explanations`` is false, or the release's ε exceeds the cap (the message
            names ``explain.noise-multiplier``, a run setting, never a data-derived number).
        """
        from client.explanations import release_epsilon

        if not self.allow_explanations:
            raise PolicyRefusal(
                "the hospital policy forbids explanation releases (allow-explanations = false); "
                "run without explain.enabled"
            )
        delta = self.hospital_delta(n_train)
        epsilon = release_epsilon(noise_multiplier, delta=delta)
        if epsilon > self.max_explanation_epsilon + 1e-9:
            raise PolicyRefusal(
                f"explain.noise-multiplier = {noise_multiplier:g} gives an explanation release "
                f"above the policy's max-explanation-epsilon {self.max_explanation_epsilon:g}: "
                "raise explain.noise-multiplier",
                detail=f"release ε {epsilon:.3f} at δ {delta:g}",
            )
        return epsilon


def _key(name: str) -> str:
    return name.replace("_", "-")


def _number(key: str, value: Any, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(f"{key} must be a number, got {value!r}")
    if integer and not isinstance(value, int):
        raise PolicyError(f"{key} must be a whole number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise PolicyError(f"{key} must be a finite, non-negative number, got {value!r}")
    return value


def _parse(key: str, value: Any) -> Any:
    """One policy value, strictly typed (see the module docstring)."""
    if key in (
        "allow-non-dp", "exact-metrics", "require-secure-aggregation", "allow-explanations",
        "allow-evaluation-runs",
    ):  # fmt: skip
        if not isinstance(value, bool):
            raise PolicyError(f"{key} must be true or false (unquoted), got {value!r}")
        return value
    if key == "allowed-tasks":
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise PolicyError(f"{key} must be a list of task names, got {value!r}")
        return tuple(value)
    if key == "max-grad-norm":
        if not isinstance(value, list) or len(value) != 2:
            raise PolicyError(f"{key} must be [low, high], got {value!r}")
        lo, hi = (float(_number(key, v)) for v in value)
        if lo > hi:
            raise PolicyError(f"{key} must be [low, high] with low <= high, got {value!r}")
        return (lo, hi)
    if key == "min-cohort":
        return int(_number(key, value, integer=True))
    number = float(_number(key, value))
    if key == "max-delta" and not 0 < number < 1:
        raise PolicyError(f"{key} must be in (0, 1), got {value!r}")
    return number


DEFAULT_POLICY = HospitalPolicy()
"""What a deployed hospital runs under without a policy file: sample-level DP required, ε ≤ 3 per
run and ≤ 10 over the hospital's lifetime at δ ≤ min(1e-5, 1/(10 n)), noisy evaluation only."""

SIMULATION_POLICY = HospitalPolicy(
    max_delta=0.1,  # the run's δ (the plan still requires δ < 1/n)
    max_epsilon_per_run=math.inf,
    lifetime_epsilon=math.inf,
    min_noise_multiplier=0.0,
    min_eval_noise_multiplier=0.0,
    max_grad_norm=(0.0, math.inf),
    min_cohort=0,
    allow_non_dp=True,
    exact_metrics=True,
    max_explanation_epsilon=math.inf,
)
"""Simulated hospitals without ``--policy``: the researcher holds all the data, so exact metrics and
non-DP runs are allowed and nothing is capped (δ still has to be below 1/n)."""
