"""Model registry (Opacus validator), metrics with undefined values, run-config parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from sklearn.metrics import roc_auc_score

from shared_models.config import ConfigError, RunConfig
from shared_models.metrics import binary_metrics
from shared_models.models import MODELS, build_model
from shared_models.tasks import TASKS

_TASK_MODELS = sorted(
    (task.name, model, tuple(task.input_shape(p)))
    for task in TASKS.values()
    for model in task.models
    for p in task.preprocessings
)


@pytest.mark.parametrize(("task", "name", "shape"), _TASK_MODELS)
def test_every_registered_model_passes_the_opacus_validator(task, name, shape):
    """Every model of every task, at every input shape the task's preprocessings give."""
    model = build_model(name, input_shape=shape, hidden=8)
    ModuleValidator.validate(model, strict=True)  # raises on BatchNorm & co.
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(5, *shape)).shape == (5,)


def test_every_registered_model_belongs_to_a_task():
    assert {name for _, name, _ in _TASK_MODELS} == set(MODELS)


def test_initial_weights_are_deterministic():
    a, b = build_model("mlp", n_features=4, seed=3), build_model("mlp", n_features=4, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_unknown_model():
    with pytest.raises(ValueError, match="known models: cnn, logreg, mlp"):
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
