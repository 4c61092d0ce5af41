"""Building a run's settings from the schema's defaults and what the user asked for.

The schema is ``[tool.flwr.app.config]`` of the app directory's pyproject.toml (the repository
root). ``fedcare simulate`` and ``fedcare server run`` share :class:`RunOptions`, so the same
options mean the same run-config keys in simulation and deployment.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_models.protocol import APP_DIR  # re-exported for the coordinator
from shared_models.recipes import PAIRED_KEYS, RUN_CONFIG, SCHEMA, Sources, rule

__all__ = ["APP_DIR", "RunOptions", "UsageError", "check_names", "default_run_config", "to_toml"]


class UsageError(ValueError):
    """An expected mistake on the command line: printed as one line, exit code 2."""


def default_run_config() -> dict[str, Any]:
    """The run-config schema with its defaults (flat dotted keys).

    Raises
    ------
    UsageError
        fedcare was not installed from its checkout (no pyproject.toml next to the packages).
    """
    from flwr.common.config import flatten_dict, get_project_config

    if not (APP_DIR / "pyproject.toml").exists():
        raise UsageError(
            f"{APP_DIR / 'pyproject.toml'} not found: install fedcare from its source checkout "
            "with `pip install -e .` (the checkout is the Flower app directory)"
        )
    return flatten_dict(get_project_config(APP_DIR)["tool"]["flwr"]["app"]["config"])


def parse_run_config_arg(text: str) -> dict[str, Any]:
    """Parse ``--run-config`` ("key=value ..." or a .toml file) with Flower's own parser."""
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args([text])
    except Exception as exc:  # click.ClickException, ValueError, OSError, TOML errors
        raise UsageError(f"--run-config: {getattr(exc, 'message', exc)}") from None


