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
    assert "training prevalence not recorded" not in text and "warning: feature" not in text
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
    delong = result["discrimination"]["auroc_delong"]
    assert delong["value"] == pytest.approx(auroc["value"], abs=1e-12)
    assert delong == v.delong_ci(y, p).as_dict()
    assert "(95 % CI, DeLong)" in text

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
    assert "Bootstrap: BCa, 2000 resamples" in report and "Wilson" in report
    assert result["recalibration"] is None and not (out / "recalibration.png").exists()
    assert "`--recalibrate` fits a hospital-local one" in report
    assert (
        f"| AUROC | {delong['value']:.3f} [{delong['ci_low']:.3f}, {delong['ci_high']:.3f}] | DeLong |"
        in report
    )


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


# --- DeLong's AUROC interval against R's pROC ---
#
# pROC's example data set aSAH (Turck et al., Intensive Care Med 2010;36:107-115; 113 patients
# after aneurysmal subarachnoid haemorrhage), columns outcome (Poor = 1), gender (Female = 1),
# ndka and s100b in pROC's row order (values separated by spaces), copied from the CSV export of the unchanged data set in
# Rdatasets (vincentarelbundock/Rdatasets, csv/NeuroDataSets/SAHemorrhage_df.csv).
ASAH_POOR = "00001101001011001011101000000000100110110000000001100010001010011101101111000110100000010000000000001111110001000"
ASAH_FEMALE = "11111000110100110110111011011011111011011110100001101111010110111000011101010001111101001011111101010111011100110"
ASAH_NDKA = (
    "3.01 8.54 8.09 10.42 17.4 12.75 6 13.2 15.54 6.01 15.96 17.86 5.18 8.9 13.41 20.75 11.6 "
    "16.11 32.37 54.82 32.41 49.94 40.34 9.47 6.29 12.53 6.54 6.3 80.3 12.8 9.8 9.81 9.85 18.21 "
    "5.03 14.04 21.93 8.02 7.42 8.38 6.59 9.63 13.12 7.96 14.34 41.43 7.63 7.06 12.59 13.56 "
    "3.87 9.44 7.66 12.98 419.19 27.19 22.27 9.95 21.22 11.73 10.4 58.83 6.39 11.09 12.22 13.67 "
    "17.21 22.63 12.9 9.7 21.57 8.23 72.57 15.54 10.51 10.6 14.57 5.19 9.63 4.61 21.48 17.3 "
    "12.71 9.44 11.07 19.46 10.83 5.37 11.97 7.75 9.83 10.55 28.49 8.53 12.57 12.9 46.83 11.68 "
    "12.67 9.01 9.57 34.06 11.72 14.26 47.61 11.67 24.58 10.33 13.87 15.89 22.43 6.79 13.45"
)
ASAH_S100B = (
    "0.13 0.14 0.1 0.04 0.13 0.1 0.47 0.16 0.18 0.1 0.12 0.1 0.44 0.71 0.04 0.08 0.49 0.04 0.07 "
    "0.33 0.09 0.09 0.07 0.11 0.07 0.17 0.07 0.11 0.13 0.19 0.05 0.16 0.41 0.14 0.34 0.35 0.48 "
    "0.09 0.96 0.25 0.5 0.46 0.16 0.07 0.43 0.45 0.11 0.08 0.09 0.86 0.52 0.08 0.06 0.13 2.07 "
    "0.1 0.14 0.15 0.07 0.06 0.77 0.05 0.09 0.3 0.03 0.09 0.04 0.23 0.7 0.09 0.27 0.71 0.08 "
    "0.26 0.08 0.16 0.09 0.13 0.1 0.08 0.11 0.33 0.11 0.28 0.07 0.1 0.32 0.22 0.07 0.05 0.24 "
    "0.38 0.1 0.15 0.08 0.14 0.1 0.07 0.04 0.19 0.56 0.14 0.58 0.32 0.82 0.74 0.15 0.47 0.17 "
    "0.44 0.15 0.5 0.48"
)


