"""Which model should icu-mortality use by default? Test AUROC/AUPRC and time, with and without DP.

For each model of the task (``Task.models``), trains on the four ICU-type hospitals of the
PhysioNet 2012 set A (the task's natural split, per-unit stratified test splits) with
FedAvg -- in this process: each round every unit runs ``client.training.train_round`` from the
global weights with its own DP plan (``plan_for_run``: noise calibrated once for the whole run,
Poisson sampling, the Opacus accountant over every step), exactly as the ClientApp does, and the
weights are averaged by ``num-examples`` as Flower's FedAvg does -- once without DP and once with
sample-level DP at ``--epsilon`` (δ = 1e-5) per unit. It prints, on the pooled test splits of all
units, AUROC, AUPRC, sensitivity/specificity at 0.5 and at the threshold reaching sensitivity
0.8, the largest ε spent, wall seconds and milliseconds per optimizer step (DP step time over
non-private step time is the DP overhead). ``fedcare simulate`` runs the same training through
Flower's Simulation Engine; this script only compares models in one process.

The run settings are the task's recommended ones (``Task.run_defaults``) unless overridden.

Usage: python benchmarks/icu_models.py [--data-dir ../shared/data/physionet2012]
       [--models icu-logreg,icu-tcn,icu-gru] [--rounds R] [--epsilon 3] [--seed 0]
       [--set train.lr=0.1 --set model.hidden=64 ...] [--no-private] [--private-only]
       [--step-times-only]
Compare models as ratios within one run: absolute seconds depend on the machine (printed first)
and on what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.training import plan_for_run, steps_per_round, train_round  # noqa: E402
from server.run_config import RunOptions  # noqa: E402
from shared_models.config import RunConfig  # noqa: E402
from shared_models.hospitals import simulated_hospitals_for  # noqa: E402
from shared_models.metrics import evaluation_metrics  # noqa: E402
from shared_models.models import model_for_run, predict_proba  # noqa: E402
from shared_models.tasks import get_task  # noqa: E402

TASK = "icu-mortality"


def _parse_value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text.strip("'\""))


def run_config(args: argparse.Namespace, model: str, *, dp: bool) -> RunConfig:
    """The task's run settings with this model and the command line's overrides."""
    cfg = RunOptions(
        task=TASK, data_dir=str(args.data_dir), rounds=args.rounds, epsilon=args.epsilon if dp else None,
        dp=dp, seed=args.seed,
    ).build()  # fmt: skip
    cfg["data.partition"] = "natural"
    cfg["model.name"] = model
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            raise SystemExit(f"--set {item}: unknown run-config key {key!r}")
        cfg[key] = _parse_value(value)
    return RunConfig.from_run_config(cfg)


def federate(run: RunConfig) -> dict[str, float | None]:
    """FedAvg over the natural hospitals (as Flower's FedAvg, in process); pooled test metrics."""
    hospitals = simulated_hospitals_for(run, 4)
    model, _ = model_for_run(run)
    plans = {
        s.name: plan_for_run(run, n_train=s.n_train) if run.dp.enabled else None for s in hospitals
    }
    states: dict[str, dict | None] = {s.name: None for s in hospitals}
    eps: dict[str, float] = {}
    steps_taken = 0
    t0 = time.perf_counter()
    for rnd in range(1, run.train.rounds + 1):
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        updates, weights = [], []
        for s in hospitals:
            model.load_state_dict(global_state)
            steps = steps_per_round(s.n_train, run.train.batch_size, run.train.local_epochs)
            result = train_round(
                model, s.train_set(), steps=steps, batch_size=run.train.batch_size,
                lr=run.train.lr, momentum=run.train.momentum, dp=plans[s.name],
                accountant_state=states[s.name],
                seed=(run.train.seed * 1_000_003 + zlib.crc32(s.name.encode()) * 101 + rnd) % 2**31,
            )  # fmt: skip
            steps_taken += steps
            states[s.name] = result.accountant_state
            if result.epsilon is not None:
                eps[s.name] = result.epsilon
            updates.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(float(s.n_train))
        total = sum(weights)
        model.load_state_dict(
            {
                k: sum(w / total * u[k] for w, u in zip(weights, updates, strict=True))
                for k in updates[0]
            }
        )
    seconds = time.perf_counter() - t0
    x_test = np.concatenate([s.x_test for s in hospitals])
    y_test = np.concatenate([s.y_test for s in hospitals])
    metrics, _ = evaluation_metrics(y_test, predict_proba(model, x_test))
    return {
        **metrics,
        "max_epsilon": max(eps.values()) if eps else None,
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / steps_taken,
    }


def step_times(
    args: argparse.Namespace, models: list[str], *, steps: int = 10, repeats: int = 3
) -> dict[str, tuple[float, float]]:
    """Milliseconds per optimizer step (non-private, DP) of each model on the largest unit
    (``micu``) with the task's batch size, measured back to back (best of ``repeats``, models
    interleaved) so that the machine's load affects every model alike."""
    best: dict[str, list[float]] = {m: [float("inf"), float("inf")] for m in models}
    for _ in range(repeats):
        for model_name in models:
            for i, dp in enumerate((False, True)):
                run = run_config(args, model_name, dp=dp)
                hospital = max(simulated_hospitals_for(run, 4), key=lambda s: s.n_train)
                model, _ = model_for_run(run)
                plan = plan_for_run(run, n_train=hospital.n_train) if dp else None
                t0 = time.perf_counter()
                train_round(
                    model, hospital.train_set(), steps=steps, batch_size=run.train.batch_size,
                    lr=run.train.lr, dp=plan,
                )  # fmt: skip
                ms = 1000 * (time.perf_counter() - t0) / steps
                best[model_name][i] = min(best[model_name][i], ms)
    return {m: (v[0], v[1]) for m, v in best.items()}


def gru_step_times(
    shape: tuple[int, ...], *, batch: int = 64, hidden: int = 32, steps: int = 10, repeats: int = 3
) -> dict[str, float]:
    """Non-private forward + backward time (ms, best of ``repeats``, interleaved) of torch's fused
    ``nn.GRU`` and of Opacus' ``DPGRU`` (what ``ModuleValidator.fix`` substitutes for it; a Python
    loop over time steps) in the same classifier, on random inputs of the task's shape."""
    from torch import nn

    from shared_models.sequence_models import GRUClassifier

    x = torch.randn(batch, *shape)
    y = (torch.rand(batch) < 0.14).float()
    models = {"nn.GRU": GRUClassifier(shape, hidden), "DPGRU": GRUClassifier(shape, hidden)}
    models["nn.GRU"].rnn = nn.GRU(3 * shape[1], hidden, batch_first=True)
    loss_fn = nn.BCEWithLogitsLoss()
    best = dict.fromkeys(models, float("inf"))
    for _ in range(repeats):
        for label, model in models.items():
            loss_fn(model(x), y).backward()  # warm-up
            t0 = time.perf_counter()
            for _ in range(steps):
                model.zero_grad()
                loss_fn(model(x), y).backward()
            best[label] = min(best[label], 1000 * (time.perf_counter() - t0) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("FEDCARE_SHARED_DATA", ROOT.parent / "shared" / "data"))
        / "physionet2012",
    )
    parser.add_argument("--models", default=",".join(get_task(TASK).models))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="run-config key=value")
    parser.add_argument("--no-private", action="store_true", help="only the non-private runs")
    parser.add_argument("--private-only", action="store_true", help="only the DP runs")
    parser.add_argument(
        "--step-times-only", action="store_true", help="only the back-to-back step times"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: as a simulated hospital, a Ray actor with 1 CPU)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch "
        f"{metadata.version('torch')} ({torch.get_num_threads()} threads), opacus "
        f"{metadata.version('opacus')}; load average {os.getloadavg()[0]:.1f} at start"
    )
    settings = [("non-private", False), (f"DP ε={args.epsilon:g}", True)]
    if args.no_private:
        settings = settings[:1]
    if args.private_only:
        settings = settings[1:]
    header = (f"{'model':<12} {'setting':<12} {'AUROC':>6} {'AUPRC':>6} {'sens':>5} {'spec':>5} "
              f"{'sens80':>6} {'spec80':>6} {'max ε':>6} {'s':>7} {'ms/step':>8}")  # fmt: skip
    models = args.models.split(",")
    if not args.step_times_only:
        print(header)
    for model in [] if args.step_times_only else models:
        for label, dp in settings:
            run = run_config(args, model, dp=dp)
            m = federate(run)
            f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
            print(
                f"{model:<12} {label:<12} {f(m['auroc']):>6} {f(m['auprc']):>6} "
                f"{f(m['sensitivity'], 2):>5} {f(m['specificity'], 2):>5} "
                f"{f(m['sensitivity@sens0.8'], 2):>6} {f(m['specificity@sens0.8'], 2):>6} "
                f"{f(m['max_epsilon'], 2):>6} {m['seconds']:>7.1f} {m['ms_per_step']:>8.1f}",
                flush=True,
            )
    print(f"run settings: {args.rounds or 'task default'} rounds, overrides {args.set or 'none'}")
    print("step time on the largest unit, back to back (best of 3 x 10 steps):")
    for model, (plain, private) in step_times(args, models).items():
        print(
            f"  {model:<12} non-private {plain:7.1f} ms  DP {private:7.1f} ms  "
            f"({private / plain:.1f}x)"
        )
    shape = get_task(TASK).input_shape("hourly")
    gru = gru_step_times(shape)
    print(
        f"GRU step (non-private, batch 64, forward + backward): torch nn.GRU {gru['nn.GRU']:.1f} ms, "
        f"Opacus DPGRU {gru['DPGRU']:.1f} ms ({gru['DPGRU'] / gru['nn.GRU']:.1f}x); nn.GRU "
        "cannot be trained with DP-SGD (no per-sample gradients)"
    )


if __name__ == "__main__":
    main()
