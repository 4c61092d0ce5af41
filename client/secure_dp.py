"""Opacus DP-SGD with its randomness from the hospital's :class:`~client.secure_random.SecureRandom`.

Opacus computes the per-sample gradients, clips them, steps the accountant and keeps the
privacy bookkeeping; this module replaces only its two random draws, which Opacus takes from a
``torch.Generator`` (mt19937 on the CPU, searchable from the released noise) unless
``secure_mode`` is on, and ``secure_mode`` needs torchcsprng, which is no longer maintained:

- **Poisson sampling**: :class:`SecurePoissonSampler` is Opacus'
  ``UniformWithReplacementSampler`` with each example's inclusion drawn by
  :meth:`SecureRandom.bernoulli` instead of ``torch.rand(..., generator=...)``;
  :meth:`SecurePrivacyEngine._prepare_data_loader` builds Opacus' ``DPDataLoader`` around it
  (:class:`SecureDPDataLoader`: the same sample rate, empty batches included).
- **Gaussian noise**: :class:`SecureDPOptimizer` overrides ``add_noise``: one float64 draw of N(0, (sigma C)^2) for all parameters from
  :meth:`SecureRandom.standard_normal`, added to the clipped sum in float64 and rounded once to
  the parameter's dtype. Everything after (``scale_grad``, the optimizer's update) is
  post-processing of that released sum.
- **Non-finite example gradients**: before Opacus clips, an example whose gradient has a
  non-finite entry contributes 0 instead of turning the whole update into NaN
  (:meth:`_SecureNoise.clip_and_accumulate`); the ``ghost`` mode, which never has per-example
  gradients to check, is refused for DP training (:func:`check_private_mode`).

Floating-point attacks (Mironov, CCS 2012; Jin et al., IEEE S&P 2022, which recovered data from
Opacus' float32 noise) exploit which floating-point values ``x + noise`` can take for different
``x``. Here the sum is formed in float64 from noise on float64's 53-bit grid and rounded once to
float32, whose grid is 2**29 times coarser: every float32 output near ``x`` is reached from both
neighbouring datasets, with probabilities that differ from the ideal Gaussian's only in the
float64 rounding. This is Opacus' ``secure_mode`` idea (noise finer than the output grid;
Holohan & Braghin 2021, section 5.1) at a quarter of its draws. The residual risk, stated in
``docs/privacy.md``: the guarantee is that of an exact Gaussian up to the float64 approximation (tails cut at
8.57 sigma, density on float64's grid), argued, not proven; a discrete Gaussian (Canonne, Kamath
& Steinke 2020) would make it exact but cannot serve float gradients.

Opacus' private methods that this module overrides or calls (``PrivacyEngine._prepare_optimizer``
and ``_prepare_data_loader``, the optimizer's ``add_noise`` and ``clip_and_accumulate``, the
sampler, the loader) are pinned
by the SHA-256 of their source in ``tests/test_secure_dp.py``: an Opacus upgrade that changes
them fails that test until this module is re-checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping, get_optimizer_class
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from client.secure_random import SecureRandom


class SecurePoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson batch sampler with inclusions from a :class:`SecureRandom`.

    Each of ``len(self)`` batches holds every example independently with probability
    ``sample_rate`` (:meth:`SecureRandom.bernoulli`: at most ``sample_rate``, within 2**-64).
    """

    def __init__(self, *, num_samples: int, sample_rate: float, randomness: SecureRandom) -> None:
        super().__init__(num_samples=num_samples, sample_rate=sample_rate, generator=None)
        self.randomness = randomness

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield (
                self.randomness.bernoulli(self.sample_rate, self.num_samples).nonzero()[0].tolist()
            )


