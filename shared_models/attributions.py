"""Per-example feature attributions of a model's logit: what drives one patient's risk score.

Two methods, both relative to the all-zeros input as the baseline (for tabular tasks the
task's fixed centre of every feature, for ICU stays "never observed, normal value"):

- ``exact`` (linear heads only): the contribution ``w_j * x_j`` of each input to the logit
  ``w . x + b`` of logistic regression, what Integrated Gradients gives for a linear model,
  without the path integral's approximation error; for the chest X-ray ``scatter-linear``
  model, ``w_j * GN(x)_j``, the contribution of each group-normalised scattering coefficient.
  (Its group normalisation is scale-invariant, so Integrated Gradients from the zero image
  would put the whole path integral at the baseline, where quadrature cannot resolve it.)
- ``integrated-gradients``: Integrated Gradients of the logit (Sundararajan, Taly & Yan,
  "Axiomatic attribution for deep networks", ICML 2017), computed with
  ``captum.attr.IntegratedGradients`` (Gauss-Legendre quadrature, ``steps`` points). Its
  attributions add up to ``logit(x) - logit(0)`` (completeness), up to the quadrature error.

``auto`` picks ``exact`` for :class:`~shared_models.models.LogisticRegression` and Integrated
Gradients for every other model. :func:`per_feature` then sums an example's attribution over
the axes that do not index the task's reported features (ICU: over the 48 hours and the 3
channels of a variable), which keeps completeness: the per-variable attributions still add up
to the logit's change.

Everything here is a plain function of the model and the examples: the hospital uses it for
its DP release (:mod:`client.explanations`) and for the non-private view ``fedcare evaluate``
shows it alone.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

METHODS = ("auto", "exact", "integrated-gradients")


def resolve_method(method: str, model: nn.Module) -> str:
    """``exact`` or ``integrated-gradients`` for ``method`` (``auto``: by the model's kind).

    Raises
    ------
    ValueError
        Unknown method (the message lists :data:`METHODS`), or ``exact`` for a model that is
        not a logistic regression.
    """
    from shared_models.image_models import ScatterLinear
    from shared_models.models import LogisticRegression

    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {list(METHODS)}")
    linear = isinstance(model, LogisticRegression | ScatterLinear)
    if method == "auto":
        return "exact" if linear else "integrated-gradients"
    if method == "exact" and not linear:
        raise ValueError(
            f"attribution method 'exact' needs a linear model (logreg, scatter-linear), not "
            f"{type(model).__name__}; "
            "use 'integrated-gradients' or 'auto'"
        )
    return method


def attributions(
    model: nn.Module,
    x: np.ndarray,
    *,
    method: str = "auto",
    steps: int = 32,
    batch_size: int = 256,
    device: str = "cpu",
) -> np.ndarray:
    """Attribution of every input of every example to the model's logit, baseline zero.

    Parameters
    ----------
    model : nn.Module
        A registry model: ``[B, *input_shape] float32 -> logits [B]``.
    x : np.ndarray
        ``[N, *input_shape] float32`` preprocessed examples.
    method : str
        One of :data:`METHODS` (see the module docstring).
    steps : int
        Integrated Gradients: quadrature points along the path from the baseline.
    batch_size : int
        Examples per forward/backward pass (Integrated Gradients runs ``batch_size * steps``
        model evaluations at once).
    device : str
        Torch device.

    Returns
    -------
    np.ndarray
        ``[N, *input_shape] float64``, in logit units.

    Raises
    ------
    ValueError
        An unknown or unfitting ``method`` (:func:`resolve_method`).
    """
    chosen = resolve_method(method, model)
    model = model.to(device).eval()
    if len(x) == 0:
        return np.zeros(x.shape, dtype=np.float64)
    if chosen == "exact":
        return _exact(model, x, device)
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)
    out = []
    for i in range(0, len(x), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(device)
        attr = ig.attribute(batch, baselines=torch.zeros_like(batch), n_steps=steps)
        out.append(attr.detach().double().cpu().numpy())
    return np.concatenate(out)


def _exact(model: nn.Module, x: np.ndarray, device: str) -> np.ndarray:
    """``w * x`` (logistic regression) or ``w * GN(x)`` (scatter-linear): ``[N, *shape]``."""
    from shared_models.image_models import ScatterLinear
    from shared_models.models import LogisticRegression

    if isinstance(model, LogisticRegression):
        weight = model.linear.weight.detach().double().cpu().numpy().reshape(x.shape[1:])
        return x.astype(np.float64) * weight[None]
    assert isinstance(model, ScatterLinear)  # resolve_method admits no other model
    weight = model.head.weight.detach().double().cpu().numpy().reshape(x.shape[1:])
    with torch.no_grad():
        normed = model.norm(torch.from_numpy(np.ascontiguousarray(x)).to(device))
    return normed.double().cpu().numpy() * weight[None]


def per_feature(attr: np.ndarray, axis: int) -> np.ndarray:
    """Sum each example's attribution over every axis but ``axis`` (of one example).

    ``attr: [N, *input_shape] -> [N, input_shape[axis]]``; a tabular ``[N, F]`` with axis 0
    is returned as it is.
    """
    other = tuple(a + 1 for a in range(attr.ndim - 1) if a != axis)
    return attr.sum(axis=other) if other else attr


def feature_attributions(
    model: nn.Module,
    x: np.ndarray,
    *,
    axis: int,
    method: str = "auto",
    steps: int = 32,
    device: str = "cpu",
) -> np.ndarray:
    """:func:`attributions` reduced by :func:`per_feature`: ``[N, *input_shape] -> [N, F]``."""
    return per_feature(attributions(model, x, method=method, steps=steps, device=device), axis)


def saliency_cells(size: int, grid: int) -> int:
    """The lattice side for images of side ``size``: the first of ``grid .. 2 grid`` that
    divides it (28 and 224 -> 7, 64 and 128 -> 8 for ``grid`` 7), else ``size`` itself."""
    return next((g for g in range(grid, 2 * grid + 1) if size % g == 0), size)


def spatial_saliency(
    model: nn.Module,
    x: np.ndarray,
    *,
    grid: int,
    method: str = "auto",
    steps: int = 32,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image saliency and image on a coarse ``grid x grid`` lattice (chest X-rays).

    The attribution ``[N, C, H, W]`` (:func:`attributions`; C = 1 for pixels, 81 scattering
    channels for ``scatter-28``) is summed over the channels and over each of the ``grid x grid``
    cells (sum pooling keeps completeness: a cell's value is its share of the logit's change);
    the image is channel 0 (the pixels, or the scattering transform's low-pass average of them)
    averaged over each cell.

    Returns
    -------
    (np.ndarray, np.ndarray)
        ``[N, g, g]`` saliency (logit units) and ``[N, g, g]`` image, ``g`` =
        :func:`saliency_cells` ``(H, grid)``.

    Raises
    ------
    ValueError
        ``x`` is not ``[N, C, S, S]``.
    """
    if x.ndim != 4 or x.shape[2] != x.shape[3]:
        raise ValueError(f"saliency needs square images [C, S, S], got {tuple(x.shape[1:])}")
    grid = saliency_cells(x.shape[2], grid)
    n, _, h, w = x.shape
    attr = attributions(model, x, method=method, steps=steps, device=device).sum(axis=1)
    cells = attr.reshape(n, grid, h // grid, grid, w // grid)
    image = x[:, 0].astype(np.float64).reshape(n, grid, h // grid, grid, w // grid)
    return cells.sum(axis=(2, 4)), image.mean(axis=(2, 4))


def importance(per_example: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-private mean ``|attribution|`` and mean signed attribution per feature.

    ``per_example: [N, F] -> ([F], [F])`` (zeros for N = 0).
    """
    if len(per_example) == 0:
        zeros = np.zeros(per_example.shape[1])
        return zeros, zeros.copy()
    return np.abs(per_example).mean(axis=0), per_example.mean(axis=0)


__all__ = [
    "METHODS",
    "attributions",
    "feature_attributions",
    "importance",
    "per_feature",
    "resolve_method",
    "saliency_cells",
    "spatial_saliency",
]
