"""``fedcare evaluate``: external validation of a model trained by the real ``fedcare simulate``,
checked against direct scikit-learn computations and hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from shared_models import validation as v
from shared_models.metrics import operating_point_metrics
from simulations.external_validation import load_model, load_records, locate_model
from tests.handlers import run_fedcare_main

FILES = {
    "report.md",
    "evaluation.json",
    "roc.png",
    "pr.png",
    "calibration.png",
    "decision-curve.png",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """(run folder, one hospital's CSV): a 2-round non-private breast-cancer run through the real
    ``fedcare simulate`` command (in this process), and its hospitals exported as files."""
    from simulations.cli import app

    root = tmp_path_factory.mktemp("evaluate")
    run = root / "run"
    common = ["--no-dp", "--rounds", "2", "--seed", "0"]
    app(["simulate", *common, "--out", str(run), "--backend", "in-process"], standalone_mode=False)
    app(["simulate", *common, "--export-hospitals", str(root / "hosp")], standalone_mode=False)
    assert (run / "model.safetensors").exists()
    return run, root / "hosp" / "hospital-2.csv"


def _scores(run: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    saved = locate_model(run)
    x, y = load_records(saved.task, saved.card["preprocessing"], data)
    from shared_models.models import predict_proba

    return y, predict_proba(load_model(saved), x)


def test_evaluate_writes_the_report_and_matches_sklearn(trained, tmp_path, monkeypatch, capsys):
    run, data = trained
    out = tmp_path / "eval"
    code, text = run_fedcare_main(
        monkeypatch, capsys, "evaluate", "--model", str(run), "--data", str(data), "--out", str(out)
    )
    assert code == 0, text
    assert {p.name for p in out.iterdir()} >= FILES
    assert "AUROC" in text and "calibration slope" in text and str(out / "report.md") in text
    assert "training prevalence not recorded" in text
    result = json.loads((out / "evaluation.json").read_text())
    y, p = _scores(run, data)
    assert result["n"] == len(y) == 190

    auroc = result["discrimination"]["auroc"]
    assert auroc["value"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert 0.0 <= auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"] <= 1.0
    auprc = result["discrimination"]["auprc"]
    assert 0.0 <= auprc["ci_low"] <= auprc["value"] <= auprc["ci_high"] <= 1.0
    assert result["discrimination"]["bootstrap"]["resamples"] == 2000
    assert f"{auroc['value']:.3f} [{auroc['ci_low']:.3f}, {auroc['ci_high']:.3f}]" in text

    fit = LogisticRegression(C=np.inf, max_iter=1000).fit(v.logit(p).reshape(-1, 1), y)
    cal = result["calibration"]
    assert cal["slope"] == pytest.approx(fit.coef_[0, 0], rel=1e-6)
    assert cal["intercept"] == pytest.approx(fit.intercept_[0], rel=1e-6)
    assert cal["calibration_in_the_large"] == pytest.approx(y.mean() - p.mean())

    dca = result["decision_curve"]
    i = dca["threshold"].index(0.2)
    tp, fp = int(((p >= 0.2) & (y == 1)).sum()), int(((p >= 0.2) & (y == 0)).sum())
    assert dca["model"][i] == pytest.approx(tp / len(y) - fp / len(y) * 0.2 / 0.8)
    assert dca["treat_all"][i] == pytest.approx(y.mean() - (1 - y.mean()) * 0.25)

    reference, _ = operating_point_metrics(y, p)
    at_08 = result["operating_points"]["sensitivity_0.8"]
    assert at_08["sensitivity"]["value"] == pytest.approx(reference["sensitivity@sens0.8"])
    assert at_08["specificity"]["value"] == pytest.approx(reference["specificity@sens0.8"])
    sens = result["operating_points"]["threshold_0.5"]["sensitivity"]
    assert sens["ci_low"] <= sens["value"] <= sens["ci_high"]
    report = (out / "report.md").read_text()
    assert "BCa bootstrap, 2000 resamples" in report and "Wilson" in report


def test_a_task_mismatch_is_one_clear_error(trained, tmp_path, monkeypatch, capsys):
    run, data = trained
    out = tmp_path / "eval"
    code, text = run_fedcare_main(
        monkeypatch, capsys, "evaluate", "--model", str(run / "model.safetensors"),
        "--data", str(data), "--task", "heart-disease", "--out", str(out),
    )  # fmt: skip
    assert code == 2
    assert "Traceback" not in text and text.count("error:") == 1
    assert "breast-cancer" in text and "heart-disease" in text
    assert not out.exists()


def test_data_the_task_loader_rejects_is_one_clear_error(trained, tmp_path, monkeypatch, capsys):
    run, _ = trained
    bad = tmp_path / "bad.csv"
    bad.write_text("not,the,schema\n1,2,3\n")
    code, text = run_fedcare_main(
        monkeypatch, capsys, "evaluate", "--model", str(run), "--data", str(bad),
        "--out", str(tmp_path / "eval"),
    )  # fmt: skip
    assert code == 2 and "Traceback" not in text and text.count("error:") == 1
    assert str(bad) in text


def test_a_non_empty_out_is_refused_and_kept(trained, tmp_path, monkeypatch, capsys):
    run, data = trained
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.md").write_text("earlier report")
    code, text = run_fedcare_main(
        monkeypatch, capsys, "evaluate", "--model", str(run), "--data", str(data), "--out", str(out)
    )
    assert code == 2 and "not empty" in text and "Traceback" not in text
    assert [p.name for p in out.iterdir()] == ["report.md"]
    assert (out / "report.md").read_text() == "earlier report"


# --- the methods on synthetic and hand-computed cases (no model) ---


def test_auroc_equals_sklearn_with_ties():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    p = np.array([0.1, 0.4, 0.4, 0.8, 0.3, 0.3, 0.9, 0.2])
    assert v.auroc(y, p) == pytest.approx(roc_auc_score(y, p))


def test_calibration_slope_on_calibrated_and_over_confident_scores():
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 1.5, 20_000)
    p = 1 / (1 + np.exp(-z))
    y = (rng.random(z.size) < p).astype(int)
    good = v.calibration(y, p)
    assert good["slope"] == pytest.approx(1.0, abs=0.05)
    assert good["intercept"] == pytest.approx(0.0, abs=0.05)
    over = v.calibration(y, 1 / (1 + np.exp(-2 * z)))  # logits doubled: too extreme
    assert over["slope"] == pytest.approx(0.5, abs=0.03)


def test_net_benefit_by_hand():
    # 10 patients, 4 positive; at pt = 0.25 the model treats 5 (3 TP, 2 FP):
    # NB = 3/10 - 2/10 * 0.25/0.75 = 0.3 - 0.0667 = 0.2333
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.1, 0.6, 0.25, 0.2, 0.1, 0.05, 0.0])
    assert v.net_benefit(y, p, np.array([0.25]))[0] == pytest.approx(0.3 - 0.2 / 3)
    curve = v.decision_curve(y, p, np.array([0.25]))
    assert curve["treat_all"][0] == pytest.approx(0.4 - 0.6 / 3)


def test_wilson_interval_by_hand():
    # Wilson (1927) for 8/10 at 95 %: centre (8 + z^2/2)/(10 + z^2), z = 1.959964
    ci = v.wilson_ci(8, 10)
    z = 1.959963984540054
    centre = (8 + z**2 / 2) / (10 + z**2)
    half = z / (10 + z**2) * np.sqrt(8 * 2 / 10 + z**2 / 4)
    assert (ci.low, ci.high) == pytest.approx((centre - half, centre + half))
    assert v.wilson_ci(0, 0).value is None


def test_evaluate_shows_the_sites_own_attributions(trained, tmp_path, monkeypatch, capsys):
    """The non-private attributions (issue #26) are in the site's own report and JSON only, equal
    to Integrated Gradients recomputed here."""
    from shared_models.attributions import feature_attributions

    run, data = trained
    out = tmp_path / "eval"
    code, text = run_fedcare_main(
        monkeypatch, capsys, "evaluate", "--model", str(run), "--data", str(data), "--out", str(out)
    )
    assert code == 0, text
    block = json.loads((out / "evaluation.json").read_text())["attributions"]
    saved = locate_model(run)
    x, _ = load_records(saved.task, saved.card["preprocessing"], data)
    mine = np.abs(feature_attributions(load_model(saved), x, axis=0)).mean(axis=0)
    assert block["mean_abs"] == pytest.approx(mine.tolist(), rel=1e-6)
    assert block["features"][0] == "mean radius" and block["n"] == 190
    assert (out / "importance.png").exists()
    report = (out / "report.md").read_text()
    assert "non-private: these never leave this machine" in report
    assert f"| {block['features'][block['ranking'][0]]} | {max(mine):.3f} |" in report
