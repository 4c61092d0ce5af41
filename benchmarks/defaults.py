"""What the plain ``fedcare simulate`` reaches on tabular tasks, next to a centralised reference.

For each task (breast-cancer, the embedded default; heart-disease, FLamby's four real hospitals;
GBSG2, a consortium's own task file on lifelines' copy of the table, split into three hospitals
as in ``tests/gbsg2.py``) and each privacy setting (no DP, ε = 3, ε = 1; δ = 1e-5), the plain
command runs over ``--seeds`` seeds, each as a fresh process in a copy of the app (so a task
file sits in its ``tasks/``, as a consortium's would). The reference is scikit-learn's
``LogisticRegression`` (L2, C = 1, lbfgs) fit on the pooled training splits of the same
simulated hospitals (the same seed, split and fixed scaling as the run) and scored on the pooled
test splits: what an analyst who could pool the data would get (issue #24, acceptance 2).

Usage::

    python benchmarks/defaults.py [--seeds 0 1 2] [--tasks breast-cancer heart-disease gbsg2]
        [--settings no-dp 3 1] [--run-config "train.lr=1.0 ..."]

Prints the machine, then one row per task: the LR reference, fedcare's mean pooled AUROC (and
its range over seeds) per setting, the mean wall seconds of a run, and where the run settings
came from (the report's "settings" table).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"


def _task_data(task: str, scratch: Path) -> str:
    """The ``--data-dir`` of a task ("" for the embedded breast-cancer data)."""
    if task == "breast-cancer":
        return ""
    if task == "heart-disease":
        folder = DATA / "heart_disease_uci"
        if not folder.is_dir():
            sys.exit(f"{folder} not found: heart-disease needs the shared UCI files")
        return str(folder)
    if task == "gbsg2":
        from tests import gbsg2

        gbsg2.write_hospitals(scratch / "gbsg2-data")
        return str(scratch / "gbsg2-data")
    raise SystemExit(f"unknown task {task!r}")


def lr_reference(app: Path, task: str, data_dir: str, seed: int) -> float:
    """Pooled AUROC of scikit-learn's LogisticRegression on the run's own simulated splits."""
    code = (
        "import json,sys,numpy as np\n"
        "from sklearn.linear_model import LogisticRegression\n"
        "from sklearn.metrics import roc_auc_score\n"
        "from pathlib import Path\n"
        "from server.run_config import RunOptions\n"
        "from simulations.harness import SimulationRequest, build_run_config, preflight\n"
        f"req = SimulationRequest(options=RunOptions(task={task!r}, data_dir={data_dir!r}, "
        f"seed={seed}, dp=False), hospitals=None, out=Path('unused'))\n"
        "cfg, n = build_run_config(req)\n"
        "run, hospitals = preflight(cfg, n, req)\n"
        "x = np.concatenate([s.x_train for s in hospitals]).reshape(sum(s.n_train for s in hospitals), -1)\n"
        "y = np.concatenate([s.y_train for s in hospitals])\n"
        "xt = np.concatenate([s.x_test for s in hospitals]).reshape(sum(s.n_test for s in hospitals), -1)\n"
        "yt = np.concatenate([s.y_test for s in hospitals])\n"
        "m = LogisticRegression(max_iter=5000).fit(x, y)\n"
        "print(json.dumps(roc_auc_score(yt, m.predict_proba(xt)[:, 1])))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(app)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=app, check=False
    )
    if out.returncode != 0:
        sys.exit(f"LR reference for {task} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def run_fedcare(
    app: Path, task: str, data_dir: str, seed: int, setting: str, out: Path, extra: str | None
) -> dict:
    """One plain ``fedcare simulate`` in the app copy; its summary.json."""
    args = [
        sys.executable,
        "-m",
        "simulations.cli",
        "simulate",
        "--task",
        task,
        "--seed",
        str(seed),
    ]
    args += ["--out", str(out), "--backend", "in-process"]
    if data_dir:
        args += ["--data-dir", data_dir]
    args += ["--no-dp"] if setting == "no-dp" else ["--epsilon", setting]
    if extra:
        args += ["--run-config", extra]
    env = {**os.environ, "PYTHONPATH": str(app)}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=app, check=False)
    if proc.returncode != 0:
        sys.exit(
            f"fedcare simulate {' '.join(args[3:])} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=["breast-cancer", "heart-disease", "gbsg2"])
    p.add_argument("--settings", nargs="+", default=["no-dp", "3", "1"])
    p.add_argument("--run-config", default=None, help="extra --run-config for every run")
    args = p.parse_args()
    from machine import machine_line

    print(machine_line("torch", "flwr", "opacus", "sklearn"), flush=True)
    from tests import gbsg2
    from tests.handlers import unpack_app

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        app = unpack_app(scratch / "app")
        (app / "tasks" / "gbsg2.toml").write_text(gbsg2.TASK)
        header = "| task | LR reference | " + " | ".join(
            "fedcare no DP" if s == "no-dp" else f"fedcare ε = {s}" for s in args.settings
        )
        rows = [
            header + " | seconds per run | settings from |",
            "|" + "---|" * (len(args.settings) + 4),
        ]
        for task in args.tasks:
            data_dir = _task_data(task, scratch)
            ref = statistics.mean(lr_reference(app, task, data_dir, s) for s in args.seeds)
            cells, seconds, sources = [], [], set()
            for setting in args.settings:
                aurocs = []
                for seed in args.seeds:
                    out = scratch / f"{task}-{setting}-{seed}"
                    summary = run_fedcare(app, task, data_dir, seed, setting, out, args.run_config)
                    aurocs.append(summary["overall"]["auroc"])
                    seconds.append(summary["wall_seconds"])
                    settings = summary.get("run_settings", {})
                    sources |= {v["source"].split(" (")[0] for v in settings.values()}
                    print(f"  {task} {setting} seed {seed}: AUROC {aurocs[-1]:.3f} "
                          f"({summary['wall_seconds']:.1f} s)", flush=True)  # fmt: skip
                cells.append(f"{statistics.mean(aurocs):.3f} ({min(aurocs):.3f}-{max(aurocs):.3f})")
            rows.append(
                f"| {task} | {ref:.3f} | " + " | ".join(cells)
                + f" | {statistics.mean(seconds):.1f} | {', '.join(sorted(sources))} |"
            )  # fmt: skip
        print("\n".join(rows))


if __name__ == "__main__":
    main()
