"""What a hospital releases to explain the global model: noisy sums of clipped attributions.

Gradient-based explanations computed on patient records reveal membership (Shokri, Strobel &
Zick, AIES 2021), so a hospital releases them only under DP, as Patel, Shokri & Zick (FAccT
2022) propose. Per example ``i`` of the hospital's test split, with its per-feature attribution
``a_i`` (``[F]``, :func:`shared_models.attributions.feature_attributions`), the release is

    v_i = clip_C([a_i, |a_i|])          # [2F]: signed and absolute, clipped TOGETHER in L2
    S   = sum_i v_i + N(0, (sigma C)^2 I_2F)

Adding or removing one patient changes ``sum_i v_i`` by at most ``C`` in L2, so both sums
together are ONE Gaussian mechanism with sensitivity ``C`` and noise multiplier ``sigma``
(Dwork & Roth 2014, Thm. A.1; RDP ``alpha / (2 sigma^2)``: Mironov 2017). The ClientApp records
it in the run's accountant as ``(sigma, sample_rate=1, 1 step)``, where it composes with the
run's DP-SGD steps and evaluation releases (and, in the ledger, with every other run).

The number of examples is not noised: it is the ``num-examples`` every evaluation reply already
sends (declared public in the README), and the coordinator divides by it.

The noise comes from a fresh :class:`~client.secure_random.SecureRandom` (ChaCha20 under a key
from the OS CSPRNG); each noisy sum is rounded to a multiple of :data:`GRID` times ``C``, so that
the released floats carry nothing of the floating-point representation of ``sum + noise``
(Mironov, CCS 2012): post-processing, no privacy cost.
"""

from __future__ import annotations

import math

import numpy as np

from client.secure_random import SecureRandom

GRID = 1e-3  # released sums are multiples of GRID * C (far below the noise's sigma * C)


def clip_rows(v: np.ndarray, bound: float) -> np.ndarray:
    """Scale every row of ``v`` (``[N, D]``) to L2 norm at most ``bound`` (Abadi et al. 2016's
    per-example clipping: ``v_i * min(1, bound / ||v_i||)``)."""
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v * np.minimum(1.0, bound / np.maximum(norms, 1e-300))


def release_attributions(
    per_example: np.ndarray,
    *,
    clip: float,
    noise_multiplier: float,
    randomness: SecureRandom | None = None,
) -> tuple[list[float], list[float]]:
    """Noisy sums of the signed and the absolute per-feature attributions (see the module
    docstring).

    Parameters
    ----------
    per_example : np.ndarray
        ``[N, F]`` attributions of the hospital's test examples (logit units).
    clip : float
        ``C``: the L2 bound of each example's concatenated ``[a_i, |a_i|]`` (logit units).
    noise_multiplier : float
        ``sigma``: the noise's standard deviation is ``sigma * C`` on every coordinate.
    randomness : SecureRandom, optional
        The noise's source; default a new one under a key from the OS CSPRNG.

    Returns
    -------
    (list[float], list[float])
        ``[F]`` noisy sum of ``a_i`` and ``[F]`` noisy sum of ``|a_i|`` (after clipping).

    Raises
    ------
    ValueError
        ``clip`` or ``noise_multiplier`` not a positive finite number (a noiseless release is
        not a DP release).

    Notes
    -----
    An example whose attribution is not finite (weights that overflow for some patients only)
    counts as all zeros instead of raising: a refusal would tell the coordinator that such a
    patient exists, outside the noise.
    """
    for name, value in (("clip", clip), ("noise_multiplier", noise_multiplier)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    a = np.asarray(per_example, dtype=np.float64)
    a = np.where(np.isfinite(a).all(axis=1, keepdims=True), a, 0.0)  # see Notes
    features = a.shape[1]
    total = clip_rows(np.concatenate([a, np.abs(a)], axis=1), clip).sum(axis=0)  # [2F]
    noise = (randomness or SecureRandom()).standard_normal(2 * features) * (noise_multiplier * clip)
    step = GRID * clip
    noisy = np.rint((total + noise) / step) * step
    return noisy[:features].tolist(), noisy[features:].tolist()


def release_epsilon(noise_multiplier: float, *, delta: float) -> float:
    """ε at ``delta`` of one release alone (the Gaussian mechanism, RDP accounting as the
    ledger does: :func:`client.training.epsilon_spent`)."""
    from client.training import epsilon_spent

    return epsilon_spent({"mechanism": "rdp", "history": [[noise_multiplier, 1.0, 1]]}, delta=delta)


def noise_for_epsilon(epsilon: float, *, delta: float) -> float:
    """The smallest noise multiplier (to 1e-4) whose one release costs at most ``epsilon`` at
    ``delta`` (bisection over :func:`release_epsilon`).

    Raises
    ------
    ValueError
        ``epsilon`` not positive, or ``delta`` outside (0, 1).
    """
    if not epsilon > 0 or not 0 < delta < 1:
        raise ValueError(f"need epsilon > 0 and 0 < delta < 1, got {epsilon!r}, {delta!r}")
    lo, hi = 1e-3, 1.0
    while release_epsilon(hi, delta=delta) > epsilon:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if release_epsilon(mid, delta=delta) > epsilon else (lo, mid)
    return hi


__all__ = ["GRID", "clip_rows", "noise_for_epsilon", "release_attributions", "release_epsilon"]
