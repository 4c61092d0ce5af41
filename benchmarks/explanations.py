"""How faithful is the DP-released feature importance? Rank agreement with the non-private one.

    FEDCARE_SHARED_DATA=../shared/data nice -n 10 python benchmarks/explanations.py \
        [--tasks heart-disease] [--seeds 5] [--epsilons 1 3]

For every task and seed: one federated run through ``fedcare simulate`` (in this process, the
task's benchmark settings of :data:`benchmarks.report.TASK_BENCHES` -- heart-disease: FLamby's
protocol, logistic regression -- DP-SGD at the default ε = 2); then, on the final model and the
hospitals' test splits as their ClientApps load them:

- non-private pooled importance: mean |attribution| per feature over all hospitals' test
  patients (:func:`shared_models.attributions.importance`), what a data-pooling analyst would
  compute;
- DP release at each ε: every hospital runs the ClientApp's mechanism
  (:func:`client.explanations.release_attributions`, clip ``explain.clip``, noise multiplier
  :func:`client.explanations.noise_for_epsilon` at the run's δ, SecureRandom noise) and the
  coordinator pools (:func:`server.explanations.aggregate_explanations`);
- Spearman's rank correlation (``scipy.stats.spearmanr``) between the two mean |attribution|
  vectors, and the wall-clock seconds of the attributions and the release at the hospitals.

The end-to-end path (the release requested by the ServerApp after the last round) is
``tests/test_explanations.py``; here the same functions run on the saved model, so that one
training serves both ε. Writes ``benchmarks/results/explanations.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _train(task: str, seed: int, folder: Path) -> Path:
    """One federated run of ``task`` (its benchmark settings), in this process; its run folder."""
    from report import TASK_BENCHES, prepare_data  # benchmarks/report.py (this folder)

    from server.run_config import to_toml
    from simulations.cli import app

    bench = TASK_BENCHES[task]
    data = prepare_data(task)
    preset = folder / f"{task}-{seed}.toml"
    preset.write_text(to_toml(bench.overrides))
    out = folder / f"{task}-{seed}"
    args = ["simulate", "--task", task, "--seed", str(seed), "--out", str(out),
            "--backend", "in-process", "--run-config", str(preset)]  # fmt: skip
    if data:
        args += ["--data-dir", data]
    if bench.hospitals:
        args += ["--hospitals", str(bench.hospitals)]
    app(args, standalone_mode=False)
    return out


def _cell(run_dir: Path, epsilons: list[float]) -> dict[str, Any]:
    """Spearman and seconds at each ε for one trained run."""
    import numpy as np
    from scipy.stats import spearmanr

    from client.explanations import noise_for_epsilon, release_attributions
    from server.explanations import aggregate_explanations
    from shared_models.attributions import feature_attributions, importance
    from shared_models.config import RunConfig
    from shared_models.hospitals import simulated_hospitals_for
    from simulations.external_validation import load_model, locate_model

    config = json.loads((run_dir / "summary.json").read_text())
    sidecar = sorted((run_dir / "checkpoints").glob("round-[0-9]*[0-9].json"))
    run = RunConfig.from_run_config(json.loads(sidecar[-1].read_text())["run_config"])
    model = load_model(locate_model(run_dir))
    task_hospitals = simulated_hospitals_for(run, len(config["hospitals"]))
    from shared_models.tasks import get_task

    task = get_task(run.task.name)
    names = list(task.explained_features(run.task.preprocessing))
    started = time.perf_counter()
    per_hospital = [
        feature_attributions(model, s.x_test, axis=task.attribution_axis or 0)
        for s in task_hospitals
    ]
    attribution_seconds = time.perf_counter() - started
    pooled, _ = importance(np.concatenate(per_hospital))
    out: dict[str, Any] = {"attribution_seconds": attribution_seconds, "by_epsilon": {}}
    for eps in epsilons:
        sigma = noise_for_epsilon(eps, delta=run.dp.target_delta)
        started = time.perf_counter()
        releases = []
        for hospital, attr in zip(task_hospitals, per_hospital, strict=True):
            signed, absolute = release_attributions(
                attr, clip=run.explain.clip, noise_multiplier=sigma
            )
            releases.append({"hospital": hospital.name, "n": len(attr), "signed": signed,
                             "absolute": absolute, "noise_multiplier": sigma,
                             "clip": run.explain.clip, "epsilon_release": eps, "epsilon": None})  # fmt: skip
        block = aggregate_explanations(releases, [], names)
        seconds = time.perf_counter() - started
        rho = float(spearmanr(block["mean_abs"], pooled).statistic)
        out["by_epsilon"][str(eps)] = {
            "sigma": sigma, "spearman": rho, "release_seconds": seconds,
            "top3_dp": [names[j] for j in block["ranking"][:3]],
        }  # fmt: skip
    out["top3_pooled"] = [names[j] for j in np.argsort(-pooled)[:3]]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["heart-disease"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "explanations.json"
    )
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            cells = []
            for seed in range(args.seeds):
                started = time.perf_counter()
                run_dir = _train(task, seed, Path(tmp))
                train_seconds = time.perf_counter() - started
                cell = _cell(run_dir, args.epsilons)
                cells.append({"seed": seed, "train_seconds": train_seconds, **cell})
            results[task] = {"cells": cells, "summary": _summary(cells, args.epsilons)}
    from machine import machine_line

    results["machine"] = machine_line("torch", "captum", "opacus", "flwr")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for task in args.tasks:
        print(f"{task}:")
        for eps, s in results[task]["summary"].items():
            print(
                f"  release ε = {eps}: Spearman mean {s['spearman_mean']:.3f} (min "
                f"{s['spearman_min']:.3f}) over {s['seeds']} seeds; attributions + release "
                f"{s['hospital_seconds_mean']:.3f} s per run (all hospitals)"
            )
    print(results["machine"])


def _summary(cells: list[dict[str, Any]], epsilons: list[float]) -> dict[str, Any]:
    out = {}
    for eps in epsilons:
        rhos = [c["by_epsilon"][str(eps)]["spearman"] for c in cells]
        secs = [c["attribution_seconds"] + c["by_epsilon"][str(eps)]["release_seconds"] for c in cells]  # fmt: skip
        out[str(eps)] = {
            "seeds": len(cells), "spearman_mean": statistics.fmean(rhos),
            "spearman_min": min(rhos), "hospital_seconds_mean": statistics.fmean(secs),
            "train_seconds_mean": statistics.fmean(c["train_seconds"] for c in cells),
        }  # fmt: skip
    return out


if __name__ == "__main__":
    main()
