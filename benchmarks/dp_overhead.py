"""DP-SGD overhead per model: steps/s and peak memory of non-private training vs each Opacus
per-sample gradient mode, for EVERY model of EVERY task in the registry, on the CPU and (when
present) on CUDA.

    python benchmarks/dp_overhead.py [--batch-size 256] [--seconds 3] [--device cpu cuda]
                                     [--tasks NAME ...] [--threads N]

Inputs are random tensors of each task's example shape (``Task.input_shape`` with the task's
default preprocessing, or the preprocessing a model needs, ``Task.preprocessing_models``), so
models that other work registers appear here without any change.
One training step = forward, backward and optimizer step on one batch of ``--batch-size``
(DP: per-sample gradients or norms, clipping, Gaussian noise). Ratios are DP time / non-private
time within this one run, which is what stays comparable on a shared machine; the modes of one
model are timed in interleaved passes (``--repeats``) and each rate is the median of its passes. ``match`` says
whether the mode's clipped gradient (noise 0, fixed batch) equals ``hooks``' (Opacus' reference
mode) to 1e-4 relative; ``best`` is the fastest matching mode, to compare with the model's
recorded default (``grad_sample_mode`` on its class, run config ``dp.grad-sample-mode``).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the steps; on the CPU the growth
of the process' resident set (sampled every 5 ms) over its size before the steps, so small
allocations that reuse freed memory show as 0.

Cryptographic noise (last table; ``--noise-only`` prints just it): one DP step (the model's
default mode) with the hospital's noise (:class:`client.secure_dp.SecurePrivacyEngine`: ChaCha20
keystream, float64 Box-Muller, one rounding) against the same step with Opacus' own noise
(``torch.normal`` from a ``torch.Generator``, what fedcare used before), interleaved, for the MLP,
scatter-linear and the CNN at their preset batch sizes; and the Poisson mask of one step
(:meth:`client.secure_random.SecureRandom.bernoulli`) against ``torch.rand(n) < q``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402
from torch import nn  # noqa: E402

from client.dp_modes import GRAD_SAMPLE_MODES  # noqa: E402
from client.secure_dp import SecurePrivacyEngine  # noqa: E402
from client.secure_random import SecureRandom  # noqa: E402
from shared_models.models import build_model  # noqa: E402
from shared_models.tasks import TASKS  # noqa: E402
from tests.dp_gradients import clipped_gradient, make_private_fixed  # noqa: E402


def machine(devices: list[str]) -> str:
    """One paragraph about where this ran (CPU model, cores, load, versions, GPU)."""
    import opacus
    from machine import cpu_model, load_average

    cpu = cpu_model()
    load = load_average()
    lines = [
        f"machine: {platform.node()} {platform.system()} {platform.release()}; CPU {cpu}, "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {load}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"opacus {opacus.__version__}",
    ]
    if "cuda" in devices:
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    return "\n".join(lines)


class _RssPeak:
    """Peak resident-set growth of this process while the context is open (bytes)."""

    def __enter__(self) -> _RssPeak:
        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str | None):
    """A closure taking one training step; ``mode`` None = non-private."""
    if mode is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        criterion = nn.BCEWithLogitsLoss()
        net = model
    else:
        net, optimizer, criterion = make_private_fixed(model, x, y, mode=mode, noise_multiplier=1.0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(net(x), y).backward()
        optimizer.step()

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    build, shape: tuple[int, ...], mode: str | None, *, device: str, batch: int, seconds: float
) -> tuple[float, int]:
    """(steps per second, peak memory in bytes) of one mode on one device."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=gen).to(device)
    y = (torch.rand(batch, generator=gen) < 0.5).float().to(device)
    model = build().to(device).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = _step_fn(model, x, y, mode)
        for _ in range(2):  # warm-up (allocator, kernels, Opacus' first-call setup)
            step()
        _sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        n, started = 0, time.perf_counter()
        with _RssPeak() as rss:
            while n < 3 or time.perf_counter() - started < seconds:
                step()
                n += 1
            _sync(device)
            elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() - base if device.startswith("cuda") else rss.growth
    return n / elapsed, peak


