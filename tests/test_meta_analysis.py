"""Random-effects meta-analysis against a published worked example, and the noisy-histogram
figures against exact ones on bin-rounded scores (acceptance 1 of issue 25)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from shared_models.meta_analysis import pooled_auroc, random_effects
from shared_models.metrics import HISTOGRAM_BINS, operating_point_metrics, score_histograms
from shared_models.noisy_metrics import (
    READABLE_WIDTH,
    histogram_calibration,
    histogram_intervals,
    pooled_histograms,
    readable_text,
)

# BCG vaccine trials (Colditz et al., JAMA 1994; metafor's dat.bcg): (tpos, tneg, cpos, cneg)
BCG = [(4, 119, 11, 128), (6, 300, 29, 274), (3, 228, 11, 209), (62, 13536, 248, 12619),
       (33, 5036, 47, 5761), (180, 1361, 372, 1079), (8, 2537, 10, 619), (505, 87886, 499, 87892),
       (29, 7470, 45, 7232), (17, 1699, 65, 1600), (186, 50448, 141, 27197), (5, 2493, 3, 2338),
       (27, 16886, 29, 17825)]  # fmt: skip
# metafor::rma(measure = "RR", data = dat.bcg, method = "DL") (Viechtbauer, J Stat Softw 2010)
PUBLISHED = {"estimate": -0.7141, "se": 0.1787, "ci": (-1.0644, -0.3638), "tau2": 0.3088,
             "i2": 0.9212, "q": 152.2330}  # fmt: skip


def _bcg() -> tuple[np.ndarray, np.ndarray]:
    tp, tn, cp, cn = np.asarray(BCG, dtype=float).T
    log_rr = np.log((tp / (tp + tn)) / (cp / (cp + cn)))
    return log_rr, 1 / tp - 1 / (tp + tn) + 1 / cp - 1 / (cp + cn)


def test_dersimonian_laird_matches_metafor_on_the_bcg_trials():
    fit = random_effects(*_bcg())
    assert fit.k == 13
    assert fit.estimate == pytest.approx(PUBLISHED["estimate"], abs=1e-4)
    assert fit.se == pytest.approx(PUBLISHED["se"], abs=1e-4)
    assert fit.ci == pytest.approx(PUBLISHED["ci"], abs=1e-4)
    assert fit.tau2 == pytest.approx(PUBLISHED["tau2"], abs=1e-4)
    assert fit.i2 == pytest.approx(PUBLISHED["i2"], abs=1e-4)
    assert fit.q == pytest.approx(PUBLISHED["q"], abs=1e-3) and fit.q_p < 1e-20
    # Higgins, Thompson & Spiegelhalter 2009: mu +- t_{k-2} sqrt(tau2 + se^2), by hand from the
    # published figures: t_{11, 0.975} = 2.2010
    half = 2.2010 * math.sqrt(PUBLISHED["tau2"] + PUBLISHED["se"] ** 2)
    expected = (PUBLISHED["estimate"] - half, PUBLISHED["estimate"] + half)
    assert fit.prediction == pytest.approx(expected, abs=2e-3)
    assert fit.prediction[0] < fit.ci[0] and fit.prediction[1] > fit.ci[1]


def test_identical_hospitals_have_no_heterogeneity_and_two_have_no_prediction_interval():
    fit = random_effects([0.5, 0.5, 0.5], [0.01, 0.02, 0.03])
    assert fit.tau2 == 0 and fit.i2 == 0 and fit.estimate == pytest.approx(0.5)
    # tau2 = 0: the fixed-effect (inverse-variance) estimate and its SE
    assert fit.se == pytest.approx(1 / math.sqrt(100 + 50 + 100 / 3))
    assert random_effects([0.1, 0.3], [0.01, 0.01]).prediction is None
    with pytest.raises(ValueError, match="at least 2"):
        random_effects([0.1], [0.01])
    with pytest.raises(ValueError, match="> 0"):
        random_effects([0.1, 0.2], [0.01, 0.0])


def test_pooled_auroc_works_on_the_logit_scale():
    aurocs, ses = [0.80, 0.85, 0.90], [0.03, 0.03, 0.03]
    out = pooled_auroc(aurocs, ses)
    logit = np.log(np.asarray(aurocs) / (1 - np.asarray(aurocs)))
    variances = (np.asarray(ses) / (np.asarray(aurocs) * (1 - np.asarray(aurocs)))) ** 2
    fit = random_effects(logit, variances)
    assert out["auroc"] == pytest.approx(1 / (1 + math.exp(-fit.estimate)))
    assert out["ci"][0] < out["auroc"] < out["ci"][1] < 1
    assert out["prediction"][0] <= out["ci"][0] and out["i2"] == pytest.approx(fit.i2)


def test_pooled_auroc_of_aurocs_at_the_clip_with_wide_errors_does_not_overflow():
    # Near-perfect noisy AUROCs with bootstrap SEs of 0.3: the delta-method SE on the logit scale
    # is thousands, so a bound sits at logit -5000 (CI run 32 failed here with "math range error")
    out = pooled_auroc([0.99999, 0.99999, 0.99999], [0.3, 0.3, 0.3])
    assert out["auroc"] == pytest.approx(1 - 1e-4)
    assert out["ci"][0] == pytest.approx(0.0) and out["ci"][1] == pytest.approx(1.0)
    assert out["prediction"][0] == pytest.approx(0.0)


def _bin_rounded(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores already at their bin's midpoint (so exact = histogram figures)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    raw = 1 / (1 + np.exp(-(2.5 * (2 * y - 1) + rng.normal(0, 1.5, n))))
    idx = np.clip((raw * HISTOGRAM_BINS).astype(int), 0, HISTOGRAM_BINS - 1)
    return y, (idx + 0.5) / HISTOGRAM_BINS


def test_histogram_figures_equal_exact_ones_on_bin_rounded_scores():
    y, p = _bin_rounded(400, seed=1)
    neg, pos = score_histograms(y, p)
    out = histogram_intervals(neg, pos, noise_multiplier=0.0)
    pred = p >= 0.5
    exact = {
        "auroc": roc_auc_score(y, p),
        "accuracy": float(np.mean(pred == y)),
        "sensitivity": float(pred[y == 1].mean()),
        "specificity": float((~pred)[y == 0].mean()),
        "auprc": average_precision_score(y, p),
        **operating_point_metrics(y, p)[0],
    }
    assert set(exact) == set(out)
    for name, value in exact.items():
        assert out[name]["value"] == pytest.approx(value, abs=1e-12), name
        lo, hi = out[name]["ci"]
        assert lo <= value <= hi and out[name]["readable"], name
    cal = histogram_calibration(neg, pos)
    assert cal["calibration_in_the_large"] == pytest.approx(y.mean() - p.mean(), abs=1e-12)
    for row in cal["bins"]:
        in_bin = np.isclose(p, row["predicted"])
        assert row["n"] == in_bin.sum()
        if in_bin.any():
            assert row["observed"] == pytest.approx(y[in_bin].mean())


def test_the_noisy_interval_covers_the_exact_auroc_and_widens_with_the_noise():
    """Coverage over repeated releases of the same hospital: the interval, which re-draws the
    noise and the patients, holds the exact (bin-rounded) AUROC in most releases; an interval
    of the sampling alone would miss it far more often at sigma = 5."""
    y, p = _bin_rounded(300, seed=2)
    neg, pos = score_histograms(y, p)
    exact = roc_auc_score(y, p)
    rng = np.random.default_rng(7)
    covered, widths, widths_exact = 0, [], []
    for _ in range(40):
        noisy_neg = np.rint(neg + rng.normal(0, 5.0, len(neg)))
        noisy_pos = np.rint(pos + rng.normal(0, 5.0, len(pos)))
        out = histogram_intervals(noisy_neg, noisy_pos, noise_multiplier=5.0, draws=300)
        lo, hi = out["auroc"]["ci"]
        covered += lo <= exact <= hi
        widths.append(hi - lo)
        plain = histogram_intervals(noisy_neg, noisy_pos, noise_multiplier=0.0, draws=300)
        widths_exact.append(plain["auroc"]["ci"][1] - plain["auroc"]["ci"][0])
    assert covered >= 34, covered  # 95 % nominal; 34 of 40 is below its binomial 1 % quantile
    assert np.mean(widths) > 1.3 * np.mean(widths_exact)


def test_a_figure_too_noisy_to_read_says_so_instead_of_a_number():
    """The issue's loopback case: sigma = 5 on a hospital of 57 test patients."""
    y, p = _bin_rounded(57, seed=3)
    neg, pos = score_histograms(y, p)
    rng = np.random.default_rng(0)
    noisy = [np.rint(h + rng.normal(0, 5.0, len(h))) for h in (neg, pos)]
    out = histogram_intervals(*noisy, noise_multiplier=5.0)
    unreadable = [name for name, entry in out.items() if not entry["readable"]]
    assert "auroc" in unreadable, out["auroc"]
    text = readable_text(out["auroc"])
    assert text.startswith("too") and not text[0].isdigit()
    if out["auroc"]["ci"] is not None:
        assert out["auroc"]["ci"][1] - out["auroc"]["ci"][0] > READABLE_WIDTH
    # a large hospital's release of the same model reads fine at the same noise
    y, p = _bin_rounded(3000, seed=3)
    neg, pos = score_histograms(y, p)
    noisy = [np.rint(h + rng.normal(0, 5.0, len(h))) for h in (neg, pos)]
    big = histogram_intervals(*noisy, noise_multiplier=5.0)
    assert big["auroc"]["readable"] and readable_text(big["auroc"])[0].isdigit()


