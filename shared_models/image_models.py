"""Convolutional networks for the image tasks, built for DP-SGD (Opacus).

Registered in :data:`shared_models.models.MODELS`; like every shared model they pass
``opacus.validators.ModuleValidator.validate(model, strict=True)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RandomAffine(nn.Module):
    """Random rotation, scaling and translation of each example, in training mode only.

    ``x: [B, C, H, W] -> [B, C, H, W]``. Each example gets its own angle in
    ``[-rotation, rotation]`` degrees, zoom factor in ``[1 - scale, 1 + scale]`` and offset in
    ``[-shift, shift]`` pixels per axis, applied with bilinear sampling
    (``torch.nn.functional.affine_grid`` / ``grid_sample``, border pixels replicated). It has no
    parameters and each output row depends on its own input row only, so per-sample clipping
    and the DP accounting are unchanged: the augmentation is part of the per-example
    computation (one augmented view per example and step; De et al. 2022, arXiv:2204.13650,
    section 3.1, for augmentation under DP-SGD).

    Draws from :attr:`generator` when set (see :func:`seed_augmentation`), else from torch's
    default generator. Augmentation randomness is not privacy noise: it needs no secrecy.
    """

    def __init__(self, rotation: float, scale: float, shift: float) -> None:
        super().__init__()
        self.rotation, self.scale, self.shift = rotation, scale, shift
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not (self.rotation or self.scale or self.shift):
            return x
        b, _, h, w = x.shape

        def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1), drawn on the CPU
            return (torch.rand(shape, generator=self.generator) * 2 - 1).to(x.device)

        angle = uniform(b) * math.radians(self.rotation)  # [B]
        zoom = 1 + uniform(b) * self.scale  # [B]; > 1 magnifies
        offset = uniform(b, 2) * self.shift * 2 / torch.tensor([w, h], device=x.device)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(  # [B, 2, 3]: output grid -> input coordinates, in [-1, 1] units
            [torch.stack([cos, -sin, offset[:, 0]], 1), torch.stack([sin, cos, offset[:, 1]], 1)],
            1,
        ).to(x.dtype)
        grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)


def seed_augmentation(model: nn.Module, seed: int) -> None:
    """Make every :class:`RandomAffine` in ``model`` draw from a generator seeded with ``seed``
    (so a non-private run is reproducible from its seed)."""
    for module in model.modules():
        if isinstance(module, RandomAffine):
            module.generator = torch.Generator().manual_seed(seed)


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
    on PneumoniaMNIST (``docs/chest-xray.md``; what did not help: ``benchmarks/notes/``).

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
    rotation, scale, shift : float
        Training-time augmentation (:class:`RandomAffine`): rotation in degrees, relative
        zoom, translation in pixels; all 0 = none. The defaults (15 degrees, 0.15, 2 pixels)
        were chosen by measurement (docs/chest-xray.md): under DP at epsilon = 3 they added
        0.002-0.006 test AUROC on PneumoniaMNIST's official test split; at epsilon = 1 and
        without DP the effect was within the seed-to-seed spread.
    input_norm : bool
        Standardise each image by its own mean and standard deviation first (a GroupNorm with
        one group on the input).
    """

    grad_sample_mode = "hooks"  # measured fastest matching mode on CPU: benchmarks/dp_overhead.py

    def __init__(
        self,
        input_shape: tuple[int, ...],
        *,
        widths: tuple[int, ...] = (16, 32, 32),
        groups: int = 4,
        activation: str = "tanh",
        head_grid: int = 3,
        rotation: float = 15.0,
        scale: float = 0.15,
        shift: float = 2.0,
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ChestCNN needs a (C, H, W) input shape, got {input_shape}")
        act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
        self.augment = RandomAffine(rotation, scale, shift)  # no weights: state_dict unchanged
        layers: list[nn.Module] = []
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
        return self.head(self.features(self.augment(x))).squeeze(-1)  # [B]


class ScatterLinear(nn.Module):
    """A linear classifier on scattering coefficients, for DP-SGD.

    ``x: [B, C, H, W] float32 -> logits [B]``, ``C`` a multiple of 27 (81 for the ``chest-xray``
    preprocessing ``scatter-28``: ``[B, 81, 7, 7]``, see
    :func:`shared_models.tasks.images.scattering`). GroupNorm without learned parameters (27
    groups of 3 channels, per example, so per-sample clipping is unchanged) and one linear layer
    (``C * H * W + 1`` parameters: 3,970 for 81 x 7 x 7).

    Source: Tramèr & Boneh, ICLR 2021, "Differentially private learning needs better features
    (or much more data)": ScatterNet + linear, with group normalisation of the scattering
    coefficients, outperforms end-to-end CNNs under DP-SGD at small ε. On PneumoniaMNIST with
    3 hospitals (docs/chest-xray.md) it beats :class:`ChestCNN` at ε = 1 and 3.

    Raises
    ------
    ValueError
        ``input_shape`` is not ``(C, H, W)`` with ``C`` a multiple of 27 (e.g. pixels ``(1, S, S)``:
        use preprocessing ``scatter-28``).
    """

    grad_sample_mode = "hooks"  # one Linear layer: Opacus' hooks need no more

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        if len(input_shape) != 3 or input_shape[0] % 27:
            raise ValueError(
                f"scatter-linear takes scattering coefficients [C, H, W] (C a multiple of 27), "
                f"not examples of shape {tuple(input_shape)}; use task.preprocessing "
                "'scatter-28'"
            )
        channels = input_shape[0]
        self.norm = nn.GroupNorm(27, channels, affine=False)
        self.head = nn.Linear(math.prod(input_shape), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x).flatten(1)).squeeze(-1)
