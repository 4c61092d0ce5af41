"""What a hospital releases from its test split: exact metrics, or noisy score histograms.

A site whose policy forbids exact metrics (the default for deployed hospitals) releases only the
per-class histograms of the global model's predicted probabilities
(:func:`shared_models.metrics.score_histograms`, L2 sensitivity 1 under adding or removing one
patient) with independent Gaussian noise of standard deviation ``noise_multiplier`` on every
count: the Gaussian mechanism (Dwork & Roth 2014, Thm. A.1; RDP: Mironov 2017). The ClientApp
records each release in the run's accountant as ``(noise_multiplier, sample_rate=1, 1 step)``,
so it composes with the run's DP-SGD steps. The coordinator computes AUROC, accuracy,
sensitivity and specificity from the noisy counts
(:func:`shared_models.metrics.metrics_from_histograms`).

The noise is drawn with :class:`random.SystemRandom` (the OS CSPRNG) at every release: no value
from outside the hospital seeds it.
"""

from __future__ import annotations

import random

import numpy as np

from shared_models.metrics import score_histograms

_SYSTEM_RANDOM = random.SystemRandom()


def release_histograms(
    y_true: np.ndarray, scores: np.ndarray, *, noise_multiplier: float
) -> tuple[list[float], list[float]]:
    """Per-class score histograms with Gaussian noise N(0, noise_multiplier^2) on every count.

    Parameters
    ----------
    y_true : np.ndarray
        ``[N]`` test labels in {0, 1}.
    scores : np.ndarray
        ``[N]`` predicted probabilities of class 1.
    noise_multiplier : float
        Standard deviation of the noise, in patients (the sensitivity is 1).

    Returns
    -------
    (list[float], list[float])
        Noisy counts of negatives and positives per bin.

    Raises
    ------
    ValueError
        ``noise_multiplier <= 0`` (a noiseless release is not a DP release).
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    neg, pos = score_histograms(y_true, scores)
    noisy = [
        [float(c) + _SYSTEM_RANDOM.gauss(0.0, noise_multiplier) for c in counts]
        for counts in (neg, pos)
    ]
    return noisy[0], noisy[1]
