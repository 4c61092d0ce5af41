"""Local training at one hospital: plain PyTorch, with Opacus DP-SGD when enabled.

Nothing here imports Flower: unit tests call these functions directly.

Privacy accounting follows Opacus: the accountant (``opacus.accountants``) is stepped by the
``DPOptimizer`` on every step actually taken, and its state (``state_dict()``: mechanism and the
history of ``(noise_multiplier, sample_rate, steps)``) is carried from round to round, so the
epsilon returned after round k covers all k rounds (never just the last one).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from client.secure_dp import SecurePrivacyEngine
from client.secure_random import SecureRandom
from shared_models.config import RunConfig
from shared_models.image_models import seed_augmentation

# Library notices that are expected in fedcare's use and not the user's to act on, ignored once
# here rather than around each call: warnings.catch_warnings is not thread-safe, and a simulation
# trains its hospitals and its baselines in threads of one process (one thread's exit restored
# the filters while another still trained, and the notices reached the console).
# - torch: Opacus' hooks fire although the first layer's input (the images) needs no gradient;
#   Opacus' per-sample gradients use the output gradients only.
# - Opacus RDP: "optimal order is the largest alpha": the ε is still a valid bound (at the
#   largest order), only not the tightest.
# - Opacus: its torchcsprng-based RNG is off (secure_mode=False); DP-SGD's noise and Poisson
#   sampling come from the hospital's ChaCha20 generator instead (:mod:`client.secure_dp`).
for _notice in (
    "Full backward hook is firing",
    "Optimal order is the largest alpha",
    "Secure RNG turned off",
):
    warnings.filterwarnings("ignore", message=_notice)

AccountantState = dict[str, Any]  # {"mechanism": str, "history": [[sigma, q, steps], ...]}


class PrivacyBudgetError(RuntimeError):
    """A round would take more DP steps (or an evaluation more releases) than the run was
    calibrated for. The message names no number derived from the hospital's data; ``detail`` (the
    step counts) stays at the hospital."""

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


def steps_exceeded(taken: int, steps: int, total: int) -> PrivacyBudgetError:
    """The refusal of a round whose ``steps`` would take the run past its planned ``total``."""
    return PrivacyBudgetError(
        "this round's DP-SGD steps would exceed the steps the run was calibrated for "
        "(train.rounds rounds of train.local-epochs)",
        detail=f"{steps} steps, {taken} of {total} already taken",
    )


def sample_rate(n_train: int, batch_size: int) -> float:
    """Poisson sampling rate q used by Opacus for this hospital.

    Equals ``1 / len(DataLoader(n_train, batch_size))``, exactly what
    ``opacus.data_loader.DPDataLoader.from_data_loader`` uses, so calibration and accounting agree.
    """
    return 1.0 / math.ceil(n_train / batch_size)


def steps_per_round(n_train: int, batch_size: int, local_epochs: float) -> int:
    """Optimizer steps per round: ``ceil(local_epochs / q)`` (one epoch = 1/q Poisson steps)."""
    return max(1, math.ceil(local_epochs / sample_rate(n_train, batch_size) - 1e-9))


@dataclass(frozen=True)
class DPPlan:
    """DP-SGD parameters of one hospital for a whole run.

    Attributes
    ----------
    noise_multiplier : float
        sigma, calibrated once so that ``total_steps`` steps at ``sample_rate`` spend at most
        ``target_epsilon`` at ``target_delta``.
    sample_rate : float
        Poisson sampling rate q.
    steps_per_round, total_steps : int
        Local steps per round, and over all rounds.
    target_epsilon, target_delta : float
        The run's (ε, δ) at this hospital: DP-SGD and evaluation releases together.
    max_grad_norm : float
        Per-sample clipping bound C.
    accountant : str
        Opacus accountant (``rdp`` or ``prv``).
    eval_noise_multiplier : float
        Noise multiplier of each evaluation release (Gaussian, L2 sensitivity 1: noisy score
        histograms, :func:`client.evaluation.release_histograms`); 0 when none is planned.
    eval_releases : int
        Evaluation releases the plan allows (0: the hospital releases exact metrics or none).
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    total_steps: int
    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    accountant: str
    eval_noise_multiplier: float = 0.0
    eval_releases: int = 0

    def planned_state(self) -> AccountantState:
        """The accountant state of the whole planned run (all DP-SGD steps, every release)."""
        return planned_history(
            self.accountant,
            self.noise_multiplier,
            self.sample_rate,
            self.total_steps,
            self.eval_noise_multiplier,
            self.eval_releases,
        )


