"""GPU check for whoever has one: the chest X-ray CNN trained with DP-SGD on CUDA, alone and in
a simulated federation whose hospitals share the GPU.

    python benchmarks/gpu_check.py [--data-dir ../shared/data/pneumoniamnist] [--hospitals 4]
                                   [--gpus-per-hospital 0.25] [--epsilon 3]

1. One hospital's DP round in this process, on the CPU and on CUDA (same data, steps and
   mode): training examples per second on each, and that the weights live on the GPU.
2. ``fedcare simulate --task chest-xray ... --gpus-per-hospital G`` (Flower's Ray backend gives
   each simulated hospital a share G of the GPU, so 1/G hospitals train on it at once): wall
   time, training examples per second over the run (from ``metrics.csv``: each round trains
   one expected epoch per hospital), and the pooled test AUROC.

Exits with code 2 and says so when torch sees no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from client.dp_modes import grad_sample_mode_for  # noqa: E402
from client.training import plan_dp, train_round  # noqa: E402
from shared_models.hospitals import simulated_hospitals  # noqa: E402
from shared_models.models import build_model  # noqa: E402

PRESET = ROOT / "presets" / "chest-xray.toml"


def one_hospital(data_dir: str, device: str, *, epsilon: float) -> float:
    """Training examples per second of one DP round (one expected epoch) on ``device``."""
    hospital = simulated_hospitals(
        "chest-xray", data_dir=data_dir, num_hospitals=3, scheme="iid", alpha=0.5, seed=0,
        preprocessing="default", test_fraction=0.0,
    )[0]  # fmt: skip
    plan = plan_dp(n_train=hospital.n_train, batch_size=256, local_epochs=1.0, rounds=10,
                   target_epsilon=epsilon, target_delta=1e-5, max_grad_norm=1.0)  # fmt: skip
    model = build_model("cnn", input_shape=hospital.x_train.shape[1:])
    mode = grad_sample_mode_for(model)
    train_round(model, hospital.train_set(), steps=1, batch_size=256, lr=2.0, dp=plan,
                device=device, grad_sample_mode=mode)  # warm-up (CUDA context, kernels)  # fmt: skip
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    train_round(model, hospital.train_set(), steps=plan.steps_per_round, batch_size=256, lr=2.0,
                dp=plan, device=device, grad_sample_mode=mode)  # fmt: skip
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        assert all(p.device.type == "cuda" for p in model.parameters()), "model left the GPU"
    return plan.steps_per_round * 256 / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/pneumoniamnist"))
    parser.add_argument("--hospitals", type=int, default=4)
    parser.add_argument("--gpus-per-hospital", type=float, default=0.25)
    parser.add_argument("--epsilon", type=float, default=3.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "no CUDA device visible to torch (CPU build of torch, or no driver): nothing to check"
        )
        sys.exit(2)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"GPU {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")  # fmt: skip
    cpu = one_hospital(args.data_dir, "cpu", epsilon=args.epsilon)
    gpu = one_hospital(args.data_dir, "cuda", epsilon=args.epsilon)
    print(f"one hospital, DP round: CPU {cpu:,.0f} examples/s, CUDA {gpu:,.0f} examples/s "
          f"({gpu / cpu:.1f}x)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable, "-m", "simulations.cli", "simulate", "--task", "chest-xray",
            "--data-dir", args.data_dir, "--hospitals", str(args.hospitals),
            "--gpus-per-hospital", str(args.gpus_per_hospital), "--epsilon", str(args.epsilon),
            "--run-config", str(PRESET), "--out", str(out),
        ]  # fmt: skip
        print("$", " ".join(cmd))
        started = time.monotonic()
        subprocess.run(cmd, check=True, cwd=ROOT)
        wall = time.monotonic() - started
        summary = json.loads((out / "summary.json").read_text())
        rows = pd.read_csv(out / "metrics.csv").dropna(subset=["train_seconds"])
    per_round = rows.groupby("round").agg(
        examples=("n_train", "sum"), slowest=("train_seconds", "max")
    )
    rate = per_round["examples"].sum() / per_round["slowest"].sum()
    print(f"simulation: {args.hospitals} hospitals sharing the GPU ({args.gpus_per_hospital} "
          f"each), {len(per_round)} rounds in {wall:.0f} s wall; training {rate:,.0f} examples/s "
          f"(slowest hospital per round); pooled test AUROC "
          f"{summary['overall']['auroc']:.3f} at ε = {args.epsilon:g}")  # fmt: skip


if __name__ == "__main__":
    main()
