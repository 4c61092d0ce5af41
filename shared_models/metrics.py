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
