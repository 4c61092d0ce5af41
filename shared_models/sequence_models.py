"""Models of irregularly sampled clinical time series, binned with observation masks.

Every model takes one stay as ``x: [T, V, 3]`` -- for each of ``T`` time bins and ``V``
channels the (normalised value carried forward, observed-in-this-bin mask, time since the last
observation) triple of GRU-D (Che et al., "Recurrent neural networks for multivariate time series
with missing values", Sci. Rep. 2018) -- and maps a batch ``[B, T, V, 3]`` to logits ``[B]``.
The layout is all a model needs: each is built from ``input_shape = (T, V, 3)`` alone.

All pass ``opacus.validators.ModuleValidator.validate(strict=True)``: GroupNorm instead of
BatchNorm, and the recurrent layer is Opacus' ``DPGRU`` (what ``ModuleValidator.fix`` puts in place
of ``nn.GRU``: a GRU made of ``nn.Linear``-like layers whose per-sample gradients Opacus computes).
"""

from __future__ import annotations

import math

import torch
from opacus.layers import DPGRU
from torch import nn


def _check_shape(input_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(input_shape) != 3 or input_shape[2] != 3:
        raise ValueError(
            f"sequence models take input_shape (T, V, 3) (time bins, channels, value/mask/delta), "
            f"got {input_shape}"
        )
    return int(input_shape[0]), int(input_shape[1])


class MaskedSummary(nn.Module):
    """Per-channel summary of the observed values of a stay (no parameters).

    ``x: [B, T, V, 3] -> [B, V * 6]``: first, last, minimum, maximum and mean of the values in
    the bins where the channel was observed, and ``log(1 + count) / log(1 + T)`` of those bins;
    0 (the normal value) for a channel never observed. Statistics of hourly bin means, not of
    the raw observations.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, mask = x[..., 0], x[..., 1] > 0  # [B, T, V]
        n_bins = x.shape[1]
        count = mask.sum(dim=1)  # [B, V]
        seen = count > 0
        denom = count.clamp(min=1).to(value.dtype)
        mean = (value * mask).sum(dim=1) / denom
        big = torch.finfo(value.dtype).max
        minimum = torch.where(mask, value, big).amin(dim=1)
        maximum = torch.where(mask, value, -big).amax(dim=1)
        first_bin = mask.to(torch.int8).argmax(dim=1, keepdim=True)  # first True (0 if none)
        first = value.gather(1, first_bin).squeeze(1)
        last = value[:, -1]  # carried forward: the last observed value
        zero = torch.zeros_like(mean)
        stats = [torch.where(seen, s, zero) for s in (first, last, minimum, maximum, mean)]
        stats.append(torch.log1p(count.to(value.dtype)) / math.log1p(n_bins))
        return torch.stack(stats, dim=-1).flatten(1)  # [B, V * 6]


class SummaryLogisticRegression(nn.Module):
    """Logistic regression on per-channel summaries (:class:`MaskedSummary`): the classic
    baseline for this data (first/last/min/max/mean/count per variable).

    ``x: [B, T, V, 3] -> logits [B]``.
    """

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        _, n_channels = _check_shape(input_shape)
        self.summary = MaskedSummary()
        self.linear = nn.Linear(n_channels * 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.summary(x)).squeeze(-1)  # [B]


class TemporalCNN(nn.Module):
    """Temporal convolutional network: three dilated 1-D convolutions (dilation 1, 2, 4; kernel 3;
    receptive field 15 bins) with GroupNorm and ReLU, then the mean and the last step over time
    and a linear head (Bai, Kolter, Koltun, "An empirical evaluation of generic convolutional
    and recurrent networks for sequence modeling", arXiv:1803.01271, 2018).

    ``x: [B, T, V, 3] -> [B, 3V, T] -> [B, H, T] -> [B, 2H] -> logits [B]``.
    """

    def __init__(self, input_shape: tuple[int, ...], hidden: int = 32) -> None:
        super().__init__()
        _, n_channels = _check_shape(input_shape)
        groups = math.gcd(hidden, 8)
        layers: list[nn.Module] = []
        width = 3 * n_channels
        for dilation in (1, 2, 4):
            layers += [
                nn.Conv1d(width, hidden, kernel_size=3, padding=dilation, dilation=dilation),
                nn.GroupNorm(groups, hidden),
                nn.ReLU(),
            ]
            width = hidden
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(2 * hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x.flatten(2).transpose(1, 2))  # [B, H, T]
        pooled = torch.cat([h.mean(dim=2), h[:, :, -1]], dim=1)  # [B, 2H]
        return self.head(pooled).squeeze(-1)  # [B]


class GRUClassifier(nn.Module):
    """One-layer GRU over the time bins (Opacus ``DPGRU``), classifying from its last state,
    as the GRU baselines of Che et al. 2018 (GRU with mask and time-interval inputs).

    ``x: [B, T, V, 3] -> [B, T, 3V] -> h_T [B, H] -> logits [B]``.
    """

    def __init__(self, input_shape: tuple[int, ...], hidden: int = 32) -> None:
        super().__init__()
        _, n_channels = _check_shape(input_shape)
        self.rnn = DPGRU(3 * n_channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(x.flatten(2))  # h: [1, B, H]
        return self.head(h[-1]).squeeze(-1)  # [B]
