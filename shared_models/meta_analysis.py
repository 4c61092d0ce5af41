"""Random-effects meta-analysis of per-hospital estimates: between-hospital heterogeneity.

What TRIPOD-Cluster (Debray et al., BMJ 2023;380:e071018) asks of a model validated in several
clusters: the pooled performance, its confidence interval, the prediction interval of the
performance in a new cluster, and the heterogeneity (τ², I²). Implemented on ``scipy.stats``
(closed formulas; statsmodels' ``combine_effects`` has no prediction interval and is not a
dependency of fedcare):

- Pooled estimate: DerSimonian & Laird, Control Clin Trials 1986;7:177-188 (method-of-moments
  τ², truncated at 0), inverse-variance weights ``1 / (v_i + τ²)``, Wald 95 % interval.
- Heterogeneity: Cochran's Q with its χ²(k-1) p value; I² = max(0, (Q - (k-1)) / Q) (Higgins &
  Thompson, Stat Med 2002;21:1539-1558).
- Prediction interval for a new hospital: ``μ ± t_{k-2, 0.975} sqrt(τ² + SE(μ)²)`` (Higgins,
  Thompson & Spiegelhalter, J R Stat Soc A 2009;172:137-159), defined for k >= 3 hospitals.
- AUROCs are pooled on the logit scale with the delta-method variance ``var(c) / (c (1-c))²``
  and transformed back (Debray et al., BMJ 2017;356:i6460, "A guide to systematic review and
  meta-analysis of prediction model performance").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import special, stats

CONFIDENCE = 0.95
AUROC_CLIP = 1e-4  # AUROCs are clipped to [1e-4, 1 - 1e-4] before the logit


@dataclass(frozen=True)
class RandomEffects:
    """A DerSimonian-Laird random-effects meta-analysis (on the scale of the inputs).

    Attributes
    ----------
    k : int
        Number of estimates pooled.
    estimate, se : float
        Pooled estimate μ and its standard error.
    ci : (float, float)
        Wald 95 % confidence interval of μ.
    prediction : (float, float) or None
        95 % prediction interval of the estimate in a new hospital (None for k < 3).
    tau2 : float
        Between-hospital variance τ² (DerSimonian-Laird, >= 0).
    q, q_p : float
        Cochran's Q and its p value (χ² with k - 1 degrees of freedom).
    i2 : float
        I², the share of the total variation due to heterogeneity, in [0, 1].
    """

    k: int
    estimate: float
    se: float
    ci: tuple[float, float]
    prediction: tuple[float, float] | None
    tau2: float
    q: float
    q_p: float
    i2: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_effects(estimates: Any, variances: Any) -> RandomEffects:
    """DerSimonian-Laird random-effects pooling of ``estimates`` with within-study ``variances``.

    Parameters
    ----------
    estimates : array-like
        ``[k]`` per-hospital estimates (any scale on which they are roughly normal).
    variances : array-like
        ``[k]`` their within-hospital variances (> 0).

    Returns
    -------
    RandomEffects

    Raises
    ------
    ValueError
        Fewer than 2 estimates, shapes that differ, a non-finite value or a variance <= 0.
    """
    y = np.asarray(estimates, dtype=float)
    v = np.asarray(variances, dtype=float)
    if y.shape != v.shape or y.ndim != 1:
        raise ValueError(f"estimates {y.shape} and variances {v.shape} must be two [k] arrays")
    if len(y) < 2:
        raise ValueError(f"a random-effects meta-analysis needs at least 2 estimates, got {len(y)}")
    if not (np.isfinite(y).all() and np.isfinite(v).all() and (v > 0).all()):
        raise ValueError("estimates must be finite and variances finite and > 0")
    k = len(y)
    w = 1.0 / v
    fixed = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - fixed) ** 2))
    c = float(np.sum(w) - np.sum(w**2) / np.sum(w))
    tau2 = max(0.0, (q - (k - 1)) / c)
    w_star = 1.0 / (v + tau2)
    mu = float(np.sum(w_star * y) / np.sum(w_star))
    se = float(math.sqrt(1.0 / np.sum(w_star)))
    z = float(stats.norm.ppf(0.5 + CONFIDENCE / 2))
    prediction = None
    if k >= 3:
        t = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df=k - 2))
        half = t * math.sqrt(tau2 + se**2)
        prediction = (mu - half, mu + half)
    return RandomEffects(
        k=k, estimate=mu, se=se, ci=(mu - z * se, mu + z * se), prediction=prediction,
        tau2=tau2, q=q, q_p=float(stats.chi2.sf(q, df=k - 1)),
        i2=max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0,
    )  # fmt: skip


def _expit(x: float) -> float:
    # scipy's logistic function: no overflow where a noisy release puts a bound at logit -1000
    return float(special.expit(x))


def pooled_auroc(aurocs: Any, standard_errors: Any) -> dict[str, Any]:
    """Random-effects pooled AUROC of several hospitals, on the logit scale, back-transformed.

    Parameters
    ----------
    aurocs : array-like
        ``[k]`` per-hospital AUROCs in (0, 1) (clipped to :data:`AUROC_CLIP`).
    standard_errors : array-like
        ``[k]`` their standard errors (AUROC scale, > 0), e.g. from a bootstrap.

    Returns
    -------
    dict
        ``auroc``, ``ci`` and ``prediction`` (AUROC scale; ``prediction`` None for k < 3),
        ``tau2`` (logit scale), ``i2``, ``q``, ``q_p``, ``k``, ``scale``, ``method``.

    Raises
    ------
    ValueError
        As :func:`random_effects`.
    """
    c = np.clip(np.asarray(aurocs, dtype=float), AUROC_CLIP, 1 - AUROC_CLIP)
    se = np.asarray(standard_errors, dtype=float)
    fit = random_effects(special.logit(c), (se / (c * (1 - c))) ** 2)
    back = lambda pair: None if pair is None else (_expit(pair[0]), _expit(pair[1]))  # noqa: E731
    return {
        "auroc": _expit(fit.estimate), "ci": back(fit.ci), "prediction": back(fit.prediction),
        "tau2": fit.tau2, "i2": fit.i2, "q": fit.q, "q_p": fit.q_p, "k": fit.k,
        "scale": "logit AUROC (delta-method variances), back-transformed",
        "method": "DerSimonian-Laird random effects; prediction interval of Higgins, Thompson & "
        "Spiegelhalter 2009 (t, k - 2 df)",
    }  # fmt: skip


def hospital_heterogeneity(
    estimates: Sequence[tuple[str, float | None, float | None]], *, within: str
) -> dict[str, Any]:
    """:func:`pooled_auroc` over the hospitals whose AUROC and standard error are both defined.

    Parameters
    ----------
    estimates : sequence of (str, float or None, float or None)
        Per hospital: name, AUROC, its standard error (AUROC scale).
    within : str
        Where the standard errors come from (recorded as ``within_hospital_se``).

    Returns
    -------
    dict
        :func:`pooled_auroc`'s result plus ``hospitals`` (the names used) and
        ``within_hospital_se``; or ``{"note": ...}`` when fewer than 2 hospitals are usable.
    """
    usable = [(name, a, se) for name, a, se in estimates if a is not None and se]
    if len(usable) < 2:
        return {
            "note": f"{len(usable)} hospital(s) with a defined AUROC and standard error: a "
            "random-effects meta-analysis needs at least 2"
        }
    result = pooled_auroc([a for _, a, _ in usable], [se for _, _, se in usable])
    result["hospitals"] = [name for name, _, _ in usable]
    result["within_hospital_se"] = within
    return result


def heterogeneity_lines(
    het: dict[str, Any], *, within: str, readable_width: float = 1.0
) -> list[str]:
    """Markdown rows of a :func:`pooled_auroc` result (or its ``{"note": ...}``): the
    random-effects pooled AUROC, its CI, the prediction interval for a new hospital, I², τ² and
    Cochran's Q, then one line on the method; ``within`` says where the within-hospital variances
    come from. A pooled AUROC whose CI is wider than ``readable_width`` reads "too noisy to
    read" instead of a number."""
    if "note" in het:
        return [het["note"] + ".", ""]

    def interval(pair: Any) -> str:
        return "n/a" if pair is None else f"{pair[0]:.3f}-{pair[1]:.3f}"

    prediction = (
        interval(het["prediction"])
        if het["prediction"] is not None
        else "n/a (needs 3 hospitals or more)"
    )
    pooled = f"{het['auroc']:.3f}"
    if het["ci"][1] - het["ci"][0] > readable_width:
        pooled = (
            f"too noisy to read: its 95 % interval spans more than {readable_width:g} of [0, 1]"
        )
    return [
        "| measure | value |",
        "|---|---|",
        f"| random-effects pooled AUROC | {pooled} |",
        f"| its 95 % confidence interval | {interval(het['ci'])} |",
        f"| 95 % prediction interval (a new hospital) | {prediction} |",
        f"| I² | {100 * het['i2']:.0f} % |",
        f"| τ² (logit scale) | {het['tau2']:.4f} |",
        f"| Cochran's Q (p) | {het['q']:.2f} ({het['q_p']:.3g}) |",
        "",
        f"{het['method']}; on the {het['scale']}; hospitals: {', '.join(het['hospitals'])}. "
        + within,
        "",
    ]
