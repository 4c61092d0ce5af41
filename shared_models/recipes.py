"""Where a run's training settings come from: the task's recipe, else a stated rule.

A user who names no settings should still get a useful model (issue #24). The settings that
decide whether training works -- rounds, local epochs, expected batch size, learning rate,
momentum, clipping bound, model and preprocessing (:data:`RECIPE_KEYS`) -- are chosen in
layers, each overriding the one before it:

1. the schema's defaults (``[tool.flwr.app.config]`` in pyproject.toml);
2. :func:`rule` -- only for a task that brings no recipe for the run's privacy setting;
3. the task's recipe (:attr:`shared_models.tasks.Task.run_defaults` for both privacy settings,
   ``run_defaults_dp`` / ``run_defaults_no_dp`` for one; a task file's ``[run]``,
   ``[run.dp]`` and ``[run.no-dp]`` tables);
4. ``--run-config`` (key=value pairs or a TOML file such as ``presets/chest-xray.toml``);
5. the explicit options (``--rounds``, ``--epsilon`` ...).

:class:`Sources` records, per key, the layer that set its value; the report prints it.

The rule is for the tabular models (``mlp``, ``logreg``) on standardised features, the only
models a task file can name; the image and ICU tasks bring their own recipes. It follows
Ponomareva et al., "How to DP-fy ML" (JAIR 2023, sec. 5.4: the largest batch the compute
allows, the learning rate tuned for clipped gradients, epochs as the remaining knob), De et al.
2022 (arXiv:2204.13650: large batches, many noisy steps) and Tramèr & Boneh (ICLR 2021: linear
models on fixed features do well under DP). With DP: an expected batch of 256, so that a
hospital with at most 256 training records takes full-batch noisy gradient steps (q = 1: the
noise per step is divided by the whole training set); 3 local epochs per round up to 2,048
records at the largest hospital (1 above: each epoch is then many steps); 10 rounds; learning
rate 2 on gradients clipped to norm 1. Without DP: batch 32, learning rate 1, one local epoch,
20 rounds (10 above 2,048 records). ε is not an input: the noise multiplier is calibrated to it
(:func:`client.training.plan_dp`), and on the measured tasks one recipe served ε = 1 and 3.
Measured against scikit-learn's LogisticRegression on the same splits: ``benchmarks/defaults.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

RECIPE_KEYS = (
    "task.preprocessing",
    "model.name",
    "model.hidden",
    "train.rounds",
    "train.local-epochs",
    "train.batch-size",
    "train.lr",
    "train.momentum",
    "dp.max-grad-norm",
)
_KINDS: dict[str, type] = {
    "task.preprocessing": str,
    "model.name": str,
    "model.hidden": int,
    "train.rounds": int,
    "train.local-epochs": float,
    "train.batch-size": int,
    "train.lr": float,
    "train.momentum": float,
    "dp.max-grad-norm": float,
}
# A recipe's model and preprocessing come as a pair (scattering coefficients need the
# scatter-linear model): a user who sets either gets neither from the recipe.
PAIRED_KEYS = ("task.preprocessing", "model.name")
LARGE_HOSPITAL = 2048  # training records at the largest hospital above which the rule trains less

SCHEMA = "schema default"
RUN_CONFIG = "--run-config"


def rule(*, dp: bool, n_train: Sequence[int] | None) -> tuple[dict[str, Any], str]:
    """The rule's settings for a tabular model, and the one line that says why.

    Parameters
    ----------
    dp : bool
        Sample-level DP-SGD (True) or no DP.
    n_train : sequence of int or None
        Training records per hospital; None where they are not known (``fedcare server run``:
        the coordinator learns them only from the first replies), read as small hospitals.

    Returns
    -------
    (dict, str)
        Run-config values (:data:`RECIPE_KEYS` only) and where they come from.
    """
    largest = max(n_train) if n_train else None
    large = largest is not None and largest > LARGE_HOSPITAL
    size = (
        "hospital sizes unknown here: the small-data branch"
        if largest is None
        else f"largest hospital {largest} training records"
    )
    if dp:
        settings: dict[str, Any] = {
            "train.batch-size": 256,
            "train.local-epochs": 1.0 if large else 3.0,
            "train.rounds": 10,
            "train.lr": 2.0,
            "train.momentum": 0.0,
            "dp.max-grad-norm": 1.0,
        }
        why = f"rule for DP-SGD ({size}; Ponomareva et al. 2023, De et al. 2022)"
    else:
        settings = {
            "train.batch-size": 32,
            "train.local-epochs": 1.0,
            "train.rounds": 10 if large else 20,
            "train.lr": 1.0,
            "train.momentum": 0.0,
        }
        why = f"rule without DP ({size})"
    return settings, why


def check_recipe(where: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a recipe table: only :data:`RECIPE_KEYS`, each of its type.

    Raises
    ------
    ValueError
        Naming ``where`` (e.g. ``"tasks/x.toml [run.dp]"``), the key and what is allowed.
    """
    out = {}
    for key, value in values.items():
        kind = _KINDS.get(key)
        if kind is None:
            raise ValueError(
                f"{where}: '{key}' is not a run setting a task may choose; allowed: "
                f"{', '.join(RECIPE_KEYS)}"
            )
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: '{key}' must be {kind.__name__}, got {value!r}")
        out[key] = value
    return out


@dataclass
class Sources:
    """Per run-config key (:data:`RECIPE_KEYS`), the layer that set its value."""

    by_key: dict[str, str] = field(default_factory=dict)

    def set(self, cfg: dict[str, Any], values: Mapping[str, Any], source: str) -> None:
        """Put ``values`` into ``cfg`` and record ``source`` for each recipe key."""
        for key, value in values.items():
            cfg[key] = value
            if key in RECIPE_KEYS:
                self.by_key[key] = source

    def from_rule(self) -> list[str]:
        """The keys whose value the rule set."""
        return [k for k, s in self.by_key.items() if s.startswith("rule")]

    def to_json(self) -> str:
        """The run-config value of ``run.settings-from``."""
        return json.dumps(self.by_key, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Sources:
        """Parse ``run.settings-from`` ("" = nothing recorded: every setting as the schema's)."""
        try:
            raw = json.loads(text) if text else {}
        except ValueError:
            raw = {}
        if not isinstance(raw, dict):
            raw = {}
        return cls({str(k): str(v) for k, v in raw.items() if k in RECIPE_KEYS})


def settings_table(values: Mapping[str, Any], settings_from: str) -> dict[str, dict[str, Any]]:
    """``{key: {"value", "source"}}`` of the training settings, for summary.json and the report.

    ``values``: :meth:`shared_models.config.RunConfig.recipe_values`; ``settings_from``: the
    run config's ``run.settings-from``."""
    by_key = Sources.from_json(settings_from).by_key
    return {k: {"value": values[k], "source": by_key.get(k, SCHEMA)} for k in RECIPE_KEYS}


def summary_line(table: Mapping[str, Mapping[str, Any]]) -> str:
    """One console line: the training settings and where they came from."""
    v = {k: row["value"] for k, row in table.items()}
    sources = sorted({row["source"] for row in table.values()} - {SCHEMA})
    return (
        f"settings: {v['train.rounds']} rounds x {v['train.local-epochs']:g} local epochs, "
        f"batch {v['train.batch-size']}, lr {v['train.lr']:g}"
        + (f", momentum {v['train.momentum']:g}" if v["train.momentum"] else "")
        + f" ({'; '.join(sources) if sources else SCHEMA})"
    )
