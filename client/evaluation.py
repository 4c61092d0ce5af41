"""What a hospital releases from its test split: exact metrics, or noisy score histograms.

A hospital whose policy forbids exact metrics (the default for deployed hospitals) releases only the
per-class histograms of the global model's predicted probabilities
(:func:`shared_models.metrics.score_histograms`, L2 sensitivity 1 under adding or removing one
patient) with independent Gaussian noise of standard deviation ``noise_multiplier`` on every
count: the Gaussian mechanism (Dwork & Roth 2014, Thm. A.1; RDP: Mironov 2017). The ClientApp
records each release in the run's accountant as ``(noise_multiplier, sample_rate=1, 1 step)``,
so it composes with the run's DP-SGD steps. The coordinator computes AUROC, accuracy,
sensitivity and specificity from the noisy counts
(:func:`shared_models.metrics.metrics_from_histograms`).

The noise comes from a :class:`~client.secure_random.SecureRandom` (the ChaCha20 keystream under a
key from the OS CSPRNG, fresh for every release): no value from outside the hospital seeds it.
Each noisy count is rounded to an integer, so that the released value carries nothing of the
floating-point representation of ``count + noise`` (the floating-point attacks of Mironov, CCS
2012, and Jin et al., IEEE S&P 2022): rounding is post-processing of the Gaussian mechanism and
costs no privacy. The draw is vectorised and takes the same time whatever the noise.
"""

from __future__ import annotations

import numpy as np

from client.secure_random import SecureRandom
from shared_models.metrics import HISTOGRAM_BINS, score_histograms


def release_histograms(
    y_true: np.ndarray,
    scores: np.ndarray,
    *,
    noise_multiplier: float,
    bins: int = HISTOGRAM_BINS,
    randomness: SecureRandom | None = None,
) -> tuple[list[float], list[float]]:
    """Per-class score histograms with Gaussian noise N(0, noise_multiplier^2) on every count,
    rounded to integers.

    Parameters
    ----------
    y_true : np.ndarray
        ``[N]`` test labels in {0, 1}.
    scores : np.ndarray
        ``[N]`` predicted probabilities of class 1.
    noise_multiplier : float
        Standard deviation of the noise, in patients (the sensitivity is 1).
    bins : int
        Equal-width bins over [0, 1] per class (run config ``eval.histogram-bins``; any number
        keeps the sensitivity at 1). Fewer bins: less noise in every sum of counts (n, the
        rates at 0.5, the AUROC), at a coarser score resolution.
    randomness : SecureRandom, optional
        The noise's source; default a new one under a key from the OS CSPRNG.

    Returns
    -------
    (list[float], list[float])
        Noisy counts of negatives and positives per bin (whole numbers, possibly negative).

    Raises
    ------
    ValueError
        ``noise_multiplier <= 0`` (a noiseless release is not a DP release).
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    neg, pos = score_histograms(y_true, scores, bins=bins)
    counts = np.concatenate([neg, pos]).astype(np.float64)
    noise = (randomness or SecureRandom()).standard_normal(len(counts)) * noise_multiplier
    noisy = np.rint(counts + noise)
    return noisy[: len(neg)].tolist(), noisy[len(neg) :].tolist()