def to_toml(config: dict[str, Any]) -> str:
    """Flat run config as TOML (quoted dotted keys), e.g. for ``flwr run --run-config FILE``."""
    lines = []
    for key, value in config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))  # a JSON string is a valid TOML basic string
        lines.append(f"{json.dumps(key)} = {text}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class RunOptions:
    """The run options shared by ``fedcare simulate`` and ``fedcare server run`` (None = default)."""

    task: str = "breast-cancer"
    data_dir: str = ""
    partition: str = "iid"
    alpha: float = 0.5
    rounds: int | None = None
    strategy: str | None = None
    epsilon: float | None = None
    dp: bool = True
    delta: float | None = None
    seed: int = 0
    run_config: str | None = None

    def validate(self) -> None:
        """Raise :class:`UsageError` naming the option and the allowed range."""
        if self.epsilon is not None and not self.dp:
            raise UsageError("--epsilon and --no-dp exclude each other: choose one")
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise UsageError(f"--epsilon must be a positive number (got {self.epsilon:g})")
        if self.delta is not None and not 0 < self.delta < 1:
            raise UsageError(f"--delta must be in (0, 1) (got {self.delta:g})")
        if self.rounds is not None and self.rounds < 1:
            raise UsageError(f"--rounds must be at least 1 (got {self.rounds})")
        if self.alpha <= 0:
            raise UsageError(f"--alpha must be positive (got {self.alpha:g})")

    def build(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """The complete flat config (:meth:`build_with_sources` without the sources)."""
        return self.build_with_sources(defaults)[0]

    def build_with_sources(
        self, defaults: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], Sources]:
        """The schema's defaults, then the task's recipe for the run's privacy setting (or,
        where it has none, :func:`shared_models.recipes.rule` for hospitals of unknown size;
        :func:`apply_rule_for_sizes` re-picks once they are known), then ``--run-config``, then the explicit options: the complete flat
        config, and per training setting the layer it came from (also in the config, as
        ``run.settings-from``, for the report).

        Raises
        ------
        UsageError
            Invalid option, or a ``--run-config`` key the schema does not declare.
        """
        self.validate()
        cfg = dict(defaults if defaults is not None else default_run_config())
        sources = Sources()
        extra = parse_run_config_arg(self.run_config) if self.run_config else {}
        unknown = sorted(set(extra) - set(cfg))
        if unknown:
            raise UsageError(
                f"--run-config: unknown key(s) {unknown}; known keys: {', '.join(sorted(cfg))}"
            )
        owned = [
            f"{key} (use {OPTION_OF_KEY[key]})" for key in sorted(extra) if key in OPTION_OF_KEY
        ]
        if owned:  # the option always sets these: a --run-config value would be overridden unseen
            raise UsageError(f"--run-config sets {', '.join(owned)}: these come from the options")
        sample_dp = self.dp and extra.get("dp.level", cfg["dp.level"]) == "sample"
        recipe, why = _task_recipe(self.task, cfg, dp=sample_dp)
        if any(key in extra for key in PAIRED_KEYS):  # the user's model or preprocessing
            recipe = {k: v for k, v in recipe.items() if k not in PAIRED_KEYS}
        sources.set(cfg, recipe, why)
        sources.set(cfg, extra, RUN_CONFIG)
        cfg["task.name"] = self.task
        cfg["data.dir"] = str(Path(self.data_dir).resolve()) if self.data_dir else ""
        cfg["data.partition"] = self.partition
        cfg["data.alpha"] = float(self.alpha)
        cfg["train.seed"] = int(self.seed)
        cfg["dp.enabled"] = bool(self.dp)
        if self.rounds is not None:
            sources.set(cfg, {"train.rounds": self.rounds}, "--rounds")
        if self.strategy is not None:
            cfg["strategy.name"] = self.strategy
        if self.epsilon is not None:
            cfg["dp.target-epsilon"] = float(self.epsilon)
        if self.delta is not None:
            cfg["dp.target-delta"] = float(self.delta)
        cfg["run.id"] = cfg["run.id"] or uuid.uuid4().hex[:16]  # hospitals' ledgers key on it
        cfg["run.settings-from"] = sources.to_json()
        return cfg, sources


# run-config keys the command-line options set (always: their defaults too)
OPTION_OF_KEY = {
    "task.name": "--task", "data.dir": "--data-dir", "data.partition": "--partition",
    "data.alpha": "--alpha", "train.seed": "--seed", "dp.enabled": "--no-dp to switch DP off",
}  # fmt: skip


def _task_recipe(task: str, schema: dict[str, Any], *, dp: bool) -> tuple[dict[str, Any], str]:
    """Task ``task``'s recipe for a run with or without sample-level DP, else the rule's; and
    where it came from ({} for an unknown task: reported later by :func:`check_names`)."""
    from shared_models.tasks import TASKS

    spec = TASKS.get(task)
    if spec is None:
        return {}, SCHEMA
    recipe = spec.recipe(dp=dp)
    unknown = sorted(set(recipe) - set(schema))
    if unknown:  # a task's own mistake, caught by the tests
        raise ValueError(f"task {task}: run_defaults has unknown key(s) {unknown}")
    if recipe:
        return recipe, f"task recipe ({task}, {'DP' if dp else 'no DP'})"
    return rule(dp=dp, n_train=None)  # sizes unknown here: apply_rule_for_sizes re-picks


def check_names(cfg: dict[str, Any], *, app_dir: Path = APP_DIR) -> None:
    """Unknown task / strategy / model names become :class:`UsageError` listing the known ones
    (the tasks of the app folder ``app_dir`` that will be submitted)."""
    from server.strategies import STRATEGIES
    from shared_models.tasks import TASKS, app_task_names, task_file_problems

    # the models the tasks use (all of shared_models.models.MODELS, tests/test_tasks.py), named
    # without importing the models (torch, Opacus): `fedcare server run` starts faster
    models = {name for task in TASKS.values() for name in task.models}
    registries: tuple[tuple[str, str, str, Any], ...] = (
        ("task.name", "task", "tasks", app_task_names(app_dir)),
        ("strategy.name", "strategy", "strategies", STRATEGIES),
        ("model.name", "model", "models", models),
    )
    for key, kind, kinds, known in registries:
        if cfg[key] not in known and not (key == "model.name" and cfg[key] == "default"):
            broken = (
                "".join(f"; {p}" for p in task_file_problems(app_dir)) if kind == "task" else ""
            )
            raise UsageError(
                f"unknown {kind} {cfg[key]!r}; known {kinds}: {', '.join(sorted(known))}{broken}"
            )


def apply_rule_for_sizes(cfg: dict[str, Any], n_train: list[int]) -> None:
    """Re-pick the settings the rule chose (``run.settings-from``) now that the hospitals'
    training-set sizes are known (simulation: after the data are loaded)."""
    sources = Sources.from_json(cfg["run.settings-from"])
    keys = sources.from_rule()
    if not keys:
        return
    sample_dp = bool(cfg["dp.enabled"]) and cfg["dp.level"] == "sample"
    values, why = rule(dp=sample_dp, n_train=n_train)
    sources.set(cfg, {k: values[k] for k in keys if k in values}, why)
    cfg["run.settings-from"] = sources.to_json()
