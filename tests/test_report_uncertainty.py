"""``fedcare simulate``'s report gains the final model's uncertainty and calibration: figures of a
real in-process simulation checked against direct computations on the same scores."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from rich.console import Console
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from server.report import print_summary, render_markdown
from shared_models import validation as v
from simulations.uncertainty import final_model_validation, write_calibration_figure

SECTION = "## Uncertainty and calibration (pooled test splits, final model)"


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):  # type: ignore[no-untyped-def]
    """(run folder, summary.json, hospitals, the final model's scores per hospital): a 2-round
    non-private breast-cancer run through the real ``fedcare simulate`` (in this process); the
    scores are those the harness hands to :func:`final_model_validation`."""
    import simulations.uncertainty as uncertainty
    from simulations.cli import app

    seen = {}

    def spy(hospitals, federated, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(hospitals=hospitals, scores=federated)
        return final_model_validation(hospitals, federated, **kwargs)

    run = tmp_path_factory.mktemp("uncertainty") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uncertainty, "final_model_validation", spy)
        app(["simulate", "--no-dp", "--rounds", "2", "--seed", "0", "--out", str(run),
             "--backend", "in-process"], standalone_mode=False)  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    return run, summary, seen["hospitals"], seen["scores"]


def test_pooled_intervals_and_calibration_match_direct_computations(simulated):
    _, summary, hospitals, scores = simulated
    block = summary["validation"]
    y = np.concatenate([s.y_test for s in hospitals]).astype(int)
    p = np.concatenate(scores)
    assert block["n"] == len(y) and block["positives"] == int(y.sum())
    auroc, auprc = block["auroc"], block["auprc"]
    assert auroc["value"] == pytest.approx(roc_auc_score(y, p))
    assert auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"]
    assert auprc["value"] == pytest.approx(average_precision_score(y, p))
    assert auprc["ci_low"] <= auprc["value"] <= auprc["ci_high"]
    assert block["bootstrap"]["method"] == "BCa" and block["bootstrap"]["resamples"] == 2000
    cal = block["calibration"]
    fit = LogisticRegression(C=np.inf, max_iter=1000).fit(v.logit(p).reshape(-1, 1), y)
    assert cal["slope"] == pytest.approx(fit.coef_[0, 0], rel=1e-6)
    assert cal["intercept"] == pytest.approx(fit.intercept_[0], rel=1e-6, abs=1e-9)
    assert cal["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert cal["calibration_in_the_large"] == pytest.approx(y.mean() - p.mean())
    tp = int(((p >= 0.5) & (y == 1)).sum())
    sens = block["threshold_0.5"]["sensitivity"]
    assert sens["value"] == pytest.approx(tp / y.sum()) and sens["ci_low"] <= sens["value"]
    for s, q in zip(hospitals, scores, strict=True):  # each hospital's own bootstrap
        own = block["per_hospital_auroc"][s.name]
        assert own["value"] == pytest.approx(roc_auc_score(s.y_test, q))
        assert own["ci_low"] <= own["value"] <= own["ci_high"]


def test_the_run_folder_has_the_figure_and_the_report_section(simulated):
    run, summary, _, _ = simulated
    assert (run / "calibration.png").stat().st_size > 1000
    report = (run / "report.md").read_text()
    assert SECTION in report and "![Reliability diagram](calibration.png)" in report
    auroc = summary["validation"]["auroc"]
    ci = f"{auroc['value']:.3f} [{auroc['ci_low']:.3f}, {auroc['ci_high']:.3f}]"
    assert f"| AUROC | {ci} | 1 |" in report
    assert "BCa bootstrap" in report and "Wilson" in report and "Cox 1958" in report
    console = Console(record=True, width=300)
    print_summary(console, summary, run, 1.0)
    assert f"overall AUROC {ci}, AUPRC " in console.export_text()


def test_no_block_when_no_hospital_trained_and_one_class_hospitals_named(simulated, tmp_path):
    _, summary, hospitals, scores = simulated
    skipped = final_model_validation(hospitals, None, why_not="no hospital trained: refused")
    assert skipped == {"skipped": "no hospital trained: refused"}
    assert write_calibration_figure(tmp_path, skipped) is None and not any(tmp_path.iterdir())
    report = render_markdown(_run_config(), summary | {"validation": skipped}, _frame())
    assert f"{SECTION}\n\nNot computed: no hospital trained: refused." in report
    deployed = {k: val for k, val in summary.items() if k != "validation"}
    assert SECTION not in render_markdown(_run_config(), deployed, _frame())
    one_class = hospitals[0].y_test * 0  # a hospital whose test split has negatives only
    first = dataclasses.replace(hospitals[0], y_test=one_class)
    block = final_model_validation([first, *hospitals[1:]], scores)
    note = block["per_hospital_auroc"][first.name]
    assert note["value"] is None and note["note"].startswith("undefined: test split has only one")


def test_vectorised_auprc_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (30, 40))
    p = np.round(rng.random((30, 40)), 1)  # many ties
    expected = [average_precision_score(a, b) for a, b in zip(y, p, strict=True)]
    assert np.allclose(v.auprc(y, p, axis=-1), expected)
    assert np.allclose(v.auprc(y.T, p.T, axis=0), expected)
    assert np.isnan(v.auprc(np.zeros(5), np.arange(5.0)))


def _run_config():  # type: ignore[no-untyped-def]
    from server.run_config import default_run_config
    from shared_models.config import RunConfig

    return RunConfig.from_run_config(default_run_config() | {"dp.enabled": False})


def _frame():  # type: ignore[no-untyped-def]
    import pandas as pd

    return pd.DataFrame()


def test_between_hospital_heterogeneity_from_each_hospitals_delong_se(simulated):
    """TRIPOD-Cluster: the random-effects pooled AUROC over the hospitals' own test splits, from
    each hospital's AUROC and DeLong SE, in summary.json, report.md and the model card."""
    from shared_models.meta_analysis import pooled_auroc

    run, summary, hospitals, scores = simulated
    het = summary["validation"]["heterogeneity"]
    own = [v.delong_auroc_se(s.y_test, q) for s, q in zip(hospitals, scores, strict=True)]
    assert [a for a, _ in own] == pytest.approx(
        [roc_auc_score(s.y_test, q) for s, q in zip(hospitals, scores, strict=True)]
    )
    expected = pooled_auroc([a for a, _ in own], [se for _, se in own])
    assert het["hospitals"] == [s.name for s in hospitals]
    assert het["auroc"] == pytest.approx(expected["auroc"]) and het["i2"] == pytest.approx(
        expected["i2"]
    )
    assert min(a for a, _ in own) <= het["auroc"] <= max(a for a, _ in own)
    line = f"| random-effects pooled AUROC | {het['auroc']:.3f} |"
    assert line in (run / "report.md").read_text() and line in (run / "model.md").read_text()
    assert "No confidence intervals" not in (run / "model.md").read_text()
    assert f"\n#{SECTION}\n" in (run / "model.md").read_text()  # nested under Performance
