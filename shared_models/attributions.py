"""Per-example feature attributions of a model's logit: what drives one patient's risk score.

Two methods, both relative to the all-zeros input as the baseline (for tabular tasks the
task's fixed centre of every feature, for ICU stays "never observed, normal value"):

- ``exact`` (logistic regression only): the contribution ``w_j * x_j`` of each input to the
  logit ``w . x + b``. It is what Integrated Gradients gives for a linear model, without the
  path integral's approximation error.
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
    from shared_models.models import LogisticRegression

    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {list(METHODS)}")
    linear = isinstance(model, LogisticRegression)
    if method == "auto":
        return "exact" if linear else "integrated-gradients"
    if method == "exact" and not linear:
        raise ValueError(
            f"attribution method 'exact' needs a logistic regression, not {type(model).__name__}; "
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
        weight = model.linear.weight.detach().double().cpu().numpy().reshape(x.shape[1:])
        return x.astype(np.float64) * weight[None]
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)
    out = []
    for i in range(0, len(x), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).to(device)
        attr = ig.attribute(batch, baselines=torch.zeros_like(batch), n_steps=steps)
        out.append(attr.detach().double().cpu().numpy())
    return np.concatenate(out)


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
]
