"""Convolutional networks for the image tasks, built for DP-SGD (Opacus).

Registered in :data:`shared_models.models.MODELS`; like every shared model they pass
``opacus.validators.ModuleValidator.validate(model, strict=True)``.
"""

from __future__ import annotations

import torch
from torch import nn


class RandomShift(nn.Module):
    """Random translation by up to ``pad`` pixels per example, in training mode only.

    ``x: [B, C, H, W] -> [B, C, H, W]``: each example is padded by replicating its border and
    cropped at a random offset (the "random crop with padding" of CIFAR training, done on the
    batch). It has no parameters and each output row depends on its own input row only, so
    per-sample clipping and the DP accounting are unchanged (the augmentation is part of the
    per-example computation). Draws from torch's default generator: augmentation randomness
    is not privacy noise.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.pad == 0:
            return x
        b, _, h, w = x.shape
        k = self.pad
        padded = nn.functional.pad(x, (k, k, k, k), mode="replicate")  # [B, C, H+2k, W+2k]
        dy = torch.randint(0, 2 * k + 1, (b, 1, 1), device=x.device)
        dx = torch.randint(0, 2 * k + 1, (b, 1, 1), device=x.device)
        rows = dy + torch.arange(h, device=x.device).view(1, h, 1)  # [B, H, 1]
        cols = dx + torch.arange(w, device=x.device).view(1, 1, w)  # [B, 1, W]
        batch = torch.arange(b, device=x.device).view(b, 1, 1)
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


class ChestCNN(nn.Module):
    """Small GroupNorm CNN for gray-level images, chosen for DP-SGD.

    ``x: [B, 1, S, S] float32 in [-1, 1] -> logits [B]``. Blocks of 3x3 convolution ->
    GroupNorm -> activation -> 2x2 max-pool (``[B, w_i, S/2^i, S/2^i]``), then a linear layer on
    the flattened last feature map (adaptively pooled to ``head_grid x head_grid``).

    Design (sources): GroupNorm instead of BatchNorm, which per-sample DP cannot use (Opacus'
    validator; De et al. 2022, "Unlocking high-accuracy differentially private image
    classification through scale", arXiv:2204.13650); few parameters, because the DP noise
    grows with the dimension (Tramer & Boneh, ICLR 2021, "Differentially private learning needs
    better features": small end-to-end CNNs with normalisation are strong baselines); large
    expected batches and few epochs (same sources). The variant here was chosen by measurement
    on PneumoniaMNIST (README, "Chest X-rays"), which also records what did not help.

    Parameters
    ----------
    input_shape : (C, S, S)
        One example's shape.
    widths : tuple[int, ...]
        Channels of the convolution blocks.
    groups : int
        GroupNorm groups (at most the channel count).
    activation : str
        ``"relu"`` or ``"tanh"`` (tempered sigmoids, Papernot et al., AAAI 2021).
    head_grid : int
        Side of the pooled feature map the linear head reads.
    shift : int
        Random-shift augmentation in pixels (0 = none), see :class:`RandomShift`.
    input_norm : bool
        Standardise each image by its own mean and standard deviation first (a GroupNorm with
        one group on the input).
    """

    grad_sample_mode = "ghost"  # measured fastest matching mode on CPU: benchmarks/dp_overhead.py

    def __init__(
        self,
        input_shape: tuple[int, ...],
        *,
        widths: tuple[int, ...] = (16, 32, 32),
        groups: int = 4,
        activation: str = "tanh",
        head_grid: int = 3,
        shift: int = 0,
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ChestCNN needs a (C, H, W) input shape, got {input_shape}")
        act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
        layers: list[nn.Module] = [RandomShift(shift)] if shift else []
        channels = input_shape[0]
        if input_norm:  # each image standardised by its own mean and std (no other image's)
            layers.append(nn.GroupNorm(1, channels))
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(min(groups, width), width),
                act(),
                nn.MaxPool2d(2),
            ]
            channels = width
        layers += [nn.AdaptiveAvgPool2d(head_grid), nn.Flatten()]  # [B, w * g * g]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * head_grid * head_grid, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(-1)  # [B]
