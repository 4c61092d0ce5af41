"""FLamby's local baseline (every local model on every hospital's test split) and the warnings
that a federated model is useless, on the real breast-cancer data split into non-IID hospitals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from server.report import print_summary, quality_warnings, render_markdown
from shared_models.config import RunConfig
from shared_models.hospitals import simulated_hospitals_for
from shared_models.metrics import evaluation_metrics
from simulations.baselines import (
    LOCAL_POOLED,
    MAX_MATRIX_HOSPITALS,
    auroc_on_every_test_split,
    compute_baselines,
)


@pytest.fixture(scope="module")
def dirichlet():
    """4 hospitals, Dirichlet(0.5) split, seed 0: hospital-2's test split has only positives and
    hospital-3's only negatives (what `fedcare simulate --partition dirichlet --hospitals 4`
    makes)."""
    from server.run_config import default_run_config

    cfg = default_run_config()
    cfg.update({"data.partition": "dirichlet", "data.alpha": 0.5, "dp.enabled": False})
    run = RunConfig.from_run_config(cfg)
    hospitals = simulated_hospitals_for(run, 4)
    return run, hospitals, compute_baselines(run, hospitals)


def _pooled_logreg_scores(hospitals) -> list[np.ndarray]:  # a stand-in for a good federated model
    x = np.concatenate([s.x_train for s in hospitals])
    y = np.concatenate([s.y_train for s in hospitals])
    model = LogisticRegression(max_iter=1000).fit(x, y)
    return [model.predict_proba(s.x_test)[:, 1] for s in hospitals]


def test_each_local_model_is_scored_on_every_test_split_and_averaged(dirichlet):
    """FLamby's definition: Local i on test split j is scikit-learn's AUROC of those scores; a
    model's figure is the mean over the test splits with both classes; one-class splits are named
    with the reason, never imputed."""
    _, hospitals, baselines = dirichlet
    block = auroc_on_every_test_split(hospitals, federated=None, baselines=baselines)
    assert block["test_splits"] == ["hospital-1", "hospital-2", "hospital-3", "hospital-4"]
    assert block["undefined"] == {
        "hospital-2": "test split has only one class (39 positive, 0 negative)",
        "hospital-3": "test split has only one class (0 positive, 65 negative)",
    }
    assert block["n_splits"] == 2 and block["federated"] is None
    defined = [j for j, s in enumerate(hospitals) if s.name not in block["undefined"]]
    for i, entry in enumerate(block["local"]):
        assert (
            entry["model"] == f"Local {hospitals[i].name}"
            and entry["trained_on"] == hospitals[i].name
        )
        expected = [
            roc_auc_score(hospitals[j].y_test, baselines.local_scores[i][j]) for j in defined
        ]
        for j, auroc in zip(defined, expected, strict=True):
            assert entry["per_test_split"][hospitals[j].name] == pytest.approx(auroc)
        assert entry["per_test_split"]["hospital-2"] is None
        assert entry["average"] == pytest.approx(np.mean(expected))
        assert entry["own"] == entry["per_test_split"][hospitals[i].name]
    averages = [e["average"] for e in block["local"]]
    assert block["local_mean"] == pytest.approx(np.mean(averages))
    best = int(np.argmax(averages))
    assert block["local_best"] == {
        "model": f"Local {hospitals[best].name}",
        "average": averages[best],
    }
    # the pooled-scores AUROC of the baseline table ranks hospitals as much as patients: far above
    # the mean local model scored as FLamby does (the report's old "local baseline")
    assert baselines.table[LOCAL_POOLED]["auroc"] > block["local_mean"] + 0.1
    assert "pooled scores" in baselines.table[LOCAL_POOLED]["auroc_method"]


def test_report_and_console_name_the_one_class_test_splits(dirichlet):
    run, hospitals, baselines = dirichlet
    federated = _pooled_logreg_scores(hospitals)
    block = auroc_on_every_test_split(hospitals, federated=federated, baselines=baselines)
    assert block["federated"]["average"] == pytest.approx(
        np.mean([roc_auc_score(hospitals[j].y_test, federated[j]) for j in (0, 3)])
    )
    summary = _summary(run, hospitals, federated, block, baselines)
    report = render_markdown(run, summary, _empty_frame())
    reason = "hospital-2's test split has no AUROC: test split has only one class (39 positive, 0 "
    assert reason in report and "hospital-3's test split has no AUROC" in report
    assert "the averages are over the other 2 test split(s)" in report
    assert "| Local hospital-2 | hospital-2 | " in report and "| undefined | undefined |" in report
    assert "mean over 2 split(s)" in report
    console = Console(record=True, width=300)
    print_summary(console, summary, Path("run"), 1.0)
    text = console.export_text()
    assert reason in text and f"mean {block['local_mean']:.3f}" in text
    assert "(scores of the hospitals' own models pooled)" in text


def test_a_good_federated_model_raises_no_warning(dirichlet):
    run, hospitals, baselines = dirichlet
    federated = _pooled_logreg_scores(hospitals)
    block = auroc_on_every_test_split(hospitals, federated=federated, baselines=baselines)
    assert block["federated"]["average"] > block["local_mean"]
    assert quality_warnings(run, _summary(run, hospitals, federated, block, baselines)) == []


def test_a_constant_model_is_flagged_with_the_figure_and_what_to_try(dirichlet):
    """A model that scores every patient 0.2: it predicts negative for all (the one-class check
    on the report's overall figures) and its AUROC (0.5 on every split) is below the local
    models' mean (FLamby's comparison)."""
    run, hospitals, baselines = dirichlet
    federated = [np.full(s.n_test, 0.2) for s in hospitals]
    block = auroc_on_every_test_split(hospitals, federated=federated, baselines=baselines)
    warnings = quality_warnings(run, _summary(run, hospitals, federated, block, baselines))
    assert len(warnings) == 2
    one_class, below = warnings
    assert one_class.startswith("the federated model predicts negative for every test patient")
    assert "sensitivity 0.000, specificity 1.000" in one_class
    assert f"below the mean local non-private model's, {block['local_mean']:.3f}" in below
    assert "averaged over the 2 hospitals' test splits, 0.500" in below
    for w in warnings:  # what to try, in this CLI's options with this run's values
        assert "--rounds; this run 5" in w and "train.lr=..." in w and "--epsilon" not in w
    report = render_markdown(run, _summary(run, hospitals, federated, block, baselines) | {
        "quality_warnings": warnings}, _empty_frame())  # fmt: skip
    assert f"**Warning: {one_class}**" in report and f"**Warning: {below}**" in report


def _summary(run, hospitals, federated, block, baselines) -> dict:
    """A ``summary.json`` as ``fedcare simulate`` writes it (overall: the pooled test splits)."""
    y = np.concatenate([s.y_test for s in hospitals])
    overall, _ = evaluation_metrics(y, np.concatenate(federated))
    overall["method"] = "pooled test splits of all hospitals (centralized evaluation)"
    return {
        "task": run.task.name, "strategy": "fedavg", "model": run.model.name, "rounds": 5,
        "wall_seconds": 1.0, "dp": {"enabled": False, "level": None},
        "secure_aggregation": {"enabled": False}, "hospitals": [], "overall": overall,
        "failures": [], "baselines": baselines.table, "test_split_auroc": block,
    }  # fmt: skip


def _empty_frame():  # noqa: ANN202
    import pandas as pd

    return pd.DataFrame()


def test_above_the_matrix_limit_the_report_says_it_was_not_computed(dirichlet):
    run, hospitals, baselines = dirichlet
    many = [hospitals[0]] * (MAX_MATRIX_HOSPITALS + 1)
    block = auroc_on_every_test_split(many, federated=None, baselines=baselines)
    assert block == {
        "skipped": f"not computed for {MAX_MATRIX_HOSPITALS + 1} hospitals (at most "
        f"{MAX_MATRIX_HOSPITALS}: the matrix takes N x N AUROCs)"
    }
    summary = _summary(
        run, hospitals, [np.full(s.n_test, 0.7) for s in hospitals], block, baselines
    )
    assert "FLamby's local baseline (every model on every test split): not computed for 51 " in (
        render_markdown(run, summary, _empty_frame())
    )
    assert len(quality_warnings(run, summary)) == 1  # only the one-class check (all positive)
