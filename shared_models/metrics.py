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


# ranking and operating-point metrics (icu-mortality and any rare-outcome task)
# ----------------------------------------------------------------------------------------------
TARGET_SENSITIVITY = 0.8
OPERATING_POINT_METRIC_NAMES = ("auprc", "sensitivity@sens0.8", "specificity@sens0.8")
"""``auprc``: average precision (area under the precision-recall curve, step-wise, scikit-learn's
``average_precision_score``); with 14 % positives it is the figure clinicians read next to AUROC.
``sensitivity@sens0.8`` / ``specificity@sens0.8``: sensitivity and specificity at the highest
threshold whose sensitivity is at least 0.8 (the ROC point a unit that must catch 4 in 5 deaths
would run at; ``roc_curve``), computed on the same split."""
ALL_METRIC_NAMES = METRIC_NAMES + OPERATING_POINT_METRIC_NAMES


def operating_point_metrics(
    y_true: np.ndarray, scores: np.ndarray, *, min_sensitivity: float = TARGET_SENSITIVITY
) -> tuple[dict[str, float | None], dict[str, str]]:
    """AUPRC and sensitivity/specificity at the threshold reaching ``min_sensitivity``.

    Parameters
    ----------
    y_true : np.ndarray
        ``[N]`` labels in {0, 1}.
    scores : np.ndarray
        ``[N]`` predicted probabilities of class 1.
    min_sensitivity : float
        The sensitivity the operating point must reach (names assume 0.8).

    Returns
    -------
    (metrics, undefined)
        ``{name: value or None}`` for :data:`OPERATING_POINT_METRIC_NAMES`, and the reasons of
        those that are undefined (all without positive patients; the operating point also
        without negative patients).

    Source: ``sklearn.metrics.average_precision_score`` and ``roc_curve``
    (``drop_intermediate=False``: the first ROC point with TPR >= ``min_sensitivity``).
    """
    from sklearn.metrics import average_precision_score, roc_curve

    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=float)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    names = OPERATING_POINT_METRIC_NAMES
    if n_pos == 0:
        reason = "no positive patients in the test split" if len(y) else "empty test split"
        return dict.fromkeys(names), dict.fromkeys(names, reason)
    out: dict[str, float | None] = {"auprc": float(average_precision_score(y, s))}
    undefined: dict[str, str] = {}
    if n_neg == 0:
        for name in names[1:]:
            out[name] = None
            undefined[name] = "no negative patients in the test split (no ROC curve)"
        return out, undefined
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    i = int(np.argmax(tpr >= min_sensitivity - 1e-12))
    out[names[1]] = float(tpr[i])
    out[names[2]] = float(1.0 - fpr[i])
    return out, undefined


def evaluation_metrics(
    y_true: np.ndarray, scores: np.ndarray
) -> tuple[dict[str, float | None], dict[str, str]]:
    """All test metrics (:data:`ALL_METRIC_NAMES`): :func:`binary_metrics` at 0.5 and
    :func:`operating_point_metrics`, with the reasons of the undefined ones."""
    base = binary_metrics(y_true, scores)
    extra, undefined = operating_point_metrics(y_true, scores)
    return {**base.as_dict(), **extra}, {**base.undefined, **undefined}


def histogram_metrics(
    negatives: np.ndarray | list[float], positives: np.ndarray | list[float]
) -> tuple[dict[str, float | None], dict[str, str]]:
    """All test metrics (:data:`ALL_METRIC_NAMES`) from per-class score histograms, possibly
    noisy: :func:`metrics_from_histograms` plus AUPRC and the operating point, computed as
    scikit-learn does on scores rounded to their bin (thresholds at the bin edges, from the top
    bin down; AUPRC is the step-wise average precision).

    Noisy counts are made usable first (post-processing): negative counts become 0, so the
    cumulative counts at each threshold are non-decreasing.
    """
    base = metrics_from_histograms(negatives, positives)
    values: dict[str, float | None] = dict(base.as_dict())
    undefined = dict(base.undefined)
    neg = np.clip(np.asarray(negatives, dtype=float), 0.0, None)
    pos = np.clip(np.asarray(positives, dtype=float), 0.0, None)
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    names = OPERATING_POINT_METRIC_NAMES
    if n_pos < 1:
        for name in names:
            values[name] = None
            undefined[name] = "too few positive patients in the released counts"
        return values, undefined
    tp = np.cumsum(pos[::-1])  # positives predicted positive at thresholds top-bin ... bin 0
    fp = np.cumsum(neg[::-1])
    recall = tp / n_pos
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    steps = np.diff(np.concatenate([[0.0], recall]))
    values["auprc"] = float(min(1.0, np.sum(steps * precision)))
    if n_neg < 1:
        for name in names[1:]:
            values[name] = None
            undefined[name] = "too few negative patients in the released counts"
        return values, undefined
    i = int(np.argmax(recall >= TARGET_SENSITIVITY - 1e-12))
    values[names[1]] = float(recall[i])
    values[names[2]] = float(1.0 - fp[i] / n_neg)
    return values, undefined