def gradients_match(build, shape: tuple[int, ...], mode: str, *, batch: int = 16) -> bool:
    """Clipped gradient of ``mode`` equals ``hooks``' on a fixed batch (CPU; the global RNG is
    reseeded before each, so training-time augmentation draws the same)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((batch, *shape), generator=gen)
    y = (torch.rand(batch, generator=gen) < 0.5).float()
    grads = []
    for m in ("hooks", mode):
        with torch.random.fork_rng():
            torch.manual_seed(2)
            grads.append(clipped_gradient(build(), x, y, mode=m, max_grad_norm=0.1))
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads, strict=True))


# (task, preprocessing, model, batch size): the MLP at the schema's batch size, scatter-linear at the
# DP preset's (presets/chest-xray.toml), the CNN at its preset's (presets/chest-xray-no-dp.toml)
NOISE_CASES = (
    ("breast-cancer", "default", "mlp", 32),
    ("chest-xray", "scatter-28", "scatter-linear", 256),
    ("chest-xray", "default", "cnn", 64),
)


def _noise_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, secure: bool):
    """One DP step closure (fixed batch, sigma 1, the model's default mode) whose noise comes from
    the hospital's SecureRandom (``secure``) or from Opacus' torch generator."""
    mode = getattr(model, "grad_sample_mode", "hooks")
    engine = (
        SecurePrivacyEngine(accountant="rdp", randomness=SecureRandom())
        if secure
        else PrivacyEngine()
    )
    criterion = nn.BCEWithLogitsLoss()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    out = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
        criterion=criterion,
        **({} if secure else {"noise_generator": torch.Generator().manual_seed(0)}),
    )  # fmt: skip
    net, optimizer = out[0], out[1]
    if mode == "ghost":
        criterion = out[2]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        criterion(net(x), y).backward()
        optimizer.step()

    return step


def noise_cost(*, seconds: float, repeats: int) -> None:
    """Print the cryptographic noise's cost per DP step as a ratio to Opacus' torch noise."""
    print("cryptographic noise: DP step with SecureRandom noise / with Opacus' torch noise")
    print(f"{'task':14} {'model':15} {'batch':>5} {'params':>7} {'torch/s':>8} {'secure/s':>9} "
          f"{'ratio':>6}  noise per step")  # fmt: skip
    for task_name, prep, model_name, batch in NOISE_CASES:
        task = TASKS[task_name]
        shape = tuple(task.input_shape(task.resolve_preprocessing(prep)))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((batch, *shape), generator=gen)
        y = (torch.rand(batch, generator=gen) < 0.5).float()
        rates: dict[bool, list[float]] = {False: [], True: []}
        params = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            steps = {}
            for secure in (False, True):
                model = build_model(model_name, input_shape=shape, hidden=32)
                params = sum(p.numel() for p in model.parameters())
                steps[secure] = _noise_step(model, x, y, secure=secure)
                for _ in range(2):
                    steps[secure]()
            for _ in range(repeats):  # interleaved passes, median rate
                for secure in (False, True):
                    n, started = 0, time.perf_counter()
                    while n < 3 or time.perf_counter() - started < seconds / repeats:
                        steps[secure]()
                        n += 1
                    rates[secure].append(n / (time.perf_counter() - started))
        torch_rate, secure_rate = (float(np.median(rates[k])) for k in (False, True))
        randomness = SecureRandom()
        t = time.perf_counter()
        for _ in range(20):
            randomness.standard_normal(params)
        draw = (time.perf_counter() - t) / 20
        print(
            f"{task_name:14} {model_name:15} {batch:>5} {params:>7} {torch_rate:>8.1f} "
            f"{secure_rate:>9.1f} {torch_rate / secure_rate:>6.3f}  {1e3 * draw:.3f} ms"
        )
    for n, q in ((5_000, 256 / 5_000), (50_000, 256 / 50_000)):
        randomness, gen = SecureRandom(), torch.Generator().manual_seed(0)
        t = time.perf_counter()
        for _ in range(100):
            randomness.bernoulli(q, n).nonzero()
        secure_s = (time.perf_counter() - t) / 100
        t = time.perf_counter()
        for _ in range(100):
            (torch.rand(n, generator=gen) < q).nonzero()
        torch_s = (time.perf_counter() - t) / 100
        print(f"Poisson mask of {n} records: SecureRandom {1e3 * secure_s:.3f} ms, torch.rand "
              f"{1e3 * torch_s:.3f} ms per step")  # fmt: skip
    print("ratio = torch-noise steps/s / secure-noise steps/s (1.10 = 10 % slower)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per cell")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved passes (median)")
    parser.add_argument("--device", nargs="*", default=None, help="default: cpu (+ cuda)")
    parser.add_argument("--tasks", nargs="*", default=None, help="default: every task")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    parser.add_argument("--noise-only", action="store_true", help="only the noise-cost table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    print(machine(devices))
    if args.noise_only:
        noise_cost(seconds=args.seconds, repeats=args.repeats)
        return
    print(f"batch size {args.batch_size}; ratios = DP step time / non-private step time\n")
    seen: set[tuple[str, tuple[int, ...]]] = set()
    for device in devices:
        header = (
            f"{'device':6} {'task':14} {'model':8} {'input':14} {'params':>8} "
            f"{'non-DP/s':>9} "
            + " ".join(f"{m + ' x':>12}" for m in GRAD_SAMPLE_MODES)
            + "  peak MiB (non-DP | "
            + " | ".join(GRAD_SAMPLE_MODES)
            + ")  best   default"
        )
        print(header)
        for task_name, task in sorted(TASKS.items()):
            if args.tasks and task_name not in args.tasks:
                continue
            preps = [task.resolve_preprocessing("default"), *task.preprocessing_models]
            for prep, model_name in [(p, m) for p in preps for m in task.models_for(p)]:
                shape = tuple(task.input_shape(prep))

                def build(model_name=model_name, shape=shape):  # noqa: ANN202
                    return build_model(model_name, input_shape=shape, hidden=32)

                default = getattr(build(), "grad_sample_mode", "hooks")
                params = sum(p.numel() for p in build().parameters())
                # modes interleaved, ``--repeats`` times, median rate: load drifts on a shared
                # machine would otherwise bias whichever mode ran at a busy moment
                samples: dict[str | None, list[tuple[float, int]]] = {}
                failed: dict[str, str] = {}
                for _ in range(args.repeats):
                    for mode in (None, *GRAD_SAMPLE_MODES):
                        if mode in failed:
                            continue
                        try:
                            samples.setdefault(mode, []).append(measure(
                                build, shape, mode, device=device, batch=args.batch_size,
                                seconds=args.seconds / args.repeats,
                            ))  # fmt: skip
                        except Exception as exc:  # a mode that does not support a layer
                            failed[str(mode)] = f"{type(exc).__name__}: {exc}"
                rate_of = {m: float(np.median([r for r, _ in v])) for m, v in samples.items()}
                mem_of = {m: max(b for _, b in v) for m, v in samples.items()}
                base_rate, base_mem = rate_of[None], mem_of[None]
                cells, mems, rates = [], [], {}
                for mode in GRAD_SAMPLE_MODES:
                    if mode in failed:
                        cells.append(f"{'n/a':>12}")
                        mems.append("n/a")
                        print(f"  ({model_name} {mode}: {failed[mode]})"[:200])
                        continue
                    match = mode == "hooks" or gradients_match(build, shape, mode)
                    if match:
                        rates[mode] = rate_of[mode]
                    cells.append(f"{base_rate / rate_of[mode]:>10.2f}x{' ' if match else '!'}")
                    mems.append(f"{mem_of[mode] / 2**20:.0f}")
                best = max(rates, key=rates.__getitem__) if rates else "-"
                seen.add((model_name, shape))
                print(
                    f"{device:6} {task_name:14} {model_name:8} {'x'.join(map(str, shape)):14} "
                    f"{params:>8} {base_rate:>9.1f} " + " ".join(cells)
                    + f"  {base_mem / 2**20:.0f} | " + " | ".join(mems)
                    + f"  {best:6} {default}" + ("" if best in (default, "-") else "  <- differs")
                )  # fmt: skip
        print()
    print("x = DP step time / non-private step time (lower is better); '!' = clipped gradient")
    print("differs from hooks (not eligible as best); best = fastest matching mode on that device.")
    print()
    noise_cost(seconds=args.seconds, repeats=args.repeats)


if __name__ == "__main__":
    main()
