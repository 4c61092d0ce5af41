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


def release_saliency(
    saliency: np.ndarray,
    images: np.ndarray,
    y: np.ndarray,
    *,
    clip: float,
    image_clip: float,
    noise_multiplier: float,
    randomness: SecureRandom | None = None,
) -> dict[str, list[float]]:
    """Class-conditional sums of clipped saliency maps and images, and class counts, noised.

    Per test image ``i`` of class ``y_i``: ``s_i`` (``[G*G]`` saliency) clipped to L2 norm
    ``clip``, ``x_i`` (``[G*G]`` image) clipped to ``image_clip``, and a count of 1 go into the
    sums of class ``y_i`` only. Scaled to unit bounds, one patient changes the whole released
    vector (both classes) by at most ``sqrt(3)`` in L2, so Gaussian noise of standard deviation
    ``noise_multiplier * sqrt(3)`` on that scale (``* clip`` on saliency sums, ``* image_clip``
    on image sums, ``* 1`` on counts) is one Gaussian mechanism of noise multiplier
    ``noise_multiplier``, charged like :func:`release_attributions`.

    Parameters
    ----------
    saliency, images : np.ndarray
        ``[N, G, G]`` (:func:`shared_models.attributions.spatial_saliency`).
    y : np.ndarray
        ``[N]`` labels in {0, 1}.
    clip, image_clip : float
        L2 bounds of one patient's saliency map and image.
    noise_multiplier : float
        See above.
    randomness : SecureRandom, optional
        The noise's source; default a new one under a key from the OS CSPRNG.

    Returns
    -------
    dict
        ``saliency-0``, ``saliency-1``, ``image-0``, ``image-1`` (``[G*G]`` noisy sums) and
        ``count-0``, ``count-1`` (one noisy count each), rounded as in
        :func:`release_attributions`.

    Raises
    ------
    ValueError
        A bound or the noise multiplier not positive and finite.
    """
    for name, value in (("clip", clip), ("image_clip", image_clip), ("noise_multiplier", noise_multiplier)):  # fmt: skip
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    n = len(y)
    s = np.asarray(saliency, dtype=np.float64).reshape(n, -1)
    s = np.where(np.isfinite(s).all(axis=1, keepdims=True), s, 0.0)  # as release_attributions
    x = np.asarray(images, dtype=np.float64).reshape(n, -1)
    unit = np.concatenate([clip_rows(s, clip) / clip, clip_rows(x, image_clip) / image_clip,
                           np.ones((n, 1))], axis=1)  # fmt: skip
    cells = s.shape[1]
    rng = randomness or SecureRandom()
    scale = np.concatenate([np.full(cells, clip), np.full(cells, image_clip), [1.0]])
    out: dict[str, list[float]] = {}
    for c in (0, 1):
        total = unit[np.asarray(y) == c].sum(axis=0)
        noisy = total + rng.standard_normal(len(total)) * noise_multiplier * math.sqrt(3.0)
        noisy = np.rint(noisy / GRID) * GRID * scale
        out[f"saliency-{c}"] = noisy[:cells].tolist()
        out[f"image-{c}"] = noisy[cells : 2 * cells].tolist()
        out[f"count-{c}"] = [float(noisy[-1])]
    return out


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


__all__ = [
    "GRID",
    "clip_rows",
    "noise_for_epsilon",
    "release_attributions",
    "release_epsilon",
    "release_saliency",
]