def _asah(column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.array([int(c) for c in ASAH_POOR])
    female = np.array([c == "1" for c in ASAH_FEMALE])
    return y, np.array(column.split(), dtype=float), female


def test_delong_interval_equals_proc_on_asah():
    # pROC's own tests (xrobin/pROC, tests/testthat/test-ci.auc.R): ci.auc(roc(aSAH$outcome,
    # aSAH$ndka)) = 0.501244999271703, 0.611957994579946, 0.722670989888189 (DeLong by default),
    # and on the women only 0.5261398281, 0.6671428571, 0.8081458862.
    y, ndka, female = _asah(ASAH_NDKA)
    assert len(y) == 113 and y.sum() == 41
    ci = v.delong_ci(y, ndka)
    assert (ci.low, ci.value, ci.high) == pytest.approx(
        (0.501244999271703, 0.611957994579946, 0.722670989888189), abs=1e-12
    )
    women = v.delong_ci(y[female], ndka[female])
    assert (women.low, women.value, women.high) == pytest.approx(
        (0.5261398281, 0.6671428571, 0.8081458862), abs=1e-9
    )
    # pROC's documentation (?ci.auc, ?roc): roc(aSAH$outcome, aSAH$s100b) has AUC 0.7314,
    # 95 % CI 0.6301-0.8326 (DeLong); s100b has many ties
    y, s100b, _ = _asah(ASAH_S100B)
    ci = v.delong_ci(y, s100b)
    assert round(ci.value, 4) == 0.7314
    assert (round(ci.low, 4), round(ci.high, 4)) == (0.6301, 0.8326)


def test_delong_interval_is_undefined_without_two_patients_per_class():
    assert v.delong_ci(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3])).value is None
    one = v.delong_ci(np.array([1, 0, 0]), np.array([0.9, 0.2, 0.3]))
    assert one.value == 1.0 and one.low is None and "fewer than 2" in one.note


# --- --recalibrate ---


def test_recalibrate_is_recorded_and_the_model_file_untouched(
    trained, tmp_path, monkeypatch, capsys
):
    import hashlib

    run, data = trained
    weights = run / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = tmp_path / "eval"
    code, text = run_fedcare_main(
        monkeypatch, capsys, "evaluate", "--model", str(run), "--data", str(data),
        "--out", str(out), "--recalibrate",
    )  # fmt: skip
    assert code == 0, text
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    result = json.loads((out / "evaluation.json").read_text())
    recal = result["recalibration"]
    y, p = _scores(run, data)
    fit = LogisticRegression(C=np.inf, max_iter=1000).fit(v.logit(p).reshape(-1, 1), y)
    assert recal["slope"] == pytest.approx(fit.coef_[0, 0], rel=1e-6)
    assert recal["intercept"] == pytest.approx(fit.intercept_[0], rel=1e-6)
    assert recal["applied_to_model"] is False
    assert recal["before"] == result["calibration"]
    assert recal["after"]["brier"] > 0 and (out / "recalibration.png").exists()
    assert "recalibration.png" in result["figures"]
    report = (out / "report.md").read_text()
    assert "## Hospital-local recalibration (--recalibrate)" in report
    assert "NOT applied to the model file" in report and "cross-fitted" in report
    assert "hospital-local recalibration" in text and "not applied to the model" in text