def planned_history(
    accountant: str,
    noise_multiplier: float,
    q: float,
    steps: int,
    eval_noise_multiplier: float,
    eval_releases: int,
) -> AccountantState:
    """Accountant state of ``steps`` DP-SGD steps (sigma, q) followed by ``eval_releases``
    Gaussian releases of sensitivity 1 with ``eval_noise_multiplier`` (recorded, as Opacus
    records a step, as ``(sigma, sample_rate=1, 1)``)."""
    history: list[list[float]] = [[noise_multiplier, q, steps]]
    if eval_releases:
        history.append([eval_noise_multiplier, 1.0, eval_releases])
    return {"mechanism": accountant, "history": history}


@functools.lru_cache(maxsize=256)  # a pure function of its arguments; a frozen result
def plan_dp(
    *,
    n_train: int,
    batch_size: int,
    local_epochs: float,
    rounds: int,
    target_epsilon: float,
    target_delta: float,
    max_grad_norm: float,
    accountant: str = "rdp",
    eval_noise_multiplier: float = 0.0,
    eval_releases: int = 0,
) -> DPPlan:
    """Calibrate the noise multiplier once for the whole run (all rounds x local steps), so that
    DP-SGD and ``eval_releases`` evaluation releases together spend at most ``target_epsilon``.

    Without evaluation releases this is ``opacus.accountants.utils.get_noise_multiplier``
    (binary search; the returned sigma gives epsilon <= target). With them, the same binary
    search (same bracket, same 0.01 tolerance) runs over the composed history of
    :func:`planned_history`, which Opacus' function cannot express.

    Raises
    ------
    ValueError
        ``target_delta >= 1 / n_train`` (delta must be below one over the number of records),
        or a budget too small to reach (e.g. the evaluation releases alone exceed it). The
        message names no number derived from ``n_train``: it may reach the coordinator.
    """
    if target_delta >= 1.0 / n_train:
        raise ValueError(
            f"dp.target-delta = {target_delta:g} is not below 1/n_train (n_train: the number of "
            "training records at the hospital); use a smaller delta"
        )
    q = sample_rate(n_train, batch_size)
    k = steps_per_round(n_train, batch_size, local_epochs)
    if eval_releases == 0:
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=q,
            steps=rounds * k,
            accountant=accountant,
        )
    else:
        sigma = _calibrate_with_releases(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            state_for=lambda s: planned_history(
                accountant, s, q, rounds * k, eval_noise_multiplier, eval_releases
            ),
        )
    return DPPlan(
        noise_multiplier=float(sigma),
        sample_rate=q,
        steps_per_round=k,
        total_steps=rounds * k,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        max_grad_norm=max_grad_norm,
        accountant=accountant,
        eval_noise_multiplier=eval_noise_multiplier if eval_releases else 0.0,
        eval_releases=eval_releases,
    )


_MAX_SIGMA = 1e6  # as opacus.accountants.utils.MAX_SIGMA


def _calibrate_with_releases(
    *,
    target_epsilon: float,
    target_delta: float,
    state_for: Callable[[float], AccountantState],
    tolerance: float = 0.01,
) -> float:
    """Smallest sigma (within ``tolerance`` in ε) whose composed state spends <= the target:
    the bracket-and-bisect of ``opacus.accountants.utils.get_noise_multiplier``."""
    lo, hi, eps_hi = 0.0, 10.0, math.inf
    while eps_hi > target_epsilon:
        hi *= 2
        eps_hi = epsilon_spent(state_for(hi), delta=target_delta)
        if hi > _MAX_SIGMA:
            raise ValueError(
                f"ε = {target_epsilon:g} cannot be reached: the evaluation releases alone spend "
                "more; raise dp.target-epsilon or dp.eval-noise-multiplier"
            )
    while target_epsilon - eps_hi > tolerance:
        mid = (lo + hi) / 2
        eps = epsilon_spent(state_for(mid), delta=target_delta)
        if eps < target_epsilon:
            hi, eps_hi = mid, eps
        else:
            lo = mid
    return hi


