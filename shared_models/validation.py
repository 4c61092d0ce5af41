"""External validation of a trained binary classifier on one hospital's records: discrimination with
confidence intervals, operating points, calibration and clinical utility.

Pure functions of labels ``y [N]`` in {0, 1} and predicted probabilities ``p [N]`` of class 1;
``fedcare evaluate`` (:mod:`simulations.external_validation`) calls them and writes the report.
What is computed follows the TRIPOD+AI items on model performance (Collins et al., BMJ
2024;385:e078378): discrimination, calibration and clinical utility, each with its uncertainty.

Methods and the library functions wrapped:

- AUROC (``sklearn.metrics.roc_auc_score``; here its Mann-Whitney form, equal to it with ties
  counted one half) and AUPRC (``sklearn.metrics.average_precision_score``), with 95 % bootstrap
  confidence intervals: ``scipy.stats.bootstrap``, patients resampled with their label and score
  (``paired=True``), :data:`BOOTSTRAP_RESAMPLES` resamples, bias-corrected and accelerated
  (:data:`BOOTSTRAP_METHOD`; Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993,
  ch. 14), seeded.
- AUROC with DeLong's asymptotic 95 % confidence interval (DeLong, DeLong & Clarke-Pearson,
  Biometrics 1988;44:837-845), its variance computed from mid-ranks by the fast algorithm of Sun
  & Xu (IEEE Signal Processing Letters 2014;21:1389-1393), as R's ``pROC::ci.auc`` does by
  default.
- Sensitivity, specificity, PPV and NPV with Wilson score intervals (Wilson, JASA 1927;
  ``scipy.stats.binomtest(...).proportion_ci(method="wilson")``).
- Calibration: Brier score (``sklearn.metrics.brier_score_loss``), calibration-in-the-large
  (mean predicted risk against the observed rate), calibration slope and intercept by logistic
  recalibration, ``logit P(y=1) = a + b logit(p)`` fitted without penalty (Cox, Biometrika 1958;
  ``sklearn.linear_model.LogisticRegression(C=inf)``), reliability diagram
  (``sklearn.calibration.calibration_curve``).
- Decision curve: net benefit ``TP/n - FP/n * pt / (1 - pt)`` at threshold probabilities ``pt``
  against treating all and treating none (Vickers & Elkin, Med Decis Making 2006;26:565-574).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_METHOD = "BCa"
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def bootstrap_description() -> dict[str, object]:
    """How the intervals of :func:`bootstrap_ci` are computed, for reports and JSON."""
    return {
        "method": BOOTSTRAP_METHOD,
        "resamples": BOOTSTRAP_RESAMPLES,
        "seed": BOOTSTRAP_SEED,
        "confidence": CONFIDENCE,
        "library": "scipy.stats.bootstrap (paired)",
    }


RELIABILITY_BINS = 10
DECISION_THRESHOLDS = np.round(np.arange(1, 100) / 100, 2)  # pt = 0.01 ... 0.99
LOGIT_CLIP = 1e-6  # probabilities are clipped to [1e-6, 1 - 1e-6] before the logit


def auroc(y: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """AUROC as the Mann-Whitney statistic, vectorised over ``axis`` (for the bootstrap).

    ``(sum of the positives' mid-ranks - n1 (n1 + 1) / 2) / (n1 n0)``: equal to
    ``sklearn.metrics.roc_auc_score(y, p)`` (a tied positive/negative pair counts one half); NaN
    where a sample has one class only.

    Parameters
    ----------
    y : np.ndarray
        ``[..., N]`` labels in {0, 1}.
    p : np.ndarray
        ``[..., N]`` scores.
    """
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=float)
    ranks = rankdata(np.asarray(p, dtype=float), axis=axis)
    n1 = y.sum(axis=axis)
    n0 = y.shape[axis] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((ranks * y).sum(axis=axis) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return float(out) if np.ndim(out) == 0 else out


def auprc(y: np.ndarray, p: np.ndarray, axis: int = -1) -> np.ndarray | float:
    """AUPRC as average precision, vectorised over ``axis`` (for the bootstrap).

    ``sum_k (R_k - R_(k-1)) P_k`` over the distinct thresholds in decreasing order, tied scores
    entering together: equal to ``sklearn.metrics.average_precision_score(y, p)``; NaN where a
    sample has no positive.

    Parameters
    ----------
    y : np.ndarray
        ``[..., N]`` labels in {0, 1}.
    p : np.ndarray
        ``[..., N]`` scores.
    """
    y = np.moveaxis(np.asarray(y, dtype=float), axis, -1)
    p = np.moveaxis(np.asarray(p, dtype=float), axis, -1)
    order = np.argsort(-p, axis=-1, kind="stable")
    ys = np.take_along_axis(y, order, axis=-1)  # [..., N] labels by decreasing score
    ps = np.take_along_axis(p, order, axis=-1)
    n = ys.shape[-1]
    precision = np.cumsum(ys, axis=-1) / np.arange(1, n + 1)  # [..., N] at each cut
    last = np.ones(ys.shape, dtype=bool)  # the last patient of each group of tied scores
    last[..., :-1] = ps[..., :-1] != ps[..., 1:]
    end = np.where(last, np.arange(n), n)
    end = np.flip(np.minimum.accumulate(np.flip(end, axis=-1), axis=-1), axis=-1)
    at_threshold = np.take_along_axis(precision, end, axis=-1)  # precision of each one's group
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (ys * at_threshold).sum(axis=-1) / ys.sum(axis=-1)
    return float(out) if np.ndim(out) == 0 else out


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval (``None``: undefined, see ``note``)."""

    value: float | None
    low: float | None
    high: float | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "ci_low": self.low, "ci_high": self.high}
        if self.note:
            out["note"] = self.note
        return out


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def bootstrap_ci(
    y: np.ndarray,
    p: np.ndarray,
    statistic: str,
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    method: str = BOOTSTRAP_METHOD,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> Interval:
    """AUROC or AUPRC with its bootstrap confidence interval (``scipy.stats.bootstrap``).

    Patients are resampled with replacement together with their label (``paired=True``); a
    resample with one class has no AUROC (NaN) and then the interval is undefined.

    Parameters
    ----------
    y, p : np.ndarray
        ``[N]`` labels in {0, 1} and predicted probabilities.
    statistic : {"auroc", "auprc"}
        The statistic.
    n_resamples, method, seed, confidence
        Passed to ``scipy.stats.bootstrap`` (``random_state=np.random.default_rng(seed)``).

    Raises
    ------
    ValueError
        Unknown statistic.

    Source: Efron & Tibshirani (1993), through ``scipy.stats.bootstrap``.
    """
    from scipy.stats import bootstrap

    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    if statistic == "auroc":
        value = auroc(y, p)

        def stat(yy: np.ndarray, pp: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.asarray(auroc(yy, pp, axis=axis))

    elif statistic == "auprc":
        value = auprc(y, p)

        def stat(yy: np.ndarray, pp: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.asarray(auprc(yy, pp, axis=axis))

    else:
        raise ValueError(f"unknown statistic {statistic!r}; choose 'auroc' or 'auprc'")
    if not np.isfinite(value):
        return Interval(None, None, None, "undefined: the data have one class only")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's degenerate-distribution notice: NaN below
        res = bootstrap(
            (y, p), stat, paired=True, vectorized=True, n_resamples=n_resamples,
            confidence_level=confidence, method=method, random_state=np.random.default_rng(seed),
        )  # fmt: skip
    low, high = _finite(res.confidence_interval.low), _finite(res.confidence_interval.high)
    note = (
        "" if low is not None and high is not None else "interval undefined (degenerate bootstrap)"
    )
    return Interval(float(value), low, high, note)


def delong_ci(y: np.ndarray, p: np.ndarray, *, confidence: float = CONFIDENCE) -> Interval:
    """AUROC with DeLong's asymptotic confidence interval.

    The AUROC's variance is DeLong's (DeLong, DeLong & Clarke-Pearson, Biometrics 1988), from the
    structural components ``V10`` (one per positive) and ``V01`` (one per negative), computed with
    mid-ranks as in Sun & Xu's fast algorithm (IEEE SPL 2014): with ``m`` positives and ``n``
    negatives, ``V10_i = (R_i - R^pos_i) / n`` (``R``: rank among all scores, ``R^pos``: among
    the positives) and ``V01_j = 1 - (R_(m+j) - R^neg_j) / m``; ``var = s2(V10) / m + s2(V01) / n``
    (sample variances). The interval is ``AUROC -/+ z_(1-alpha/2) sqrt(var)``, clipped to
    [0, 1]: the same as R's ``pROC::ci.auc(method = "delong")``. Ties count one half.

    Parameters
    ----------
    y, p : np.ndarray
        ``[N]`` labels in {0, 1} and scores (higher: more likely 1).
    confidence : float
        Confidence level, e.g. 0.95.

    Returns
    -------
    Interval
        Undefined (``None``, with a note) when ``y`` has one class only or one patient of a
        class (no sample variance).
    """
    from scipy.stats import norm

    value, se = delong_auroc_se(y, p)
    if value is None:
        return Interval(None, None, None, "undefined: the data have one class only")
    if se is None:
        return Interval(value, None, None, "interval undefined: fewer than 2 patients of a class")
    z = float(norm.ppf(0.5 + confidence / 2))
    return Interval(value, max(0.0, value - z * se), min(1.0, value + z * se))


def delong_auroc_se(y: np.ndarray, p: np.ndarray) -> tuple[float | None, float | None]:
    """AUROC and DeLong's standard error (the method of :func:`delong_ci`).

    Parameters
    ----------
    y, p : np.ndarray
        ``[N]`` labels in {0, 1} and scores.

    Returns
    -------
    (float or None, float or None)
        AUROC (None with one class only) and its SE (None with fewer than 2 patients of a class).
    """
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=float)
    pos, neg = p[y], p[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return None, None
    ranks = rankdata(np.concatenate([pos, neg]))  # [m + n] mid-ranks among all scores
    v10 = (ranks[:m] - rankdata(pos)) / n  # [m] share of negatives below each positive
    v01 = 1.0 - (ranks[m:] - rankdata(neg)) / m  # [n] share of positives above each negative
    value = float(v10.mean())
    if m < 2 or n < 2:
        return value, None
    return value, float(np.sqrt(v10.var(ddof=1) / m + v01.var(ddof=1) / n))


def delong_description() -> dict[str, object]:
    """How :func:`delong_ci`'s interval is computed, for reports and JSON."""
    return {
        "method": "DeLong",
        "confidence": CONFIDENCE,
        "source": "DeLong, DeLong & Clarke-Pearson, Biometrics 1988; fast algorithm of Sun & Xu, "
        "IEEE SPL 2014 (as R pROC::ci.auc)",
    }


def wilson_ci(k: int, n: int, *, confidence: float = CONFIDENCE) -> Interval:
    """The proportion ``k / n`` with its Wilson score interval (Wilson, JASA 1927), through
    ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``; undefined when ``n = 0``."""
    from scipy.stats import binomtest

    if n == 0:
        return Interval(None, None, None, "undefined: no patients in the denominator")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(k / n, float(ci.low), float(ci.high))


def sensitivity_threshold(y: np.ndarray, p: np.ndarray, min_sensitivity: float) -> float:
    """The threshold of the first ROC point whose sensitivity reaches ``min_sensitivity``
    (``sklearn.metrics.roc_curve``, ``drop_intermediate=False``: the rule of
    :func:`shared_models.metrics.operating_point_metrics`); predicting ``p >= threshold``
    gives that point. Needs both classes in ``y``."""
    from sklearn.metrics import roc_curve

    _, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    i = int(np.argmax(tpr >= min_sensitivity - 1e-12))
    return float(min(thresholds[i], 1.0))


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """Confusion matrix and sensitivity, specificity, PPV, NPV (each with its Wilson interval)
    when predicting ``p >= threshold`` (``sklearn.metrics.confusion_matrix``)."""
    from sklearn.metrics import confusion_matrix

    y = np.asarray(y).astype(int)
    pred = (np.asarray(p) >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    return {
        "threshold": float(threshold),
        "confusion_matrix": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "sensitivity": wilson_ci(tp, tp + fn).as_dict(),
        "specificity": wilson_ci(tn, tn + fp).as_dict(),
        "ppv": wilson_ci(tp, tp + fp).as_dict(),
        "npv": wilson_ci(tn, tn + fn).as_dict(),
    }


def logit(p: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` of ``p`` clipped to ``[LOGIT_CLIP, 1 - LOGIT_CLIP]``."""
    q = np.clip(np.asarray(p, dtype=float), LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(q / (1 - q))


def calibration(y: np.ndarray, p: np.ndarray, *, n_bins: int = RELIABILITY_BINS) -> dict[str, Any]:
    """Brier score, calibration-in-the-large, calibration slope and intercept, reliability curve.

    The slope ``b`` and intercept ``a`` come from the unpenalised logistic regression
    ``logit P(y=1) = a + b logit(p)`` (Cox 1958): a well-calibrated model has ``b = 1`` and
    ``a = 0``; ``b < 1`` means over-confident predictions (too extreme). They are undefined
    (None) when the scores separate the classes perfectly (the fit has no finite optimum).

    Returns
    -------
    dict
        ``brier``, ``mean_predicted``, ``observed_rate``, ``calibration_in_the_large``
        (observed rate minus mean predicted risk), ``slope``, ``intercept``, ``reliability``
        (``{"bins", "strategy", "mean_predicted": [...], "observed": [...], "count": [...]}``,
        empty bins left out).
    """
    from sklearn.calibration import calibration_curve
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import brier_score_loss

    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    observed, mean_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)  # calibration_curve's bins, assigned as it does
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    slope = intercept = None
    note = ""
    if auroc(y, p) >= 1.0:
        note = "undefined: the scores separate the classes perfectly"
    elif len(np.unique(y)) < 2:
        note = "undefined: the data have one class only"
    else:
        fit = LogisticRegression(C=np.inf, max_iter=1000).fit(logit(p).reshape(-1, 1), y)
        slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    out: dict[str, Any] = {
        "brier": float(brier_score_loss(y, p)),
        "mean_predicted": float(p.mean()),
        "observed_rate": float(y.mean()),
        "calibration_in_the_large": float(y.mean() - p.mean()),
        "slope": slope,
        "intercept": intercept,
        "reliability": {
            "bins": n_bins,
            "strategy": "uniform",
            "mean_predicted": [float(v) for v in mean_pred],
            "observed": [float(v) for v in observed],
            "count": [int(c) for c in counts if c > 0],
        },
    }
    if note:
        out["slope_note"] = note
    return out


RECALIBRATION_FOLDS = 5


def apply_recalibration(p: np.ndarray, *, intercept: float, slope: float) -> np.ndarray:
    """``sigmoid(intercept + slope * logit(p))``: the probabilities ``p [N]`` after a logistic
    recalibration (Cox 1958) -> ``[N]``."""
    return 1.0 / (1.0 + np.exp(-(intercept + slope * logit(p))))


def recalibration(
    y: np.ndarray, p: np.ndarray, *, folds: int = RECALIBRATION_FOLDS, seed: int = 0
) -> dict[str, Any]:
    """A hospital-local logistic recalibration of the probabilities ``p [N]`` on labels ``y [N]``.

    The intercept ``a`` and slope ``b`` of ``logit P(y=1) = a + b logit(p)`` are fitted on all
    the hospital's records (they equal :func:`calibration`'s slope and intercept); the recalibrated
    risk is :func:`apply_recalibration`. The figures *after* recalibration are cross-fitted, so
    that they are not judged on the records they were fitted to: the records are split into
    ``folds`` stratified folds (``sklearn.model_selection.StratifiedKFold``, shuffled with
    ``seed``), each fold's probabilities recalibrated by the fit on the other folds, and
    :func:`calibration` and the AUROC computed on the result. (In-sample, the slope and intercept
    after recalibration would be 1 and 0 by construction.)

    Returns
    -------
    dict
        ``intercept``, ``slope`` (None when undefined, see ``note``), ``formula``, ``folds``,
        ``before`` and ``after`` (:func:`calibration` of ``p`` and of the cross-fitted
        recalibrated risks), ``auroc_after`` (the cross-fitted risks' AUROC: a recalibration
        with a positive slope keeps the ranking within a fold, not across folds).
    """
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    before = calibration(y, p)
    out: dict[str, Any] = {
        "intercept": before["intercept"],
        "slope": before["slope"],
        "formula": "p_recalibrated = 1 / (1 + exp(-(intercept + slope * logit(p))))",
        "folds": folds,
        "before": before,
        "after": None,
        "auroc_after": None,
    }
    if before["slope"] is None:
        out["note"] = f"not fitted: slope and intercept {before['slope_note']}"
        return out
    if np.bincount(y, minlength=2).min() < folds:
        out["note"] = f"after-figures not computed: fewer than {folds} patients of a class"
        return out
    cross = np.empty_like(p)
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(p.reshape(-1, 1), y)
    for fit_on, apply_to in splits:
        part = calibration(y[fit_on], p[fit_on])
        if part["slope"] is None:  # a fold whose fit has no finite optimum: left as it was
            cross[apply_to] = p[apply_to]
            continue
        cross[apply_to] = apply_recalibration(
            p[apply_to], intercept=part["intercept"], slope=part["slope"]
        )
    out["after"] = calibration(y, cross)
    out["auroc_after"] = float(auroc(y, cross))
    return out


def net_benefit(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Net benefit of treating patients with ``p >= pt``: ``TP/n - FP/n * pt / (1 - pt)`` for
    each threshold probability ``pt`` in ``thresholds`` (``[T]``, inside (0, 1)) -> ``[T]``
    (Vickers & Elkin 2006)."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=float)
    pt = np.asarray(thresholds, dtype=float)
    treated = p[None, :] >= pt[:, None]  # [T, N]
    tp = (treated & y[None, :]).sum(axis=1)
    fp = (treated & ~y[None, :]).sum(axis=1)
    n = len(y)
    return tp / n - fp / n * pt / (1 - pt)


def decision_curve(
    y: np.ndarray, p: np.ndarray, thresholds: np.ndarray = DECISION_THRESHOLDS
) -> dict[str, list[float]]:
    """Net benefit of the model, of treating all and of treating none at each threshold.

    Treat-all is the net benefit of ``p = 1`` for everyone, ``prevalence - (1 - prevalence) *
    pt / (1 - pt)``; treat-none is 0 (Vickers & Elkin 2006).
    """
    y = np.asarray(y).astype(int)
    pt = np.asarray(thresholds, dtype=float)
    prevalence = float(y.mean())
    return {
        "threshold": [float(t) for t in pt],
        "model": [float(v) for v in net_benefit(y, p, pt)],
        "treat_all": [float(v) for v in prevalence - (1 - prevalence) * pt / (1 - pt)],
        "treat_none": [0.0] * len(pt),
    }


PREVALENCE_ODDS_RATIO_WARNING = 2.0


def prevalence_shift(observed: float, training: float | None) -> str | None:
    """A warning line when the data's prevalence differs strongly from the training prevalence:
    odds ratio between them above :data:`PREVALENCE_ODDS_RATIO_WARNING` (or below its inverse).
    None when they are close or the training prevalence is unknown (``None``)."""
    if training is None:
        return None

    def odds(q: float) -> float:
        q = min(max(q, 1e-9), 1 - 1e-9)
        return q / (1 - q)

    ratio = odds(observed) / odds(training)
    if ratio > PREVALENCE_ODDS_RATIO_WARNING or ratio < 1 / PREVALENCE_ODDS_RATIO_WARNING:
        return (
            f"prevalence {observed:.1%} here against {training:.1%} in training (odds ratio "
            f"{ratio:.2f}): expect calibration-in-the-large to be off; consider recalibrating"
        )
    return None


# A feature's shift is reported when its mean moved by more than this many training standard
# deviations (a standardised mean difference of 0.5: Cohen's "medium" effect) ...
FEATURE_SMD_WARNING = 0.5
# ... or when more than this share of the hospital's records lie outside the training range.
FEATURE_OUTSIDE_WARNING = 0.05


def feature_profile(x: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """Per model input: ``mean``, ``sd``, ``min``, ``max`` over the records ``x [N, F]`` (model
    inputs after the task's fixed imputation and scaling), keyed by ``names`` ``[F]``; NaN
    values are left out."""
    x = np.asarray(x, dtype=float)
    out: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an all-NaN column gives NaN, dropped below
        stats = {
            "mean": np.nanmean(x, axis=0), "sd": np.nanstd(x, axis=0, ddof=1),
            "min": np.nanmin(x, axis=0), "max": np.nanmax(x, axis=0),
        }  # fmt: skip
    for j, name in enumerate(names):
        if all(np.isfinite(v[j]) for v in stats.values()):
            out[name] = {k: float(v[j]) for k, v in stats.items()}
    return out


def feature_shift(
    training: dict[str, dict[str, float]],
    x: np.ndarray,
    names: list[str],
    *,
    scaling: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> list[str]:
    """One warning per model input whose distribution at this hospital differs strongly from the
    training profile (:func:`feature_profile`): the standardised mean difference
    ``|mean_hospital - mean_train| / sd_train`` above :data:`FEATURE_SMD_WARNING`, or more than
    :data:`FEATURE_OUTSIDE_WARNING` of the hospital's records outside the training ``[min, max]``.
    Inputs the profile does not have are skipped.

    Parameters
    ----------
    training : dict
        The model card's profile, ``{name: {"mean", "sd", "min", "max"}}``.
    x : np.ndarray
        ``[N, F]`` this hospital's model inputs.
    names : list[str]
        ``[F]`` the inputs' names.
    scaling : (center, scale), optional
        The task's fixed ``[F]`` scaling (``x = (raw - center) / scale``): the warnings then show
        means and ranges in the task's units (``raw = x * scale + center``); else in model-input
        units.
    """
    x = np.asarray(x, dtype=float)
    center, scale = (np.zeros(len(names)), np.ones(len(names))) if scaling is None else scaling
    units = "model-input units" if scaling is None else "the task's units"
    out = []
    for j, name in enumerate(names):

        def raw(value: float, j: int = j) -> float:
            return float(value) * float(scale[j]) + float(center[j])

        ref = training.get(name)
        col = x[:, j][np.isfinite(x[:, j])]
        if ref is None or not len(col):
            continue
        reasons = []
        if ref["sd"] > 0:
            smd = abs(float(col.mean()) - ref["mean"]) / ref["sd"]
            if smd > FEATURE_SMD_WARNING:
                reasons.append(
                    f"mean {raw(col.mean()):.4g} here against {raw(ref['mean']):.4g} in training "
                    f"(standardised difference {smd:.2f})"
                )
        outside = float(np.mean((col < ref["min"]) | (col > ref["max"])))
        if outside > FEATURE_OUTSIDE_WARNING:
            reasons.append(
                f"{outside:.0%} of the records outside the training range "
                f"[{raw(ref['min']):.4g}, {raw(ref['max']):.4g}]"
            )
        if reasons:
            out.append(f"feature {name!r}: {'; '.join(reasons)} ({units})")
    return out
