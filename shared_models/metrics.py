"""Binary classification metrics with explicit "undefined" results.

Wraps scikit-learn (``roc_auc_score``, ``accuracy_score``, ``confusion_matrix``). A metric that
is undefined on the given split (AUROC with one class present; sensitivity without positives;
specificity without negatives) is returned as ``None`` with the reason, never as a made-up value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

METRIC_NAMES = ("auroc", "accuracy", "sensitivity", "specificity")


@dataclass(frozen=True)
class BinaryMetrics:
    """Test metrics of one split. ``None`` = undefined, with the reason in ``undefined``."""

    auroc: float | None
    accuracy: float | None
    sensitivity: float | None
    specificity: float | None
    n: int
    undefined: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | None]:
        return {k: getattr(self, k) for k in METRIC_NAMES}


def binary_metrics(
    y_true: np.ndarray, scores: np.ndarray, *, threshold: float = 0.5
) -> BinaryMetrics:
    """Compute AUROC, accuracy, sensitivity and specificity.

    Parameters
    ----------
    y_true : np.ndarray
        ``[N]`` labels in {0, 1}.
    scores : np.ndarray
        ``[N]`` predicted probabilities of class 1.
    threshold : float
        Decision threshold on ``scores`` for accuracy, sensitivity, specificity.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=float)
    n = int(y.shape[0])
    undefined: dict[str, str] = {}
    if n == 0:
        reason = "empty test split"
        return BinaryMetrics(None, None, None, None, 0, dict.fromkeys(METRIC_NAMES, reason))
    pred = (s >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    n_pos, n_neg = int(tp + fn), int(tn + fp)
    auroc: float | None = None
    if n_pos and n_neg:
        auroc = float(roc_auc_score(y, s))
    else:
        undefined["auroc"] = f"test split has only one class ({n_pos} positive, {n_neg} negative)"
    sens = float(tp / n_pos) if n_pos else None
    if sens is None:
        undefined["sensitivity"] = "no positive patients in the test split"
    spec = float(tn / n_neg) if n_neg else None
    if spec is None:
        undefined["specificity"] = "no negative patients in the test split"
    return BinaryMetrics(
        auroc=auroc,
        accuracy=float(accuracy_score(y, pred)),
        sensitivity=sens,
        specificity=spec,
        n=n,
        undefined=undefined,
    )


# ----------------------------------------------------------------------------------------------
# metrics from (noisy) score histograms: what a hospital without exact metrics releases
# ----------------------------------------------------------------------------------------------
HISTOGRAM_BINS = 10  # equal-width bins of the predicted probability over [0, 1]; 0.5 is an edge


def score_histograms(
    y_true: np.ndarray, scores: np.ndarray, *, bins: int = HISTOGRAM_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class counts of predicted probabilities in ``bins`` equal-width bins over [0, 1].

    Returns ``(negatives [bins], positives [bins])`` (float64 counts). Adding or removing one
    patient changes one count by 1: the pair has L2 sensitivity 1, so Gaussian noise of standard
    deviation sigma on every count is the Gaussian mechanism with noise multiplier sigma.
    """
    y = np.asarray(y_true).astype(int)
    idx = np.clip((np.asarray(scores, dtype=float) * bins).astype(int), 0, bins - 1)
    neg = np.bincount(idx[y == 0], minlength=bins).astype(float)
    pos = np.bincount(idx[y == 1], minlength=bins).astype(float)
    return neg, pos


def metrics_from_histograms(
    negatives: np.ndarray | list[float], positives: np.ndarray | list[float]
) -> BinaryMetrics:
    """AUROC, accuracy, sensitivity and specificity (threshold 0.5) from per-class score
    histograms (:func:`score_histograms`), possibly noisy.

    AUROC is the Mann-Whitney statistic over bins (pairs in one bin count 1/2), i.e. the AUROC of
    scores rounded to their bin. Noisy counts are used as they are (unbiased sums; negative counts
    included) and each metric is clipped to [0, 1]; a class whose noisy total is below 1 makes the
    metrics that need it undefined. Post-processing only: it spends no privacy.
    """
    neg, pos = np.asarray(negatives, dtype=float), np.asarray(positives, dtype=float)
    half = len(neg) // 2  # bins [0, half) predict 0, [half, bins) predict 1 (threshold 0.5)
    n_neg, n_pos = float(neg.sum()), float(pos.sum())
    undefined: dict[str, str] = {}
    clip = lambda v: float(min(1.0, max(0.0, v)))  # noqa: E731
    auroc = sens = spec = acc = None
    if n_pos >= 1 and n_neg >= 1:
        below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])  # negatives in lower bins
        auroc = clip(float(np.sum(pos * (below + 0.5 * neg))) / (n_pos * n_neg))
    else:
        undefined["auroc"] = "too few patients of one class in the released counts"
    if n_pos >= 1:
        sens = clip(pos[half:].sum() / n_pos)
    else:
        undefined["sensitivity"] = "no positive patients in the released counts"
    if n_neg >= 1:
        spec = clip(neg[:half].sum() / n_neg)
    else:
        undefined["specificity"] = "no negative patients in the released counts"
    if n_pos + n_neg >= 1:
        acc = clip((pos[half:].sum() + neg[:half].sum()) / (n_pos + n_neg))
    else:
        undefined["accuracy"] = "no patients in the released counts"
    n = max(0, round(n_pos + n_neg))
    return BinaryMetrics(auroc, acc, sens, spec, n, undefined)