def plan_for_run(
    run: RunConfig,
    *,
    n_train: int,
    private_evaluation: bool = False,
    memo: MutableMapping[str, Any] | None = None,
) -> DPPlan:
    """:func:`plan_dp` with the run's settings (``train.*`` and ``dp.*``) for a hospital of ``n_train``.

    ``private_evaluation``: the hospital releases noisy evaluation counts (its policy forbids exact
    metrics), so the plan budgets ``eval.every``'s evaluation rounds at
    ``dp.eval-noise-multiplier`` inside the run's ε.

    ``memo`` (a hospital's ``Context.state`` record, kept by its SuperNode from message to
    message) stores the plan under its exact inputs, so the binary search on the accountant
    (about 0.3 s on a 2-core VM) runs once per run instead of at every round. The plan only sets
    sigma: epsilon is always the accountant's over the steps actually taken.
    """
    inputs = {
        "n_train": n_train,
        "batch_size": run.train.batch_size,
        "local_epochs": run.train.local_epochs,
        "rounds": run.train.rounds,
        "target_epsilon": run.dp.target_epsilon,
        "target_delta": run.dp.target_delta,
        "max_grad_norm": run.dp.max_grad_norm,
        "accountant": run.dp.accountant,
        "eval_noise_multiplier": run.dp.eval_noise_multiplier,
        "eval_releases": (
            run.evaluation_rounds_count * run.releases_per_evaluation if private_evaluation else 0
        ),
    }
    key = json.dumps(inputs, sort_keys=True)
    if memo is not None and isinstance(cached := memo.get(key), str):
        return DPPlan(**json.loads(cached))
    plan = plan_dp(**inputs)  # type: ignore[arg-type]
    if memo is not None:
        memo[key] = json.dumps(asdict(plan))
    return plan


def empty_accountant_state(accountant: str) -> AccountantState:
    """The state of a fresh Opacus accountant (no steps taken)."""
    return {"mechanism": create_accountant(accountant).mechanism(), "history": []}


def accountant_steps(state: AccountantState) -> int:
    """Number of DP steps recorded in an accountant state."""
    return int(sum(int(steps) for _, _, steps in state["history"]))


def stored_hospital_delta(entry: dict[str, Any]) -> float:
    """The hospital's δ of a ledger entry (JSON form of :class:`client.ledger.RunRecord`): ``hospital_delta``;
    ``site_delta`` in ledgers written before fedcare said "hospital" only; the run's δ in ledgers
    older still."""
    return float(entry.get("hospital_delta", entry.get("site_delta", entry["delta"])))


