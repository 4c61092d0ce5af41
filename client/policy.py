"""The hospital's site policy: a TOML file the hospital owns that bounds what any run may do there.

Example (``policy.toml``)::

    max-epsilon-per-run = 3.0         # planned ε of one run (all its rounds), at the run's δ
    lifetime-epsilon = 10.0           # all runs recorded in the ledger plus this one, composed
    min-noise-multiplier = 0.8
    max-grad-norm = [0.1, 5.0]        # allowed clipping bound range
    allowed-tasks = ["heart-disease"]
    min-cohort = 20                   # no metric is reported from fewer patients
    allow-non-dp = false
    require-secure-aggregation = false  # true: only runs with SecAgg+ (secagg.enabled)

Every key is optional. The ClientApp checks a run's PLANNED total privacy cost against the policy
before any training; a refusal changes nothing in the ledger.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.training import AccountantState, DPPlan, epsilon_spent

_KEYS = {
    "max-epsilon-per-run", "lifetime-epsilon", "min-noise-multiplier", "max-grad-norm",
    "allowed-tasks", "min-cohort", "allow-non-dp", "require-secure-aggregation",
}  # fmt: skip


class PolicyError(ValueError):
    """The policy file is unreadable or has an unknown key or a wrong value."""


class PolicyRefusal(RuntimeError):
    """A run's request falls outside the site policy; the message says which bound and why."""


@dataclass(frozen=True)
class SitePolicy:
    """Bounds a hospital sets for every run at its site (defaults: no bound)."""

    max_epsilon_per_run: float = math.inf
    lifetime_epsilon: float = math.inf
    min_noise_multiplier: float = 0.0
    max_grad_norm: tuple[float, float] = (0.0, math.inf)
    allowed_tasks: tuple[str, ...] | None = None
    min_cohort: int = 0
    allow_non_dp: bool = False
    require_secure_aggregation: bool = False

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        """Read a policy TOML file.

        Raises
        ------
        PolicyError
            Missing file, TOML syntax error, unknown key, or a value of the wrong type.
        """
        try:
            raw: dict[str, Any] = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"site policy {path}: {exc}") from None
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise PolicyError(
                f"site policy {path}: unknown key(s) {unknown}; known: {sorted(_KEYS)}"
            )
        try:
            bounds = raw.get("max-grad-norm", [0.0, math.inf])
            return cls(
                max_epsilon_per_run=float(raw.get("max-epsilon-per-run", math.inf)),
                lifetime_epsilon=float(raw.get("lifetime-epsilon", math.inf)),
                min_noise_multiplier=float(raw.get("min-noise-multiplier", 0.0)),
                max_grad_norm=(float(bounds[0]), float(bounds[1])),
                allowed_tasks=tuple(str(t) for t in raw["allowed-tasks"])
                if "allowed-tasks" in raw
                else None,
                min_cohort=int(raw.get("min-cohort", 0)),
                allow_non_dp=bool(raw.get("allow-non-dp", False)),
                require_secure_aggregation=bool(raw.get("require-secure-aggregation", False)),
            )
        except (TypeError, ValueError, IndexError) as exc:
            raise PolicyError(f"site policy {path}: {exc}") from None

    def check_run(
        self,
        *,
        task: str,
        plan: DPPlan | None,
        n_train: int,
        other_runs: list[AccountantState],
        client_level: bool = False,
        secure_aggregation: bool = False,
    ) -> None:
        """Refuse a run whose planned privacy cost or parameters fall outside the policy.

        Parameters
        ----------
        plan : DPPlan or None
            The run's DP plan at this site (None: the run trains without DP).
        other_runs : list[AccountantState]
            Accountant states of every OTHER run in the ledger (for the lifetime budget).
        client_level : bool
            The run has client-level DP only (noise added by the coordinator, not here).
        secure_aggregation : bool
            The run aggregates with SecAgg+ (``secagg.enabled``).

        Raises
        ------
        PolicyRefusal
            Naming the bound, the requested value and the allowed value.
        """
        if self.allowed_tasks is not None and task not in self.allowed_tasks:
            raise PolicyRefusal(
                f"task {task!r} is not allowed by the policy (allowed: {list(self.allowed_tasks)})"
            )
        if self.require_secure_aggregation and not secure_aggregation:
            raise PolicyRefusal(
                "the run does not use secure aggregation (secagg.enabled = false) and the policy "
                "requires it"
            )
        if n_train < self.min_cohort:
            raise PolicyRefusal(
                f"{n_train} training patients is below the policy's min-cohort {self.min_cohort}"
            )
        if plan is None:
            if not self.allow_non_dp:
                raise PolicyRefusal(
                    "the run has only client-level DP (noise added by the coordinator, no "
                    "per-patient DP at this site) and the policy requires DP here (allow-non-dp)"
                    if client_level
                    else "the run trains without differential privacy and the policy requires DP"
                )
            return
        planned = epsilon_spent(
            {
                "mechanism": plan.accountant,
                "history": [[plan.noise_multiplier, plan.sample_rate, plan.total_steps]],
            },
            delta=plan.target_delta,
        )
        if planned > self.max_epsilon_per_run:
            raise PolicyRefusal(
                f"run would spend ε={planned:.2f} but the policy allows {self.max_epsilon_per_run:g} per run"
            )
        if plan.noise_multiplier < self.min_noise_multiplier:
            raise PolicyRefusal(
                f"noise multiplier {plan.noise_multiplier:.3f} is below the policy's minimum "
                f"{self.min_noise_multiplier:g}"
            )
        lo, hi = self.max_grad_norm
        if not lo <= plan.max_grad_norm <= hi:
            raise PolicyRefusal(
                f"max_grad_norm {plan.max_grad_norm:g} is outside the policy's [{lo:g}, {hi:g}]"
            )
        if math.isfinite(self.lifetime_epsilon):
            from client.ledger import lifetime_epsilon

            full = {
                "mechanism": "rdp",
                "history": [[plan.noise_multiplier, plan.sample_rate, plan.total_steps]],
            }
            total = lifetime_epsilon([*other_runs, full], delta=plan.target_delta)
            if total > self.lifetime_epsilon:
                raise PolicyRefusal(
                    f"run would bring the site's lifetime ε to {total:.2f} but the policy allows "
                    f"{self.lifetime_epsilon:g} in total"
                )
