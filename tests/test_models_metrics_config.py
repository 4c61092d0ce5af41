"""Model registry (Opacus validator), metrics with undefined values, run-config parsing."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from sklearn.metrics import roc_auc_score

from shared_models.config import ConfigError, RunConfig
from shared_models.metrics import binary_metrics
from shared_models.models import MODELS, build_model
from shared_models.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]


def _model_shapes() -> list[tuple[str, str, tuple[int, ...]]]:
    """(task, model, input shape) for every model a task lists, with each preprocessing's shape;
    models no task lists are built for a 13-feature tabular input."""
    cases = [
        (task.name, model, task.input_shape(prep))
        for task in TASKS.values()
        for prep in task.preprocessings
        for model in task.models_for(prep)
    ]
    listed = {model for _, model, _ in cases}
    return sorted(set(cases)) + [("", name, (13,)) for name in sorted(set(MODELS) - listed)]


@pytest.mark.parametrize(("task", "name", "shape"), _model_shapes())
def test_every_registered_model_passes_the_opacus_validator(task, name, shape):
    model = build_model(name, input_shape=shape, hidden=8)
    ModuleValidator.validate(model, strict=True)  # raises on BatchNorm & co.
    assert model(torch.zeros(5, *shape)).shape == (5,)


def test_every_task_lists_registered_models():
    for task in TASKS.values():
        assert task.models and set(task.models) <= set(MODELS), task.name


def test_masked_summary_statistics_of_observed_bins_only():
    from shared_models.sequence_models import MaskedSummary

    x = torch.zeros(1, 4, 2, 3)  # 4 bins, 2 channels; channel 1 never observed
    x[0, :, 0, 0] = torch.tensor([0.0, 2.0, 2.0, -1.0])  # carried forward after bin 1
    x[0, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # observed in bins 1 and 3
    first, last, low, high, mean, count = MaskedSummary()(x).view(2, 6)[0]
    assert (first, last, low, high, mean) == (2.0, -1.0, -1.0, 2.0, 0.5)
    assert count == pytest.approx(math.log(3) / math.log(5))
    assert MaskedSummary()(x).view(2, 6)[1].abs().sum() == 0


def test_initial_weights_are_deterministic():
    a, b = build_model("mlp", n_features=4, seed=3), build_model("mlp", n_features=4, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_unknown_model():
    with pytest.raises(ValueError, match=f"known models: {', '.join(sorted(MODELS))}$"):
        build_model("resnet", n_features=3)


def test_metrics_match_sklearn():
    y = np.array([0, 0, 1, 1, 1, 0])
    s = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.2])
    m = binary_metrics(y, s)
    assert m.auroc == pytest.approx(roc_auc_score(y, s))
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.sensitivity == pytest.approx(2 / 3) and m.specificity == pytest.approx(2 / 3)
    assert m.undefined == {}


def test_metrics_on_a_one_class_split_are_undefined_with_reason():
    m = binary_metrics(np.ones(5), np.array([0.9, 0.8, 0.3, 0.7, 0.6]))
    assert m.auroc is None and m.specificity is None
    assert "only one class (5 positive, 0 negative)" in m.undefined["auroc"]
    assert m.accuracy == pytest.approx(0.8) and m.sensitivity == pytest.approx(0.8)


def test_operating_point_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score

    from shared_models.metrics import evaluation_metrics, operating_point_metrics

    y = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1, 0])
    s = np.array([0.1, 0.6, 0.7, 0.4, 0.9, 0.2, 0.35, 0.3, 0.8, 0.5])
    m, undefined = operating_point_metrics(y, s)
    assert m["auprc"] == pytest.approx(average_precision_score(y, s)) and undefined == {}
    # positives sorted by score: 0.9 0.8 0.7 0.4 0.35 -> 4 of 5 caught at threshold 0.4,
    # where the negatives 0.6 and 0.5 are above it: specificity 3/5
    assert m["sensitivity@sens0.8"] == pytest.approx(0.8)
    assert m["specificity@sens0.8"] == pytest.approx(0.6)
    values, _ = evaluation_metrics(y, s)
    assert values["auroc"] == pytest.approx(roc_auc_score(y, s)) and values["auprc"] == m["auprc"]


def test_operating_point_metrics_without_positives_are_undefined():
    from shared_models.metrics import operating_point_metrics

    m, undefined = operating_point_metrics(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]))
    assert m == dict.fromkeys(m) and set(undefined) == set(m)
    assert undefined["auprc"] == "no positive patients in the test split"
    m, undefined = operating_point_metrics(np.ones(3), np.array([0.1, 0.2, 0.3]))
    assert m["auprc"] == pytest.approx(1.0) and m["specificity@sens0.8"] is None
    assert "no negative patients" in undefined["specificity@sens0.8"]


def test_task_run_defaults_sit_between_schema_and_overrides():
    from server.run_config import RunOptions

    icu = TASKS["icu-mortality"]
    assert icu.run_defaults, "icu-mortality recommends its own run settings"
    cfg = RunOptions(task="icu-mortality").build()
    for key, value in icu.run_defaults.items():
        assert cfg[key] == value, key
    assert icu.run_defaults["train.rounds"] != 7
    cfg = RunOptions(task="icu-mortality", run_config="train.rounds=7").build()
    assert cfg["train.rounds"] == 7  # --run-config wins
    assert RunOptions(task="icu-mortality", rounds=2).build()["train.rounds"] == 2  # so do options
    # a task without a recipe gets the rule's (tests/test_recipes.py), not the schema's 5
    assert RunOptions(task="breast-cancer").build()["train.rounds"] == 10


def test_default_run_config_parses(default_cfg):
    run = RunConfig.from_run_config(default_cfg)
    assert run.task.name == "breast-cancer"
    assert run.dp.enabled and run.dp.target_delta < 1e-3
    assert run.strategy.name == "fedavg"


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("dp.target-epsilon", 0.0, r"'dp.target-epsilon' = 0.0 is outside \(0.0, 100.0\]"),
        ("train.rounds", 0, r"'train.rounds' = 0 is outside \[1, 100000\]"),
        ("train.lr", "fast", r"'train.lr' must be float, got 'fast'"),
        ("dp.accountant", "gdp", r"'dp.accountant' = 'gdp'; choose one of \['rdp', 'prv'\]"),
        ("dp.enabled", 1, r"'dp.enabled' must be bool"),
        ("data.split-seed", 43.5, r"'data.split-seed' must be int, got 43.5"),
        ("data.split-seed", "43", r"'data.split-seed' must be int, got '43'"),
    ],
)
def test_config_errors_name_key_and_range(default_cfg, key, value, match):
    default_cfg[key] = value
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_run_config(default_cfg)


def test_missing_key(default_cfg):
    del default_cfg["train.seed"]
    with pytest.raises(ConfigError, match="'train.seed' is missing"):
        RunConfig.from_run_config(default_cfg)


def test_grad_sample_mode_is_a_checked_run_setting(default_cfg):
    assert RunConfig.from_run_config(default_cfg).dp.grad_sample_mode == "default"
    default_cfg["dp.grad-sample-mode"] = "vmap"
    with pytest.raises(ConfigError, match=r"'dp.grad-sample-mode' = 'vmap'; choose one of"):
        RunConfig.from_run_config(default_cfg)


def test_int_accepted_for_float(default_cfg):
    default_cfg["dp.target-epsilon"] = 3
    assert math.isclose(RunConfig.from_run_config(default_cfg).dp.target_epsilon, 3.0)


# Keys of [tool.flwr.app.config] that RunConfig.from_run_config does not read, and the one module
# that reads each raw from the run config (all three are simulation-only and per hospital).
READ_PAST_THE_PARSER = {
    "simulation.ledger-dir": "client/client_app.py",
    "simulation.policy": "client/client_app.py",
    "simulation.task-file": "client/client_app.py",
}


class _ReadRecorder(Mapping[str, Any]):
    """A run config that remembers every key looked up in it (``in``, ``[]``, ``.get``)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values, self.read = values, set[str]()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the parser reads keys by name, never by walking the config")

    def __len__(self) -> int:
        return len(self.values)