def test_recalibration_repairs_a_miscalibrated_model_out_of_sample():
    # true risk sigmoid(z); the model reports sigmoid(2 z + 1): over-confident and too high
    rng = np.random.default_rng(3)
    z = rng.normal(-1.0, 1.2, 4000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(int)
    p = 1 / (1 + np.exp(-(2 * z + 1)))
    recal = v.recalibration(y, p)
    # logit p = 2 z + 1, so z = 0.5 logit p - 0.5: slope 0.5 and intercept -0.5
    assert recal["slope"] == pytest.approx(0.5, abs=0.05)
    assert recal["intercept"] == pytest.approx(-0.5, abs=0.1)
    after = recal["after"]
    assert after["slope"] == pytest.approx(1.0, abs=0.1)
    assert abs(after["calibration_in_the_large"]) < 0.02
    assert after["brier"] < recal["before"]["brier"]
    assert recal["auroc_after"] == pytest.approx(v.auroc(y, p), abs=0.01)
    back = v.apply_recalibration(p, intercept=recal["intercept"], slope=recal["slope"])
    assert v.calibration(y, back)["slope"] == pytest.approx(1.0, abs=1e-4)


def test_recalibration_of_perfectly_separating_scores_is_not_fitted():
    recal = v.recalibration(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert recal["slope"] is None and recal["after"] is None
    assert "separate the classes perfectly" in recal["note"]


# --- shift against the model card's training data ---


def test_the_card_records_the_exact_training_data_and_evaluate_warns_of_shift(
    trained, tmp_path, monkeypatch, capsys
):
    import pandas as pd

    from shared_models.config import RunConfig
    from shared_models.hospitals import simulated_hospitals_for

    run, data = trained
    card = json.loads((run / "model.json").read_text())
    block = card["training_data"]
    assert block["exact"] is True and block["provenance"].startswith("exact: fedcare simulate")
    recorded = json.loads(sorted((run / "checkpoints").glob("round-*.json"))[-1].read_text())
    config = RunConfig.from_run_config(recorded["run_config"])
    hospitals = simulated_hospitals_for(config, len(card["training"]["hospitals"]))
    y = np.concatenate([s.y_train for s in hospitals])
    assert block["prevalence"] == pytest.approx(y.mean())
    assert set(block["hospitals"]) == {s.name for s in hospitals}
    x = np.concatenate([s.x_train for s in hospitals])
    assert block["features"]["mean texture"]["mean"] == pytest.approx(x[:, 1].mean(), rel=1e-6)

    # the same hospital's file with 'mean texture' read in another unit (x 1.4, inside the task
    # file's valid range): evaluate names that feature and no other
    frame = pd.read_csv(data)
    frame["mean texture"] = (frame["mean texture"] * 1.4).clip(upper=39.28)
    shifted = tmp_path / "shifted.csv"
    frame.to_csv(shifted, index=False)
    code, text = run_fedcare_main(
        monkeypatch, capsys, "evaluate", "--model", str(run), "--data", str(shifted),
        "--out", str(tmp_path / "eval"),
    )  # fmt: skip
    assert code == 0, text
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    warned = result["shift"]["feature_warnings"]
    assert len(warned) == 1 and warned[0].startswith("feature 'mean texture'")
    assert "warning: feature 'mean texture'" in text
    assert result["training_prevalence"] == pytest.approx(y.mean())
    assert "> warning: feature 'mean texture'" in (tmp_path / "eval" / "report.md").read_text()


def test_feature_shift_by_hand():
    rng = np.random.default_rng(0)
    train = rng.normal(0.0, 1.0, (1000, 2))
    profile = v.feature_profile(train, ["a", "b"])
    same = v.feature_shift(profile, rng.normal(0.0, 1.0, (300, 2)), ["a", "b"])
    assert same == []
    moved = np.column_stack([rng.normal(0.8, 1.0, 300), rng.normal(0.0, 1.0, 300)])
    (warning,) = v.feature_shift(profile, moved, ["a", "b"])
    assert warning.startswith("feature 'a': mean 0.") and "standardised difference" in warning
    assert warning.endswith("(model-input units)")
    wide = np.column_stack([rng.normal(0.0, 1.0, 300), rng.normal(0.0, 4.0, 300)])
    (warning,) = v.feature_shift(profile, wide, ["a", "b"])
    assert warning.startswith("feature 'b':") and "outside the training range" in warning


def test_evaluate_shows_the_hospitals_own_attributions(trained, tmp_path, monkeypatch, capsys):
    """The non-private attributions (issue #26) are in the hospital's own report and JSON only, equal
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