def epsilon_spent(state: AccountantState, *, delta: float) -> float:
    """Epsilon of all steps recorded in ``state`` at ``delta`` (0.0 when nothing was spent).

    Uses the same Opacus accountant class that recorded the steps, except that a history with
    un-subsampled Gaussian releases (evaluation counts, ``sample_rate = 1``) is accounted with
    RDP, for which Opacus' PRV accountant is numerically unreliable (RDP's ε is the larger).
    RDP is computed as ``RDPAccountant.get_privacy_spent`` does (``compute_rdp`` per history
    entry, summed, then ``get_privacy_spent`` at ``delta``) with the per-step RDP of each
    (sigma, q) cached: the hospital checks ε several times per round.
    """
    if not state["history"]:
        return 0.0
    history = _history(state)
    # PRV is numerically unreliable for un-subsampled releases (q = 1): RDP accounts those runs
    mechanism = "rdp" if any(q >= 1.0 for _, q, _ in history) else state["mechanism"]
    if mechanism == "rdp":
        rdp = sum(np.asarray(_rdp_per_step(sigma, q)) * steps for sigma, q, steps in history)
        eps, _ = privacy_analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
        return float(eps)
    acc = create_accountant(mechanism)
    acc.load_state_dict({"mechanism": mechanism, "history": history})
    with np.errstate(all="ignore"):  # PRV's numerics (log of 0 at the domain's edge); numpy's
        return float(acc.get_epsilon(delta=delta))  # errstate is per thread, unlike warnings


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> tuple[float, ...]:
    """RDP of one step of the subsampled Gaussian at Opacus' default orders."""
    rdp = privacy_analysis.compute_rdp(
        q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    return tuple(float(v) for v in rdp)


def _history(state: AccountantState) -> list[tuple[float, float, int]]:
    return [(float(s), float(q), int(k)) for s, q, k in state["history"]]


def _proximal_step(
    model: nn.Module,
    *,
    lr: float,
    mu: float,
    anchor_state: Mapping[str, torch.Tensor] | None = None,
) -> Callable[[], None]:
    """FedProx as post-processing: ``w -= lr * mu * (w - w_global)`` after each optimizer step;
    ``w_global`` is the model's starting point, or ``anchor_state`` (Ditto's global weights)."""
    if anchor_state is None:
        anchor = [p.detach().clone() for p in model.parameters()]
    else:
        anchor = [
            anchor_state[name].detach().to(p.device, p.dtype).clone()
            for name, p in model.named_parameters()
        ]

    @torch.no_grad()
    def step() -> None:
        for p, g in zip(model.parameters(), anchor, strict=True):
            p.sub_(lr * mu * (p - g))

    return step


def _run_steps(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    steps: int,
    device: str,
    after_step: Callable[[], None] | None,
    criterion: Callable[[torch.Tensor, torch.Tensor], Any],
) -> list[float]:
    """Take ``steps`` optimizer steps (cycling over ``loader``); return the non-empty batch losses.

    The losses stay on the device until the end (no host synchronisation per step).
    """
    losses: list[torch.Tensor] = []
    batches = _cycle(loader)
    for _ in range(steps):
        xb, yb = next(batches)
        xb, yb = xb.to(device), yb.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(net(xb), yb)  # an empty Poisson batch: nan loss, Opacus adds noise only
        loss.backward()
        optimizer.step()
        if len(yb):
            losses.append(loss.detach())
        if after_step is not None:
            after_step()
    return torch.stack(losses).tolist() if losses else []


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one round of local training.

    Attributes
    ----------
    loss : float
        Mean training loss (binary cross-entropy) over the round's non-empty batches.
    steps : int
        Optimizer steps taken this round.
    accountant_state : AccountantState | None
        Accountant state after the round (all rounds so far); None without DP.
    epsilon : float | None
        Cumulative epsilon of the run at this hospital after this round; None without DP.
    """

    loss: float
    steps: int
    accountant_state: AccountantState | None
    epsilon: float | None


def _cycle(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def train_round(
    model: nn.Module,
    data: Dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    dp: DPPlan | None,
    accountant_state: AccountantState | None = None,
    proximal_mu: float = 0.0,
    proximal_anchor: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    steps_taken: int | None = None,
    device: str = "cpu",
    grad_sample_mode: str = "hooks",
    clip_per_sample: float | None = None,
    randomness: SecureRandom | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``steps`` optimizer steps on one hospital's data.

    Parameters
    ----------
    model : nn.Module
        Maps ``[B, *input_shape] float32`` to logits ``[B]``; starts from the global weights.
    data : Dataset
        The training split: ``(x [*input_shape] float32, y [] float32 in {0, 1})`` pairs
        (e.g. :meth:`shared_models.tasks.HospitalData.train_set`).
    steps : int
        Optimizer steps to take.
    batch_size : int
        Expected batch size (DP: Poisson sampling with q = 1/ceil(N/B)).
    dp : DPPlan or None
        DP-SGD parameters (Opacus ``PrivacyEngine.make_private``: per-sample clipping at
        ``max_grad_norm``, Gaussian noise ``noise_multiplier * max_grad_norm``, Poisson
        sampling). None trains without DP.
    accountant_state : AccountantState, optional
        Accountant state of this run so far at this hospital (restored before training).
    proximal_mu : float
        FedProx proximal coefficient (Li et al. 2020, arXiv:1812.06127). Applied as a
        data-independent step ``w -= lr * mu * (w - w_global)`` after each (private) optimizer
        step, so it is post-processing and does not change the DP guarantee.
    proximal_anchor : mapping of str to Tensor, optional
        ``w_global`` of the proximal step, by parameter name; default the model's weights at
        the start (FedProx). Ditto's personal model passes the round's global weights.
    seed : int
        Batch order (and image augmentation) of NON-private training only. Nothing seeds DP
        training: its Poisson sampling, Gaussian noise and augmentation draw from
        ``randomness``.
    steps_taken : int, optional
        DP-SGD steps this run already took here (default: every step in ``accountant_state``;
        the ledger passes its own count when the state also holds evaluation releases).
    device : str
        Torch device; the model, and a ``TensorDataset``'s tensors, are moved there once.
    grad_sample_mode : str
        How Opacus computes per-sample gradient norms: ``"hooks"``, ``"functorch"`` or
        ``"ghost"`` (fast gradient clipping, Li et al. ICLR 2022 / Bu et al. 2022: norms
        without per-sample gradients, a second backward pass with the clipping coefficients;
        needs the criterion wrapped by ``make_private``). The same clipped gradient and
        guarantee in every mode; see :func:`client.dp_modes.grad_sample_mode_for`.
    clip_per_sample : float, optional
        Non-private training only: DP-SGD's update without its noise -- each example's gradient
        clipped to this L2 norm, then averaged (Opacus ``make_private`` with
        ``noise_multiplier=0``, in ``grad_sample_mode``), over the seeded shuffled batches
        (no Poisson sampling). The non-private baselines of a DP run use it: a learning rate
        tuned for per-example-clipped gradients can diverge on merely batch-clipped ones.
    randomness : SecureRandom, optional
        DP training's source of randomness (:class:`client.secure_random.SecureRandom`: the
        ChaCha20 keystream); default a new one under a key from the OS CSPRNG, never stored.
        Tests pass a fixed key to show that it is the only source of the noise.

    Raises
    ------
    PrivacyBudgetError
        If this round would take the hospital beyond the run's calibrated ``total_steps``.
    """
    model.to(device).train()
    data = _on_device(data, device)
    # DP: Poisson masks, noise and augmentation from the hospital's ChaCha20 generator, under a
    # fresh key from the OS CSPRNG, so nobody outside the hospital can reproduce (and subtract)
    # them. Without DP there is no noise to protect: the seed fixes the batch order.
    if dp is not None:
        randomness = randomness or SecureRandom()
        seed_augmentation(model, randomness.randbits(64))  # image tasks' RandomAffine
    else:
        seed_augmentation(model, seed)
    sampler = torch.Generator().manual_seed(seed)  # non-private batch order only
    loader = DataLoader(data, batch_size=batch_size, shuffle=dp is None, generator=sampler)
    criterion: Callable[[torch.Tensor, torch.Tensor], Any] = nn.BCEWithLogitsLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    if dp is not None and clip_per_sample is not None:
        raise ValueError(
            "clip_per_sample is for non-private training; DP-SGD clips at dp.max_grad_norm"
        )
    engine = None
    net: nn.Module = model
    if dp is not None:
        state = accountant_state or empty_accountant_state(dp.accountant)
        taken = accountant_steps(state) if steps_taken is None else steps_taken
        if taken + steps > dp.total_steps:
            raise steps_exceeded(taken, steps, dp.total_steps)
    if dp is not None or clip_per_sample is not None:
        engine = SecurePrivacyEngine(
            accountant=dp.accountant if dp else "rdp", randomness=randomness or SecureRandom()
        )
        if dp is not None:
            engine.accountant.load_state_dict(
                {"mechanism": state["mechanism"], "history": _history(state)}
            )
        private = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier if dp else 0.0,
            max_grad_norm=dp.max_grad_norm if dp else clip_per_sample,
            poisson_sampling=dp is not None,
            grad_sample_mode=grad_sample_mode,
            criterion=criterion,  # wrapped in ghost mode (its two backward passes)
        )
        if grad_sample_mode == "ghost":
            net, optimizer, criterion, loader = private
        else:
            net, optimizer, loader = private
    if dp is not None:
        assert abs(loader.sample_rate - dp.sample_rate) < 1e-12, "sample rate drifted from the plan"
    try:
        losses = _run_steps(
            net, optimizer, loader, steps=steps, device=device, criterion=criterion,
            after_step=(
                _proximal_step(model, lr=lr, mu=proximal_mu, anchor_state=proximal_anchor)
                if proximal_mu > 0
                else None
            ),
        )  # fmt: skip
    finally:
        if isinstance(net, AbstractGradSampleModule):  # detach Opacus hooks (``model`` holds
            net.cleanup()  # the weights); cleanup() also removes the hooks
    mean_loss = float(np.mean(losses)) if losses else float("nan")
    if engine is None or dp is None:
        return TrainResult(loss=mean_loss, steps=steps, accountant_state=None, epsilon=None)
    raw = engine.accountant.state_dict()
    new_state: AccountantState = {
        "mechanism": raw["mechanism"],
        "history": [[float(s), float(q), int(k)] for s, q, k in raw["history"]],
    }
    return TrainResult(
        loss=mean_loss,
        steps=steps,
        accountant_state=new_state,
        epsilon=epsilon_spent(new_state, delta=dp.target_delta),
    )


def _on_device(data: Dataset, device: str) -> Dataset:
    """A ``TensorDataset`` with its tensors on ``device`` (moved once, not per batch); any
    other dataset as it is (its batches are moved in the loop)."""
    if isinstance(data, TensorDataset) and any(
        t.device != torch.device(device) for t in data.tensors
    ):
        return TensorDataset(*(t.to(device) for t in data.tensors))
    return data


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; other names are passed through.

    Raises
    ------
    ValueError
        A CUDA device was requested but none is available.
    """
    if name in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here")
    return name