def _unmatched_keys(cfg: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(keys RunConfig.from_run_config reads that ``cfg`` lacks, keys of ``cfg`` nobody reads)."""
    recorder = _ReadRecorder(cfg)
    RunConfig.from_run_config(recorder)
    return recorder.read - set(cfg), set(cfg) - recorder.read - set(READ_PAST_THE_PARSER)


def test_every_pyproject_key_is_read_by_the_parser_or_named_reader(default_cfg):
    """pyproject.toml's [tool.flwr.app.config] (which Flower needs) and RunConfig's parser name the
    same keys: a key declared but never read, or read (with a fallback) but never declared, fails.
    """
    undeclared, unread = _unmatched_keys(default_cfg)
    assert undeclared == set(), "read by RunConfig.from_run_config but not in pyproject.toml"
    assert unread == set(), (
        "in pyproject.toml but read by nobody: parse it in RunConfig.from_run_config "
        "(or name its reader in READ_PAST_THE_PARSER)"
    )
    for key, reader in READ_PAST_THE_PARSER.items():
        assert key in default_cfg, f"{key} is no longer declared: drop it from the allow-list"
        assert f'run_config.get("{key}"' in (ROOT / reader).read_text(), f"{reader} reads {key}"


def test_the_key_check_sees_keys_added_on_either_side(default_cfg):
    """The check above, broken both ways: a pyproject key nobody reads, and a parser read of an
    undeclared key (the parser has no fallback: it names the key)."""
    default_cfg["train.warmup"] = 3
    assert _unmatched_keys(default_cfg) == (set(), {"train.warmup"})
    del default_cfg["eval.model"]
    with pytest.raises(ConfigError, match="'eval.model' is missing"):
        _unmatched_keys(default_cfg)


def test_each_default_is_declared_once_in_pyproject():
    """The parsed settings have no defaults of their own: every default is pyproject.toml's
    (``[tool.flwr.app.config]``, from which the run-settings page is generated)."""
    import dataclasses

    from shared_models import config

    for cls in (RunConfig, *(f.type for f in dataclasses.fields(RunConfig))):
        if isinstance(cls, str):
            cls = getattr(config, cls, None)
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (
                f"{cls.__name__}.{f.name} has a default of its own; declare it in pyproject.toml"
            )