def test_pooled_noise_adds_in_quadrature():
    a, b = (np.ones(10), np.ones(10), 3.0), (np.ones(10) * 2, np.zeros(10), 4.0)
    neg, pos, sigma = pooled_histograms([a, b])
    assert sigma == pytest.approx(5.0) and neg.tolist() == [3.0] * 10 and pos.sum() == 10


def test_the_t_quantile_used_for_the_prediction_interval():
    assert stats.t.ppf(0.975, df=11) == pytest.approx(2.2010, abs=1e-4)


def test_hospital_heterogeneity_uses_the_hospitals_with_an_auroc_and_a_standard_error():
    from shared_models.meta_analysis import hospital_heterogeneity

    out = hospital_heterogeneity(
        [("a", 0.80, 0.03), ("b", 0.85, 0.03), ("c", None, None), ("d", 0.90, None)],
        within="DeLong",
    )
    assert out["hospitals"] == ["a", "b"] and out["within_hospital_se"] == "DeLong"
    assert out["auroc"] == pytest.approx(pooled_auroc([0.80, 0.85], [0.03, 0.03])["auroc"])
    note = hospital_heterogeneity([("a", 0.8, 0.03), ("d", 0.9, None)], within="DeLong")
    assert note == {"note": "1 hospital(s) with a defined AUROC and standard error: a "
                    "random-effects meta-analysis needs at least 2"}  # fmt: skip
