"""Uncertainty of the figures computed from (noisy) score histograms, and when they are unreadable.

A hospital without exact metrics releases per-class score histograms with Gaussian noise of
standard deviation σ on every count (:mod:`client.evaluation`). Every figure the coordinator
computes from them (:func:`shared_models.metrics.histogram_metrics`) is off for two reasons:
the hospital's test patients are a sample, and the counts carry the noise. A parametric
bootstrap covers both (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 6):

1. the plug-in histograms: the released counts with negative values set to 0
   (post-processing; it spends no privacy);
2. each draw resamples the patients of each class (multinomial over the bins with the class's
   released total, as in the patient bootstrap of :mod:`shared_models.validation`), then adds
   fresh Gaussian noise of the release's σ to every count and rounds it, as the hospital did
   (:func:`client.evaluation.release_histograms`);
3. the figure is recomputed on every draw by the same estimator; the 95 % interval is the
   2.5 and 97.5 percentiles, and the bootstrap standard error feeds the between-hospital
   meta-analysis (:mod:`shared_models.meta_analysis`).

With σ = 0 (exact histograms) only the patient sampling remains. A figure whose interval spans
more than :data:`READABLE_WIDTH` of [0, 1], or that is undefined in more than
:data:`MAX_UNDEFINED_SHARE` of the draws, is "too noisy to read": reports say so instead of
printing a number. Everything here is post-processing at the coordinator: it spends no privacy.
Its random draws are seeded (:data:`BOOTSTRAP_SEED`) so that a report is reproducible; they
protect nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared_models.metrics import ALL_METRIC_NAMES, histogram_metrics

BOOTSTRAP_DRAWS = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
READABLE_WIDTH = 0.5  # a 95 % interval wider than half of [0, 1] says nothing about the model
MAX_UNDEFINED_SHARE = 0.05  # more draws than this without the figure: too noisy as well


def _release_like(
    counts: np.ndarray, draws: int, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """``[draws, bins]`` resampled histograms of one class, noised and rounded as released."""
    total = int(round(counts.sum()))
    if total > 0:
        sampled = rng.multinomial(total, counts / counts.sum(), size=draws).astype(float)
    else:
        sampled = np.zeros((draws, len(counts)))
    if sigma > 0:
        sampled = np.rint(sampled + rng.normal(0.0, sigma, size=sampled.shape))
    return sampled


def histogram_intervals(
    negatives: Any,
    positives: Any,
    *,
    noise_multiplier: float,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, dict[str, Any]]:
    """95 % intervals of every test metric (AUROC, accuracy, sensitivity, specificity, AUPRC, the
    operating point at sensitivity 0.8) from released histograms.

    Parameters
    ----------
    negatives, positives : array-like
        ``[bins]`` released per-class counts (noisy: whole numbers, possibly negative).
    noise_multiplier : float
        σ of the Gaussian noise on each count (patients); 0 for exact counts.
    draws : int
        Bootstrap draws.
    seed : int
        Seed of the draws (post-processing only).

    Returns
    -------
    dict
        ``{metric: {"value", "ci": [lo, hi] or None, "se", "readable": bool, "note"}}`` for
        :data:`shared_models.metrics.ALL_METRIC_NAMES`; ``value`` is the point estimate of
        :func:`~shared_models.metrics.histogram_metrics` (None when undefined), ``note``
        says why a figure is unreadable. The method is :func:`bootstrap_description`.

    Raises
    ------
    ValueError
        Histograms of different lengths, or ``noise_multiplier < 0``.
    """
    neg = np.asarray(negatives, dtype=float)
    pos = np.asarray(positives, dtype=float)
    if neg.shape != pos.shape or neg.ndim != 1:
        raise ValueError(f"histograms of shapes {neg.shape} and {pos.shape}: need two [bins]")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    point, _ = histogram_metrics(neg, pos)
    rng = np.random.default_rng(seed)
    plug_neg, plug_pos = np.clip(neg, 0.0, None), np.clip(pos, 0.0, None)
    boot_neg = _release_like(plug_neg, draws, noise_multiplier, rng)
    boot_pos = _release_like(plug_pos, draws, noise_multiplier, rng)
    values: dict[str, list[float]] = {name: [] for name in ALL_METRIC_NAMES}
    for i in range(draws):
        metrics, _ = histogram_metrics(boot_neg[i], boot_pos[i])
        for name in ALL_METRIC_NAMES:
            if metrics[name] is not None:
                values[name].append(float(metrics[name]))  # type: ignore[arg-type]
    out: dict[str, dict[str, Any]] = {}
    tail = 100 * (1 - CONFIDENCE) / 2
    for name in ALL_METRIC_NAMES:
        got = np.asarray(values[name])
        entry: dict[str, Any] = {"value": point[name], "ci": None, "se": None, "readable": False}
        if point[name] is None or len(got) < (1 - MAX_UNDEFINED_SHARE) * draws:
            entry["note"] = "too few patients of a class in the released counts"
        else:
            lo, hi = np.percentile(got, [tail, 100 - tail])
            entry.update(ci=[float(lo), float(hi)], se=float(got.std(ddof=1)))
            entry["readable"] = bool(hi - lo <= READABLE_WIDTH)
            if not entry["readable"]:
                entry["note"] = (
                    f"too noisy to read: its 95 % interval {lo:.2f}-{hi:.2f} spans more than "
                    f"{READABLE_WIDTH:g} of [0, 1]"
                )
        out[name] = entry
    return out


def bootstrap_description(noise_multiplier: float | None = None) -> str:
    """One sentence on how :func:`histogram_intervals` computes its intervals (for reports)."""
    noise = (
        f"fresh Gaussian noise of each release's σ (here {noise_multiplier:g} per hospital) "
        "added to every count and rounded"
        if noise_multiplier
        else "no noise (exact counts)"
    )
    return (
        f"parametric bootstrap ({BOOTSTRAP_DRAWS} draws, seed {BOOTSTRAP_SEED}): patients of "
        f"each class resampled from the released counts, {noise}, the figure recomputed; 95 % "
        "percentile interval. It includes the noise of the release and the sampling of patients."
    )


def readable_text(entry: dict[str, Any], digits: int = 3) -> str:
    """``0.912 (0.85-0.96)``, or what makes the figure unreadable instead of a number."""
    if not entry.get("readable"):
        return str(entry.get("note", "n/a"))
    lo, hi = entry["ci"]
    return f"{entry['value']:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def pooled_histograms(
    releases: list[tuple[Any, Any, float]],
) -> tuple[np.ndarray, np.ndarray, float]:
    """Sum several hospitals' released histograms: ``(negatives, positives, σ)`` where σ is
    the standard deviation of the summed noise per count (``sqrt(Σ σ_i²)``: independent
    Gaussians).

    Parameters
    ----------
    releases : list of (negatives [bins], positives [bins], σ)
    """
    neg = np.sum([np.asarray(r[0], dtype=float) for r in releases], axis=0)
    pos = np.sum([np.asarray(r[1], dtype=float) for r in releases], axis=0)
    sigma = float(np.sqrt(sum(float(r[2]) ** 2 for r in releases)))
    return neg, pos, sigma


def histogram_calibration(negatives: Any, positives: Any) -> dict[str, Any]:
    """Calibration from (noisy) per-class score histograms: per bin the mean predicted risk (the
    bin's midpoint) against the observed rate, and calibration-in-the-large.

    Negative counts are set to 0 first (post-processing). A bin with fewer than 1 patient in the
    cleaned counts has no observed rate (None).

    Returns
    -------
    dict
        ``bins``: ``[{"predicted", "observed", "n"}]``; ``calibration_in_the_large``: observed
        rate minus mean predicted risk (None without patients); ``expected_calibration_error``:
        the n-weighted mean |observed - predicted| over bins with patients.
    """
    neg = np.clip(np.asarray(negatives, dtype=float), 0.0, None)
    pos = np.clip(np.asarray(positives, dtype=float), 0.0, None)
    bins = len(neg)
    mid = (np.arange(bins) + 0.5) / bins
    n = neg + pos
    rows = [
        {"predicted": float(mid[i]), "observed": float(pos[i] / n[i]) if n[i] >= 1 else None,
         "n": float(n[i])}
        for i in range(bins)
    ]  # fmt: skip
    total = float(n.sum())
    if total < 1:
        return {"bins": rows, "calibration_in_the_large": None, "expected_calibration_error": None}
    have = n >= 1
    ece = float(np.sum(n[have] * np.abs(pos[have] / n[have] - mid[have])) / n[have].sum())
    return {
        "bins": rows,
        "calibration_in_the_large": float(pos.sum() / total - np.sum(n * mid) / total),
        "expected_calibration_error": ece,
    }