class SecureDPDataLoader(DataLoader):
    """Opacus' ``DPDataLoader`` with a :class:`SecurePoissonSampler`: Poisson batches at
    ``sample_rate``, the collate function wrapped for empty batches as Opacus wraps it
    (``wrap_collate_with_empty`` with the first example's shapes and dtypes).

    Parameters
    ----------
    dataset : Dataset
        Map-style dataset of ``(x, y)`` examples.
    sample_rate : float
        Poisson sampling rate q; ``len(loader)`` is ``int(1 / q)`` batches, as Opacus'.
    randomness : SecureRandom
        The source of the inclusions.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        sample_rate: float,
        randomness: SecureRandom,
        collate_fn: Any = None,
        batch_first: bool = True,
        **kwargs: Any,
    ) -> None:
        self.sample_rate = sample_rate
        self.distributed = False
        first = dataset[0]
        super().__init__(
            dataset=dataset,
            batch_sampler=SecurePoissonSampler(
                num_samples=len(dataset), sample_rate=sample_rate, randomness=randomness
            ),
            collate_fn=wrap_collate_with_empty(
                collate_fn=collate_fn or default_collate,
                batch_first=batch_first,
                sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
                dtypes=[dtype_safe(x) for x in first],
            ),
            **kwargs,
        )

    @classmethod
    def from_loader(
        cls, data_loader: DataLoader, *, randomness: SecureRandom, batch_first: bool = True
    ) -> SecureDPDataLoader:
        """As ``DPDataLoader.from_data_loader``: sample rate ``1 / len(data_loader)``, the same
        dataset, collate function, workers and memory pinning."""
        return cls(
            data_loader.dataset, sample_rate=1 / len(data_loader), randomness=randomness,
            collate_fn=data_loader.collate_fn, batch_first=batch_first,
            num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory,
        )  # fmt: skip


class _SecureNoise:
    """Opacus' DP optimizer with the noise from ``self.randomness`` and every example's
    gradient checked before it is clipped."""

    randomness: SecureRandom
    params: list[torch.nn.Parameter]
    noise_multiplier: float
    max_grad_norm: float
    grad_samples: list[torch.Tensor]

    def clip_and_accumulate(self) -> None:
        """Opacus' ``DPOptimizer.clip_and_accumulate`` (flat clipping: each example's gradient
        scaled by ``min(1, C / (norm + 1e-6))`` and summed into ``p.summed_grad``), except that
        an example whose gradient norm is not finite contributes 0.

        In Opacus such an example's factor is 0 (or NaN) and ``0 * inf`` is NaN, which turns the
        whole sum, the noise and the released weights into NaN. Global weights crafted so that
        one patient's gradient overflows (GroupNorm on a constant group, a huge learning signal)
        would then release "this patient was sampled" outside the noise. A zeroed example lies
        inside the clipping ball: the sensitivity stays C and the accounting unchanged. The norm
        is non-finite exactly when an entry is (or when finite entries overflow it: zeroed too).
        The usual case costs one check of B norms; the rows are rewritten only when one is bad.
        """
        samples = self.grad_samples
        if len(samples[0]) == 0:  # an empty Poisson batch
            super().clip_and_accumulate()  # type: ignore[misc]
            return
        device = samples[0].device
        norms = torch.stack(
            [g.reshape(len(g), -1).norm(2, dim=-1).to(device) for g in samples], dim=1
        ).norm(2, dim=1)  # [B]
        finite = torch.isfinite(norms)
        factor = torch.where(
            finite, (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0), torch.zeros_like(norms)
        )
        all_finite = bool(finite.all())
        for p, grad_sample in zip(self.params, samples, strict=True):
            _check_processed_flag(p.grad_sample)  # type: ignore[attr-defined]
            g = grad_sample.to(p.dtype)
            if not all_finite:  # 0 * inf is NaN: the bad rows become 0 before scaling
                rows = finite.to(g.device).view(-1, *[1] * (g.dim() - 1))
                g = torch.where(rows, g, torch.zeros((), dtype=g.dtype, device=g.device))
            grad = torch.einsum("i,i...", factor.to(g.device).to(p.dtype), g)
            if p.summed_grad is not None:  # type: ignore[attr-defined]
                p.summed_grad += grad  # type: ignore[attr-defined]
            else:
                p.summed_grad = grad  # type: ignore[attr-defined]
            _mark_as_processed(p.grad_sample)  # type: ignore[attr-defined]

    def add_noise(self) -> None:
        """``p.grad = round(p.summed_grad + N(0, (sigma C)^2))`` for every parameter, the noise
        drawn once for all (float64), the sum rounded once to the parameter's dtype.

        The fast-gradient-clipping optimizer's ``_adjusted_noise_multiplier`` (adaptive
        clipping) is honoured as in Opacus; the accountant always records ``noise_multiplier``.
        """
        sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = float(sigma) * float(self.max_grad_norm)
        sums = [p.summed_grad for p in self.params]  # type: ignore[attr-defined]
        for summed in sums:
            _check_processed_flag(summed)
        if std == 0.0:  # noiseless (non-private baselines): no draw
            for p, summed in zip(self.params, sums, strict=True):
                p.grad = summed.view_as(p)
                _mark_as_processed(summed)
            return
        sizes = [s.numel() for s in sums]
        drawn = self.randomness.standard_normal(sum(sizes)) * std  # [P] float64
        if all(s.device.type == "cpu" and s.dtype == sums[0].dtype for s in sums):
            # one float64 sum and one rounding for all parameters, in numpy (the fewest calls:
            # this runs at every step)
            flat = np.concatenate([s.detach().numpy().ravel() for s in sums])
            noisy = torch.from_numpy((flat + drawn).astype(flat.dtype)).split(sizes)
        else:  # per parameter, on its device
            noisy = tuple(
                (s.double() + z.to(s.device).view_as(s)).to(s.dtype)
                for s, z in zip(sums, torch.from_numpy(drawn).split(sizes), strict=True)
            )
        for p, summed, grad in zip(self.params, sums, noisy, strict=True):
            p.grad = grad.view_as(p)
            _mark_as_processed(summed)


class SecureDPOptimizer(_SecureNoise, DPOptimizer):
    """Opacus' ``DPOptimizer`` (flat clipping) with :class:`SecureRandom` noise."""

    def __init__(self, *args: Any, randomness: SecureRandom, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.randomness = randomness


SANITISED_MODES = ("hooks", "functorch")  # per-example gradients exist, and are checked


def check_private_mode(grad_sample_mode: str) -> None:
    """Refuse a per-sample gradient mode whose per-example gradients cannot be checked.

    Opacus' ``ghost`` mode (fast gradient clipping) never materialises per-example gradients:
    its second backward pass sums every example's clipped gradient at once, so a non-finite
    gradient of one example (see :meth:`_SecureNoise.clip_and_accumulate`) cannot be removed
    before it reaches the released update. ``hooks`` and ``functorch`` compute the same clipped
    gradient with the check.

    Raises
    ------
    ValueError
        ``grad_sample_mode`` is not one of :data:`SANITISED_MODES`.
    """
    if grad_sample_mode not in SANITISED_MODES:
        raise ValueError(
            f"dp.grad-sample-mode = {grad_sample_mode!r} is not accepted for DP training here: "
            "it sums the examples' gradients before each can be checked for non-finite values; "
            f"choose one of {list(SANITISED_MODES)} (the same clipped gradient) or 'default'"
        )


class SecurePrivacyEngine(PrivacyEngine):
    """Opacus' ``PrivacyEngine`` whose ``make_private`` returns a data loader and an optimizer
    that draw from ``randomness`` (module docstring). Accountant, clipping and per-sample
    gradients are Opacus' own.

    Parameters
    ----------
    accountant : str
        Opacus accountant name (``"rdp"``, ``"prv"``).
    randomness : SecureRandom
        The source of the Poisson masks and the Gaussian noise.

    Raises
    ------
    ValueError
        From ``make_private``: a clipping mode or a distributed setting without a secure
        counterpart here (fedcare uses flat clipping on one device).
    """

    def __init__(self, *, accountant: str, randomness: SecureRandom) -> None:
        super().__init__(accountant=accountant, secure_mode=False)
        self.randomness = randomness

    def _prepare_data_loader(
        self,
        data_loader: DataLoader,
        *,
        poisson_sampling: bool,
        distributed: bool,
        batch_first: bool = True,
        rand_on_empty: bool = False,
    ) -> DataLoader:
        if not poisson_sampling:  # fixed batches (benchmarks, non-private baselines)
            return super()._prepare_data_loader(
                data_loader, poisson_sampling=False, distributed=distributed,
                batch_first=batch_first, rand_on_empty=rand_on_empty,
            )  # fmt: skip
        if distributed or rand_on_empty:
            raise ValueError("secure Poisson sampling serves one device and empty batches")
        if self.dataset is None:  # type: ignore[has-type]  # as Opacus' own method
            self.dataset = data_loader.dataset
        return SecureDPDataLoader.from_loader(
            data_loader, randomness=self.randomness, batch_first=batch_first
        )

    def _prepare_optimizer(
        self,
        *,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float | list[float],
        expected_batch_size: int,
        loss_reduction: str = "mean",
        distributed: bool = False,
        clipping: str = "flat",
        noise_generator: Any = None,
        grad_sample_mode: str = "hooks",
        **kwargs: Any,
    ) -> DPOptimizer:
        if noise_generator is not None:
            raise ValueError("the noise comes from the engine's SecureRandom, not a generator")
        if noise_multiplier > 0:  # a DP release (noiseless baselines may use any mode)
            check_private_mode(grad_sample_mode)
        if isinstance(optimizer, DPOptimizer):
            optimizer = optimizer.original_optimizer
        opacus_class = get_optimizer_class(
            clipping=clipping, distributed=distributed, grad_sample_mode=grad_sample_mode
        )
        if opacus_class is DPOptimizerFastGradientClipping:  # noiseless only (checked above)
            return opacus_class(
                optimizer=optimizer, noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                loss_reduction=loss_reduction, generator=None, secure_mode=False, **kwargs,
            )  # fmt: skip
        if opacus_class is not DPOptimizer:
            raise ValueError(
                f"no secure counterpart of Opacus' {opacus_class.__name__} (clipping "
                f"{clipping!r}, distributed={distributed})"
            )
        return SecureDPOptimizer(
            optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size, loss_reduction=loss_reduction,
            generator=None, secure_mode=False, randomness=self.randomness, **kwargs,
        )  # fmt: skip


__all__ = [
    "SANITISED_MODES",
    "SecureDPDataLoader",
    "SecureDPOptimizer",
    "check_private_mode",
    "SecurePoissonSampler",
    "SecurePrivacyEngine",
]
