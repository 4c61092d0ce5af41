"""Uncertainty and calibration of the final federated model in ``fedcare simulate``.

The simulation holds every hospital's test split, so the final model's exact scores on them
(:func:`simulations.harness._final_model_scores`) give the figures of ``fedcare evaluate``
(:mod:`shared_models.validation`) on the pooled test splits: AUROC and AUPRC with BCa bootstrap
confidence intervals, sensitivity and specificity at 0.5 with Wilson intervals, Brier score,
calibration-in-the-large, calibration slope and intercept (logistic recalibration, Cox 1958) and
the reliability diagram; and each hospital's AUROC with its own bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared_models.tasks import HospitalData

FIGURE = "calibration.png"
MAX_PER_HOSPITAL = 50  # per-hospital bootstraps, about 0.03 s each on 100-200 test records
METHOD = (
    "the final federated model's exact scores on every hospital's test split, pooled "
    "(fedcare simulate holds them all)"
)


def final_model_validation(
    hospitals: Sequence[HospitalData], federated: Sequence[np.ndarray] | None, *, why_not: str = ""
) -> dict[str, Any]:
    """``summary.json``'s ``validation`` block: discrimination with 95 % CIs and calibration.

    Methods (:mod:`shared_models.validation`): AUROC (Mann-Whitney form of
    ``sklearn.metrics.roc_auc_score``) and AUPRC (average precision) with bias-corrected and
    accelerated bootstrap intervals (``scipy.stats.bootstrap``, patients resampled with their
    label, 2000 resamples, seed 0; Efron & Tibshirani 1993); sensitivity and specificity at the
    threshold 0.5 with Wilson score intervals (Wilson 1927); Brier score, calibration-in-the-large
    (observed rate minus mean predicted risk), calibration slope and intercept of the unpenalised
    logistic recalibration ``logit P(y=1) = a + b logit(p)`` (Cox 1958), reliability curve
    (10 equal-width bins). Per hospital, the AUROC with the same bootstrap on that hospital's
    test split; a split with one class has none (``note`` says why).

    Parameters
    ----------
    hospitals : Sequence[HospitalData]
        The hospitals; ``y_test [n_test_j]`` labels in {0, 1} and ``name``.
    federated : Sequence[np.ndarray] or None
        The final model's ``[n_test_j]`` probabilities of class 1 per hospital; None when there
        is no trained final model.
    why_not : str
        The reason written when ``federated`` is None (e.g. "no hospital trained: ...").

    Returns
    -------
    dict
        ``{"skipped": reason}`` without scores. Else ``method``, ``n``, ``positives``,
        ``auroc`` and ``auprc`` (``{"value", "ci_low", "ci_high"[, "note"]}``), ``bootstrap``
        (method, resamples, seed, confidence, library), ``threshold_0.5``
        (:func:`shared_models.validation.threshold_metrics`), ``calibration``
        (:func:`shared_models.validation.calibration`), ``per_hospital_auroc`` (hospital ->
        interval dict; ``{"skipped": reason}`` above :data:`MAX_PER_HOSPITAL` hospitals) and
        ``figure`` (the reliability diagram's file name).
    """
    from shared_models import validation as v

    if federated is None:
        return {"skipped": why_not or "no final model"}
    y = np.concatenate([np.asarray(s.y_test, dtype=int) for s in hospitals])  # [N]
    p = np.concatenate([np.asarray(q, dtype=float) for q in federated])  # [N]
    per_hospital: dict[str, Any] = {}
    if len(hospitals) > MAX_PER_HOSPITAL:
        reason = f"not computed for {len(hospitals)} hospitals (at most {MAX_PER_HOSPITAL})"
        per_hospital = {"skipped": reason}
    for s, q in zip(hospitals, federated if not per_hospital else [], strict=False):
        n1 = int(np.sum(s.y_test))
        if n1 in (0, len(s.y_test)):
            per_hospital[s.name] = v.Interval(
                None, None, None,
                f"undefined: test split has only one class ({n1} positive, "
                f"{len(s.y_test) - n1} negative)",
            ).as_dict()  # fmt: skip
        else:
            per_hospital[s.name] = v.bootstrap_ci(s.y_test, q, "auroc").as_dict()
    return {
        "method": METHOD,
        "n": int(len(y)),
        "positives": int(y.sum()),
        "auroc": v.bootstrap_ci(y, p, "auroc").as_dict(),
        "auprc": v.bootstrap_ci(y, p, "auprc").as_dict(),
        "bootstrap": v.bootstrap_description(),
        "threshold_0.5": v.threshold_metrics(y, p, 0.5),
        "calibration": v.calibration(y, p),
        "per_hospital_auroc": per_hospital,
        "heterogeneity": between_hospitals(hospitals, federated),
        "figure": FIGURE,
    }


def between_hospitals(
    hospitals: Sequence[HospitalData], scores: Sequence[np.ndarray]
) -> dict[str, Any]:
    """Between-hospital heterogeneity of the final model's AUROC (TRIPOD-Cluster): the
    DerSimonian-Laird random-effects pooled AUROC of the hospitals' own test splits with its CI,
    the prediction interval for a new hospital and I² (:func:`shared_models.meta_analysis.
    pooled_auroc`), each hospital's AUROC with DeLong's standard error
    (:func:`shared_models.validation.delong_auroc_se`); a note where fewer than 2 hospitals have
    both."""
    from shared_models.meta_analysis import hospital_heterogeneity
    from shared_models.validation import delong_auroc_se

    return hospital_heterogeneity(
        [(s.name, *delong_auroc_se(s.y_test, q)) for s, q in zip(hospitals, scores, strict=True)],
        within="DeLong standard error of each hospital's AUROC",
    )


def write_calibration_figure(run_dir: Path, block: dict[str, Any]) -> Path | None:
    """Draw the pooled reliability diagram of ``block`` (:func:`final_model_validation`) as
    ``run_dir / calibration.png`` with :func:`simulations.external_validation.plot_reliability`
    (the figure of ``fedcare evaluate``); None, nothing drawn, when the block was skipped."""
    if "skipped" in block:
        return None
    from simulations.external_validation import plot_reliability

    path = run_dir / block["figure"]
    plot_reliability(path, block["calibration"], title="Reliability, pooled test splits")
    return path


def held_out_validation(
    hospital: HospitalData, scores: np.ndarray | None, *, why_not: str = ""
) -> dict[str, Any]:
    """``summary.json``'s ``external_validation`` block (``fedcare simulate --hold-out``): the
    final federated model on ALL records of the hospital left out of the federation (its train
    and test splits together: none of them was seen in training).

    The figures and methods of :func:`final_model_validation` (:mod:`shared_models.validation`):
    AUROC and AUPRC with BCa bootstrap intervals, Brier score, calibration-in-the-large,
    calibration slope and intercept.

    Parameters
    ----------
    hospital : HospitalData
        The held-out hospital; ``y_train [n_train]`` and ``y_test [n_test]`` labels in {0, 1}.
    scores : np.ndarray or None
        The final model's ``[n_train + n_test]`` probabilities of class 1, training records
        first; None when there is no trained final model.
    why_not : str
        The reason written when ``scores`` is None.

    Returns
    -------
    dict
        ``hospital`` and, unless ``skipped`` (reason), ``n``, ``positives``, ``prevalence``,
        ``auroc`` and ``auprc`` (``{"value", "ci_low", "ci_high"[, "note"]}``), ``bootstrap``
        and ``calibration`` (:func:`shared_models.validation.calibration`).
    """
    from shared_models import validation as v

    if scores is None:
        return {"hospital": hospital.name, "skipped": why_not or "no final model"}
    y = held_out_labels(hospital)  # [N]
    p = np.asarray(scores, dtype=float)  # [N]
    n1 = int(y.sum())
    return {
        "hospital": hospital.name,
        "method": "the final federated model's exact scores on every record of the held-out "
        "hospital (its train and test splits together; none was seen in training)",
        "n": int(len(y)),
        "positives": n1,
        "prevalence": n1 / len(y),
        "auroc": v.bootstrap_ci(y, p, "auroc").as_dict(),  # one class: undefined, with a note
        "auprc": v.bootstrap_ci(y, p, "auprc").as_dict(),
        "bootstrap": v.bootstrap_description(),
        "calibration": v.calibration(y, p),
    }


def held_out_records(hospital: HospitalData) -> np.ndarray:
    """The held-out hospital's ``[n_train + n_test, ...]`` inputs, training records first."""
    return np.concatenate([hospital.x_train, hospital.x_test])


def held_out_labels(hospital: HospitalData) -> np.ndarray:
    """The held-out hospital's ``[n_train + n_test]`` labels, in :func:`held_out_records`' order."""
    return np.concatenate([hospital.y_train, hospital.y_test]).astype(int)
