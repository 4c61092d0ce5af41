"""The benchmark report: pooled, local and federated (FedAvg, FedProx, FedYogi) models on the
tasks, without DP and at ε in {8, 3, 1}, over several seeds, next to published references.

    FEDCARE_SHARED_DATA=../shared/data nice -n 10 python benchmarks/report.py \
        [--tasks breast-cancer heart-disease gbsg2] [--seeds 5] [--budget-minutes 55]

writes ``benchmarks/RESULTS.md`` and one plot per task (``benchmarks/results/<task>.png``).

What runs
---------
Federated cells (``fedavg``, ``fedprox``, ``fedyogi``) go through the project's own harness and
engine: :func:`simulations.harness.build_run_config` and :func:`~simulations.harness.preflight`,
then :func:`simulations.engine.run_federation` -- Flower's Simulation Engine on Ray, with
Opacus DP-SGD at every simulated hospital. One local Ray instance is started per worker and
every federation of that worker joins it (``ray_address``, as ``fedcare simulate
--ray-address`` does), so Ray's start-up is paid once per worker, not per cell. The final
global model (``model.safetensors``) is evaluated here, exactly, on every hospital's test split.

``pooled`` (one model on all hospitals' training splits) and ``local`` (one model per hospital)
train with the training loop of the hospitals (:func:`client.training.train_round`), with the
same model, rounds × local epochs, batch size and learning rate as the federated runs; without
DP exactly as :mod:`simulations.baselines` does (batch-gradient clipping at ``dp.max-grad-norm``);
with DP as one DP-SGD run calibrated for all those steps (:func:`client.training.plan_for_run`).
ε is always the Opacus accountant's over the steps taken (the largest over the hospitals).

Protocols
---------
``heart-disease`` follows FLamby's Fed-Heart-Disease (du Terrail et al., NeurIPS 2022;
``flamby/datasets/fed_heart_disease``): the four real hospitals, its preprocessing (the task's
``flamby`` preprocessing), a per-centre stratified 66/34 train/test split with FLamby's fixed
seed 43 (run config ``data.split = "stratified"`` and ``data.split-seed``; the training seed
varies; fedcare's own split is per record, see :func:`shared_models.tasks.prepare_hospital`), a
logistic regression, the
metric = the mean over the 4 centres' test accuracies of ONE model (:func:`flamby_metric`), and
the local baseline = a model trained at one centre and evaluated on all four (``Local k``).
Other tasks use the project's definitions (metric: AUROC on the pooled test splits; local: each
hospital's own model on its own test split, as :mod:`simulations.baselines`).

Cache
-----
One JSON per cell in ``benchmarks/.cache/`` (git-ignored), named by :func:`cell_key`: the task,
method, ε, seed and a hash of the cell's complete run config and of the benchmark protocol.
A re-run computes only the cells whose key is not there. ``--budget-minutes`` stops starting new
cells when spent; the cells run seed by seed (every task's and method's seed 0 first), and
RESULTS.md says how many seeds each cell has.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
RUNS_LOG = CACHE / "runs.jsonl"  # one line per computing run of this script
PLOTS = ROOT / "benchmarks" / "results"
PROTOCOL_VERSION = 1  # bump when the evaluation below changes: every cell is recomputed

METHODS = ("pooled", "local", "fedavg", "fedprox", "fedyogi", "fedavg+finetune", "fedavg+ditto")
FEDERATED = ("fedavg", "fedprox", "fedyogi")
# personalised FL on FedAvg (run config personal.method): the metric is each hospital's personal
# model on its own test split (client.personal; the personal models never leave the hospitals)
PERSONAL = {"fedavg+finetune": "finetune", "fedavg+ditto": "ditto"}
EPSILONS: tuple[float | None, ...] = (None, 8.0, 3.0, 1.0)  # None: no DP
VOLATILE_KEYS = ("run.id", "output.dir")


def shared_data_root() -> Path:
    """The real datasets' folder: ``$FEDCARE_SHARED_DATA``, else ``<repo>/../shared/data``."""
    return Path(os.environ.get("FEDCARE_SHARED_DATA") or ROOT.parent / "shared" / "data")


@dataclass(frozen=True)
class Reference:
    """A published number to show next to ours."""

    method: str  # one of METHODS (or "local k")
    epsilon: float | None
    value: float
    source: str


@dataclass(frozen=True)
class TaskBench:
    """How one task is benchmarked.

    Attributes
    ----------
    name : str
        Task name (``fedcare simulate --task``).
    data : str
        Folder under the shared data root ("" = data embedded in a dependency, or built by
        :func:`prepare_data`).
    hospitals : int or None
        Simulated hospitals (None: the data's real hospitals).
    overrides : dict
        Run config keys set for every cell of this task.
    protocol : str
        ``"flamby"`` (metric = mean of per-centre test accuracies; local = Local k on all
        centres) or ``"project"`` (metric = pooled-test AUROC; local = own test split).
    references : tuple of Reference
        Published values of the headline metric (none are listed where none was found for
        this protocol).
    local_references : dict
        Published ``Local k`` values by training centre (FLamby).
    """

    name: str
    data: str
    hospitals: int | None
    overrides: dict[str, Any] = field(default_factory=dict)
    protocol: str = "project"
    references: tuple[Reference, ...] = ()
    local_references: dict[str, float] = field(default_factory=dict)  # Local k, by centre
    tabular: bool = True

    @property
    def metric_name(self) -> str:
        """The headline metric's name in the tables."""
        return (
            "mean of the 4 centres' test accuracies (FLamby)"
            if self.protocol == "flamby"
            else "AUROC, pooled test splits"
        )


FLAMBY = "FLamby (du Terrail et al. 2022), results/results_benchmark_fed_heart_disease, 5 seeds"
FLAMBY_DP = "FLamby dp_example/results_fed_heart_disease.csv (FedAvg with DP, 5 seeds)"
TASK_BENCHES: dict[str, TaskBench] = {
    "breast-cancer": TaskBench("breast-cancer", data="", hospitals=3),
    "heart-disease": TaskBench(
        "heart-disease",
        data="heart_disease_uci",
        hospitals=None,
        overrides={
            "model.name": "logreg",
            "data.split-seed": 43,
            "data.split": "stratified",
            "task.preprocessing": "flamby",
        },
        protocol="flamby",
        references=(
            Reference("pooled", None, 0.735, FLAMBY),
            Reference("local", None, 0.639, FLAMBY + " (mean of Local 0-3)"),
            Reference("fedavg", None, 0.685, FLAMBY),
            Reference("fedprox", None, 0.685, FLAMBY),
            Reference("fedyogi", None, 0.731, FLAMBY),
            Reference("fedavg", 1.0, 0.685, FLAMBY_DP + ", δ = 1e-4"),
            Reference("fedavg", 1.0, 0.702, FLAMBY_DP + ", δ = 1e-3"),
        ),
        local_references={
            "cleveland": 0.722,
            "hungarian": 0.629,
            "switzerland": 0.567,
            "va": 0.637,
        },
    ),
    "gbsg2": TaskBench("gbsg2", data="", hospitals=None),
    "icu-mortality": TaskBench(
        "icu-mortality", data="physionet2012", hospitals=None, tabular=False
    ),
    "chest-xray": TaskBench("chest-xray", data="pneumoniamnist", hospitals=3, tabular=False),
}
TABULAR = tuple(n for n, b in TASK_BENCHES.items() if b.tabular)


# ----------------------------------------------------------------------------------------------
# pure logic: cache keys, the FLamby metric, aggregation
# ----------------------------------------------------------------------------------------------
def cell_key(task: str, method: str, epsilon: float | None, seed: int, config: dict) -> str:
    """File name of one cell's cached result.

    Parameters
    ----------
    task, method : str
        Task name and one of :data:`METHODS`.
    epsilon : float or None
        Target ε of the cell (None: no DP).
    seed : int
        Training seed (``train.seed``).
    config : dict
        The cell's complete flat run config; :data:`VOLATILE_KEYS` (a fresh run id, the output
        folder) are left out, ``data.dir`` counts by its folder name only.

    Returns
    -------
    str
        ``<task>__<method>__<eps|nodp>__s<seed>__<12 hex digits>.json``; the digits are the
        SHA-256 of the config and :data:`PROTOCOL_VERSION`, so any change recomputes the cell.
    """
    stable = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    if stable.get("data.dir"):
        stable["data.dir"] = Path(stable["data.dir"]).name
    blob = json.dumps(
        {"protocol": PROTOCOL_VERSION, "method": method, "config": stable},
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    eps = "nodp" if epsilon is None else f"eps{epsilon:g}"
    return f"{task}__{method}__{eps}__s{seed}__{digest}.json"


def flamby_metric(y_true_by_centre: list, scores_by_centre: list) -> tuple[float, list[float]]:
    """FLamby's Fed-Heart-Disease metric: the unweighted mean over centres of the accuracy of
    one model on each centre's test split.

    Parameters
    ----------
    y_true_by_centre : list of np.ndarray
        Per centre, ``[N_c]`` labels in {0, 1}.
    scores_by_centre : list of np.ndarray
        Per centre, ``[N_c]`` predicted probabilities of class 1 (same order).

    Returns
    -------
    (float, list of float)
        The mean, and the per-centre accuracies (``((score > 0.5) == y).mean()``, as
        ``flamby/datasets/fed_heart_disease/metric.py``; averaged as ``flamby.utils``'
        ``evaluate_model_on_tests`` results are in the FLamby paper's tables).

    Raises
    ------
    ValueError
        No centre, or a centre with an empty test split or mismatched lengths.
    """
    import numpy as np

    if not y_true_by_centre or len(y_true_by_centre) != len(scores_by_centre):
        raise ValueError("flamby_metric needs one label and one score array per centre")
    accs = []
    for i, (y, s) in enumerate(zip(y_true_by_centre, scores_by_centre, strict=True)):
        y, s = np.asarray(y).astype(np.uint8), np.asarray(s, dtype=float)
        if y.shape[0] == 0 or y.shape != s.shape:
            raise ValueError(f"centre {i}: {y.shape[0]} labels and {s.shape[0]} scores")
        accs.append(float(((s > 0.5) == y).mean()))
    return float(np.mean(accs)), accs


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


# ----------------------------------------------------------------------------------------------
# cells
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One (task, method, ε, seed) with its run config and cache file name."""

    task: str
    method: str
    epsilon: float | None
    seed: int
    config: dict[str, Any]
    key: str


def base_config(bench: TaskBench, data_dir: str, *, method: str, epsilon: float | None, seed: int):
    """The complete run config of one cell (``fedcare simulate``'s, plus the task's overrides).

    Raises
    ------
    server.run_config.UsageError
        An override key the schema does not declare.
    """
    from server.run_config import RunOptions, UsageError

    opts = RunOptions(
        task=bench.name,
        data_dir=data_dir,
        strategy=method if method in FEDERATED else "fedavg" if method in PERSONAL else None,
        epsilon=epsilon,
        dp=epsilon is not None,
        seed=seed,
    )
    cfg = opts.build()
    unknown = sorted(set(bench.overrides) - set(cfg))
    if unknown:
        raise UsageError(f"task bench {bench.name}: unknown run config key(s) {unknown}")
    cfg.update(bench.overrides)
    cfg["eval.centralized"] = False  # the final model is evaluated here, exactly
    if method in PERSONAL:
        cfg["personal.method"] = PERSONAL[method]
    return cfg


def plan_cells(
    tasks: list[str],
    seeds: int,
    data_dirs: dict[str, str],
    methods: tuple[str, ...] = METHODS,
    epsilons: tuple[float | None, ...] = EPSILONS,
) -> list[Cell]:
    """Every cell of ``methods`` x ``epsilons``, seed-major (seed 0 of every task and method
    first)."""
    cells = []
    for seed in range(seeds):
        for task in tasks:
            bench = TASK_BENCHES[task]
            for method in methods:
                for eps in epsilons:
                    cfg = base_config(bench, data_dirs[task], method=method, epsilon=eps, seed=seed)
                    key = cell_key(task, method, eps, seed, cfg)
                    cells.append(Cell(task, method, eps, seed, cfg, key))
    return cells


def prepare_data(task: str) -> str:
    """The data folder of ``task`` (created for gbsg2: the three hospital CSVs of the task-file
    tests, from the lifelines wheel), or "" for embedded data.

    Raises
    ------
    FileNotFoundError
        The shared data folder is absent (set FEDCARE_SHARED_DATA).
    """
    bench = TASK_BENCHES[task]
    if task == "gbsg2":
        folder = CACHE / "gbsg2-data"
        if not folder.exists():
            sys.path.insert(0, str(ROOT))
            from tests import gbsg2

            gbsg2.write_hospitals(folder)
        return str(folder)
    if not bench.data:
        return ""
    folder = shared_data_root() / bench.data
    if not folder.exists():
        raise FileNotFoundError(f"{folder} not found; set FEDCARE_SHARED_DATA to shared/data")
    return str(folder)


def app_dir_for(task: str) -> Path:
    """The app folder a worker runs in: this checkout, or for gbsg2 (a consortium's task file,
    not built in) a copy of the app's bundle with ``tasks/gbsg2.toml`` added, as the task-file
    tests do, so that every Ray worker finds the task."""
    if task != "gbsg2":
        return ROOT
    sys.path.insert(0, str(ROOT))
    from client.approval import fab_bytes
    from tests import gbsg2
    from tests.handlers import unpack_app

    # named by the bundle's hash: a copy in use by a running worker is never rewritten
    digest = hashlib.sha256(fab_bytes(ROOT) + gbsg2.TASK.encode()).hexdigest()[:12]
    app = CACHE / f"app-gbsg2-{digest}"
    if not app.exists():
        tmp = Path(tempfile.mkdtemp(prefix="app-gbsg2-", dir=CACHE))
        unpack_app(tmp)
        (tmp / "tasks" / "gbsg2.toml").write_text(gbsg2.TASK)
        tmp.rename(app)
    return app


# ----------------------------------------------------------------------------------------------
# the worker: computes cells of ONE task (it runs inside that task's app folder)
# ----------------------------------------------------------------------------------------------
def _evaluate(model, hospitals) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Exact metrics of one model on every hospital's test split."""
    from shared_models.models import predict_proba

    return _metrics(hospitals, [predict_proba(model, s.x_test) for s in hospitals])


def _metrics(hospitals, scores: list) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """FLamby's metric and the pooled AUROC / accuracy of per-hospital scores on the hospitals' test
    splits (``scores[k]``: ``[n_test_k]`` probabilities for hospital ``k``)."""
    import numpy as np

    from shared_models.metrics import binary_metrics

    ys = [s.y_test for s in hospitals]
    flamby, accs = flamby_metric(ys, scores)
    pooled = binary_metrics(np.concatenate(ys), np.concatenate(scores))
    return {
        "mean_client_accuracy": flamby,
        "client_accuracy": dict(zip([s.name for s in hospitals], accs, strict=True)),
        "client_auroc": {
            s.name: binary_metrics(s.y_test, p).auroc
            for s, p in zip(hospitals, scores, strict=True)
        },
        "auroc": pooled.auroc,
        "accuracy": pooled.accuracy,
    }


def train_batch_clipped(
    model: torch.nn.Module,  # noqa: F821  (torch is imported when training)
    data: torch.utils.data.Dataset,  # noqa: F821
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float,
    seed: int,
    clip_norm: float,
) -> None:
    """Non-private training of ``model`` in place, with each batch's gradient clipped to L2 norm
    ``clip_norm`` (``torch.nn.utils.clip_grad_norm_``), so that a learning rate tuned for
    clipped DP gradients does not diverge without DP (the report's pooled and local cells,
    which are cached: the batch order and steps are those of
    :func:`client.training.train_round` without DP and ``seed``)."""
    import torch

    from shared_models.image_models import seed_augmentation

    model.train()
    seed_augmentation(model, seed)
    sampler = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, generator=sampler
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    criterion = torch.nn.BCEWithLogitsLoss()
    batches = iter(())
    for _ in range(steps):
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(loader)
            xb, yb = next(batches)
        optimizer.zero_grad(set_to_none=True)
        criterion(model(xb), yb).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()


def _train_central(run, data, epsilon: float | None):  # type: ignore[no-untyped-def]
    """One model trained on ``data`` for the run's rounds × local epochs; DP-SGD when
    ``epsilon``. Returns ``(model, ε spent or None)``."""
    from client.training import plan_for_run, steps_per_round, train_round
    from shared_models.models import model_for_run

    model, _ = model_for_run(run)
    n = len(data)
    if epsilon is None:
        epochs = run.train.rounds * run.train.local_epochs
        train_batch_clipped(
            model,
            data,
            steps=steps_per_round(n, run.train.batch_size, epochs),
            batch_size=run.train.batch_size,
            lr=run.train.lr,
            momentum=run.train.momentum,
            seed=run.train.seed,
            clip_norm=run.dp.max_grad_norm,
        )  # fmt: skip  (batch clipping: these cells are cached)
        return model, None
    plan = plan_for_run(run, n_train=n)
    result = train_round(
        model, data, steps=plan.total_steps, batch_size=run.train.batch_size, lr=run.train.lr,
        momentum=run.train.momentum, dp=plan, seed=run.train.seed,
    )  # fmt: skip
    return model, result.epsilon


def _central_cell(cell: Cell, bench: TaskBench) -> dict[str, Any]:
    """A pooled or local cell, in this process."""
    import numpy as np

    from server.run_config import RunOptions
    from shared_models.models import predict_proba
    from simulations.baselines import pooled_train_set
    from simulations.harness import SimulationRequest, preflight

    cfg = dict(cell.config)
    req = SimulationRequest(
        options=RunOptions(task=cell.task), hospitals=bench.hospitals, out=Path(".")
    )
    run, hospitals = preflight(cfg, bench.hospitals or 3, req)  # the same hospitals as federated
    if cell.method == "pooled":
        model, eps = _train_central(run, pooled_train_set(hospitals), cell.epsilon)
        return {**_evaluate(model, hospitals), "epsilon": eps}
    per_hospital, eps_all = {}, []
    own_scores = []
    for s in hospitals:
        model, eps = _train_central(run, s.train_set(), cell.epsilon)
        eps_all.append(eps)
        if bench.protocol == "flamby":  # Local k: trained at k, evaluated on every centre
            per_hospital[s.name] = _evaluate(model, hospitals)
        else:
            own_scores.append(predict_proba(model, s.x_test))
    epsilon = max(eps_all) if cell.epsilon is not None else None
    if bench.protocol == "flamby":
        return {
            "mean_client_accuracy": float(
                np.mean([r["mean_client_accuracy"] for r in per_hospital.values()])
            ),
            "auroc": float(np.mean([r["auroc"] for r in per_hospital.values()])),
            "local": per_hospital,
            "epsilon": epsilon,
        }
    return {**_metrics(hospitals, own_scores), "epsilon": epsilon}


def _task(name: str):  # type: ignore[no-untyped-def]
    from shared_models.tasks import get_task

    return get_task(name)


def _federated_cell(cell: Cell, bench: TaskBench, ray_address: str) -> dict[str, Any]:
    """A federated cell: the harness's checks, Flower's Simulation Engine, then the final global
    model evaluated exactly on every hospital's test split."""
    from server.checkpoint import load_weights
    from server.run_config import RunOptions
    from shared_models.models import model_for_run
    from simulations.engine import run_federation
    from simulations.harness import SimulationRequest, preflight

    with tempfile.TemporaryDirectory(prefix="fedcare-bench-") as tmp:
        out = Path(tmp) / "run"
        cfg = dict(cell.config)
        cfg["output.dir"] = str(out)
        if cell.method in PERSONAL:  # each hospital's state folder, where its personal model is
            cfg["simulation.ledger-dir"] = str(Path(tmp) / "hospitals")
        req = SimulationRequest(
            options=RunOptions(task=cell.task), hospitals=bench.hospitals, out=out
        )
        run, hospitals = preflight(cfg, bench.hospitals or 3, req)
        # one ClientApp actor per worker (all the Ray instance's CPUs): a handful of small
        # hospitals take milliseconds each, and every actor costs a Python + torch start
        run_federation(
            run_config=cfg, num_supernodes=len(hospitals), ray_address=ray_address,
            num_cpus_per_client=float(os.cpu_count() or 1),
        )  # fmt: skip
        summary = json.loads((out / "summary.json").read_text())
        model, _ = model_for_run(run)
        model.load_state_dict(load_weights(out / "model.safetensors"))
        metrics = _evaluate(model, hospitals)
        if cell.method in PERSONAL:  # each hospital's personal model on its own test split
            from shared_models.models import predict_proba

            scores = []
            for hospital in hospitals:
                own, _ = model_for_run(run)
                own.load_state_dict(
                    load_weights(
                        Path(tmp) / "hospitals" / hospital.name / "personal"
                        / f"{cfg['run.id']}.safetensors"
                    )
                )  # fmt: skip
                scores.append(predict_proba(own, hospital.x_test))
            metrics = {**_metrics(hospitals, scores), "global": metrics}
    eps = [h["epsilon"] for h in summary["hospitals"] if h["epsilon"] is not None]
    trained = [h["rounds_trained"] for h in summary["hospitals"]]
    return {
        **metrics,
        "epsilon": max(eps) if eps else None,
        "rounds_trained": trained,
        "failures": len(summary["failures"]),
    }


def _start_ray() -> tuple[subprocess.Popen, str]:
    """A local Ray instance held by a child process; returns (process, GCS address)."""
    holder = (
        "import signal, sys, time\n"
        "from shared_models.runtime import apply_offline_env\n"
        "apply_offline_env()\n"
        "import ray\n"
        "ray.init(include_dashboard=False, _node_ip_address='127.0.0.1', logging_level='ERROR',"
        " log_to_driver=False)\n"
        "print(ray.get_runtime_context().gcs_address, flush=True)\n"
        "signal.signal(signal.SIGTERM, lambda *a: (ray.shutdown(), sys.exit(0)))\n"
        "while True: time.sleep(1)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    if not address:
        proc.kill()
        raise RuntimeError("the local Ray instance did not start")
    return proc, address


def run_worker(cells_file: Path) -> None:
    """Compute the cells listed in ``cells_file`` (one task) until its deadline; write each
    result to the cache as soon as it exists."""
    import logging

    from shared_models.runtime import apply_offline_env

    apply_offline_env()
    spec = json.loads(cells_file.read_text())
    deadline = float(spec["deadline"])
    cells = [Cell(**c) for c in spec["cells"]]
    logging.getLogger("flwr").setLevel(logging.WARNING)
    ray_proc: subprocess.Popen | None = None
    address = ""
    try:
        for cell in cells:
            if time.time() > deadline:
                print(f"  budget spent: {cell.key} not run", flush=True)
                continue
            bench = TASK_BENCHES[cell.task]
            t0 = time.monotonic()
            if cell.method in FEDERATED or cell.method in PERSONAL:
                if ray_proc is None:
                    ray_proc, address = _start_ray()
                result = _federated_cell(cell, bench, address)
            else:
                result = _central_cell(cell, bench)
            result["seconds"] = round(time.monotonic() - t0, 2)
            result.update(task=cell.task, method=cell.method, target_epsilon=cell.epsilon,
                          seed=cell.seed)  # fmt: skip
            (CACHE / cell.key).write_text(json.dumps(result, indent=1))
            eps = "" if result["epsilon"] is None else f", ε spent {result['epsilon']:.2f}"
            print(
                f"  {cell.task} {cell.method} eps={cell.epsilon} seed={cell.seed}: "
                f"acc(mean over hospitals) {result['mean_client_accuracy']:.3f}, "
                f"AUROC {result['auroc'] if result['auroc'] is None else round(result['auroc'], 3)}"
                f"{eps} ({result['seconds']:.1f} s)",
                flush=True,
            )
    finally:
        if ray_proc is not None:
            ray_proc.terminate()
            ray_proc.wait(timeout=60)


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
def machine_lines() -> list[str]:
    """Where and when this ran: CPU, RAM, load, versions, commit."""
    import flwr
    import opacus
    import psutil
    import torch
    from machine import cpu_model, load_average

    cpu = cpu_model()
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    load = load_average()
    return [
        f"- machine: {platform.node()}, {os.cpu_count()} CPUs ({cpu}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; load average at the end {load} "
        "(a shared machine: wall times are inflated by other work)",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"flwr {flwr.__version__ if hasattr(flwr, '__version__') else '?'}, "
        f"opacus {opacus.__version__}",
        f"- commit: {commit}",
    ]


def _compute_lines(results: dict) -> list[str]:
    """What computing these cells cost: the runs that computed cells, and the cells' own wall
    times summed (cells of side-by-side workers overlap, so the sum exceeds the elapsed time)."""
    total = sum(r.get("seconds", 0.0) for rs in results.values() for r in rs)
    lines = [f"- the cells' own wall times, summed: {total / 60:.1f} min"]
    if RUNS_LOG.exists():
        for line in RUNS_LOG.read_text().splitlines():
            run = json.loads(line)
            load = ", ".join(map(str, run["load"])) if run.get("load") else "not recorded"
            note = f" ({run['note']})" if run.get("note") else ""
            lines.append(
                f"- computing run ended {run['ended']}: {run['minutes']} min wall, "
                f"{run['computed']} cells computed, load average at its end {load}; "
                f"`{run['command']}`{note}"
            )
    return lines


def _fmt(values: list[float]) -> str:
    if not values:
        return "not run"
    mean, sd = mean_sd(values)
    return f"{mean:.3f} ± {sd:.3f} (n={len(values)})" if len(values) > 1 else f"{mean:.3f} (n=1)"


def _headline(bench: TaskBench, result: dict[str, Any]) -> float | None:
    key = "mean_client_accuracy" if bench.protocol == "flamby" else "auroc"
    return result.get(key)


def _delta(ref: Reference) -> str:
    return ", δ = " + ref.source.rsplit("δ = ", 1)[1] if "δ = " in ref.source else ""


def _eps_label(eps: float | None) -> str:
    return "no DP" if eps is None else f"ε = {eps:g}"


def render(
    tasks: list[str],
    cells: list[Cell],
    *,
    wall_seconds: float,
    command: str,
    seeds: int,
    plot_suffix: str = "",
) -> str:
    """RESULTS.md from the cached results of ``cells`` (plots written beside it, named
    ``results/<task><plot_suffix>.png``)."""
    results: dict[tuple[str, str, float | None], list[dict[str, Any]]] = {}
    for cell in cells:
        path = CACHE / cell.key
        if path.exists():
            results.setdefault((cell.task, cell.method, cell.epsilon), []).append(
                json.loads(path.read_text())
            )
    done = sum(len(v) for v in results.values())
    lines = [
        "# fedcare benchmark results",
        "",
        "Generated by `benchmarks/report.py` (do not edit by hand).",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; wall time of the run that "
        f"wrote this file: {wall_seconds / 60:.1f} min (cells already cached were not recomputed)",
        *machine_lines(),
        f"- command: `{command}`",
        *_compute_lines(results),
        f"- cells: {done} of {len(cells)} planned ({seeds} seeds × {len(METHODS)} methods × "
        f"{len(EPSILONS)} privacy levels × {len(tasks)} tasks); a cell with n < {seeds} ran out "
        "of the time budget",
        "",
        "Federated rows are Flower's Simulation Engine (Ray) with Opacus DP-SGD at every hospital "
        "(the project's harness and engine); pooled and local train with the hospitals' own "
        "training loop (`client.training.train_round`) for the same number of steps. Each value "
        "is the mean ± sample sd over seeds (`train.seed` = 0, 1, ...); the seed sets the model "
        "initialisation and the non-private batch order (DP noise and sampling come from the OS "
        "CSPRNG). ε is the Opacus accountant's over the steps taken (largest over the "
        "hospitals), δ = 1e-5. Hyper-parameters are the project's defaults (5 rounds, 1 local "
        "epoch, batch 32, SGD lr 0.5, FedProx μ = 0.1, FedYogi server lr 0.05), not FLamby's "
        "per-strategy tuned ones.",
        "",
    ]
    for task in tasks:
        bench = TASK_BENCHES[task]
        lines += [f"## {task}", ""]
        if not any(k[0] == task for k in results):
            lines += [
                "Not run in this report; command: "
                f"`FEDCARE_SHARED_DATA=/path/to/shared/data python benchmarks/report.py --tasks {task}`",
                "",
            ]
            continue
        lines += [_protocol_text(bench), "", f"Headline metric: **{bench.metric_name}**.", ""]
        lines += [
            "| method | " + " | ".join(_eps_label(e) for e in EPSILONS) + " | published |",
            "|---" * (len(EPSILONS) + 2) + "|",
        ]
        for method in METHODS:
            row = [method]
            for eps in EPSILONS:
                vals = [
                    v
                    for r in results.get((task, method, eps), [])
                    if (v := _headline(bench, r)) is not None
                ]
                row.append(_fmt(vals))
            refs = [r for r in bench.references if r.method == method]
            row.append(
                "; ".join(f"{r.value:.3f} ({_eps_label(r.epsilon)}{_delta(r)})" for r in refs)
                or "—"
            )
            lines.append("| " + " | ".join(row) + " |")
        sources = sorted({r.source for r in bench.references})
        lines += [
            "",
            "Published: " + "; ".join(sources)
            if sources
            else "Published: none found for this task and protocol (the shared data README "
            "lists none); the column is empty rather than filled from another protocol.",
        ]
        lines += ["", "ε actually spent (accountant, mean over seeds; largest hospital):", ""]
        lines += ["| method | " + " | ".join(_eps_label(e) for e in EPSILONS[1:]) + " |"]
        lines += ["|---" * len(EPSILONS) + "|"]
        for method in METHODS:
            row = [method]
            for eps in EPSILONS[1:]:
                spent = [r["epsilon"] for r in results.get((task, method, eps), [])]
                row.append(f"{sum(spent) / len(spent):.3f}" if spent else "not run")
            lines.append("| " + " | ".join(row) + " |")
        other = (
            "AUROC, pooled test splits"
            if bench.protocol == "flamby"
            else "mean of per-hospital test accuracies"
        )
        lines += ["", f"Secondary metric ({other}):", ""]
        lines += ["| method | " + " | ".join(_eps_label(e) for e in EPSILONS) + " |"]
        lines += ["|---" * (len(EPSILONS) + 1) + "|"]
        key = "auroc" if bench.protocol == "flamby" else "mean_client_accuracy"
        for method in METHODS:
            row = [method]
            for eps in EPSILONS:
                vals = [
                    r[key] for r in results.get((task, method, eps), []) if r.get(key) is not None
                ]
                row.append(_fmt(vals))
            lines.append("| " + " | ".join(row) + " |")
        if bench.protocol == "flamby":
            lines += _local_k_table(results, task, bench.local_references)
        lines += _personal_table(results, task, bench)
        fed_seconds = [
            r["seconds"]
            for (t, m, _), rs in results.items()
            if t == task and (m in FEDERATED or m in PERSONAL)
            for r in rs
        ]
        if fed_seconds:
            lines += [
                "",
                f"Wall time of one federated cell (Ray instance already up): median "
                f"{sorted(fed_seconds)[len(fed_seconds) // 2]:.1f} s over {len(fed_seconds)} cells.",
            ]
        plot = _plot(bench, results, suffix=plot_suffix)
        if plot is not None:
            lines += ["", f"![{task}](results/{plot.name})"]
        lines.append("")
    untouched = [t for t in TASK_BENCHES if t not in tasks]
    if untouched:
        lines += ["## Tasks not in this report", ""]
        for task in untouched:
            lines.append(
                f"- {task}: not run in this report (expensive on a 2-core CPU); command: "
                f"`FEDCARE_SHARED_DATA=/path/to/shared/data python benchmarks/report.py --tasks {task}`"
            )
        lines.append("")
    return "\n".join(lines)


def _protocol_text(bench: TaskBench) -> str:
    if bench.protocol == "flamby":
        return (
            "Protocol: FLamby's Fed-Heart-Disease. Same as FLamby: the 4 real hospitals; "
            "slope, ca, thal dropped, rows with a missing value dropped, cp and restecg one-hot "
            "without their first level (13 inputs); per-centre stratified 66/34 split with "
            'FLamby\'s seed 43 (`data.split = "stratified"`, `data.split-seed = 43`: identical '
            "rows, 486 train / 254 test, "
            "since both use `sklearn.model_selection.train_test_split` on the same rows); "
            "logistic regression; metric = mean over the 4 centres of one model's test "
            "accuracy (threshold 0.5); local = `Local k` (trained at centre k, evaluated on all "
            "4; the row is the mean over k, per-k below). Different from FLamby: features are "
            "scaled by the task file's fixed published constants, not z-scored with each "
            "centre's training mean and sd (the project never fits preprocessing to data); "
            "training is DP-SGD-style SGD with Poisson batches at the project's "
            "hyper-parameters (FLamby: Adam lr 1e-3, batch 4, 50 epochs pooled; SGD lr 1e-3, "
            "100 local steps × 15 rounds federated)."
        )
    return (
        "Protocol: the project's. Hospitals: "
        + (
            f"{bench.hospitals} simulated (IID split of the data, `train.seed` sets it)"
            if bench.hospitals
            else "the data's own files, one per hospital"
        )
        + "; test split per hospital (per record: a keyed hash of each record); local = each "
        "hospital's own model on its "
        "own test split (as `simulations/baselines.py`)."
    )


def _local_k_table(results: dict, task: str, published: dict[str, float]) -> list[str]:
    """FLamby-style ``Local k`` rows (no DP): mean over centres, per training centre."""
    rows = results.get((task, "local", None), [])
    if not rows or "local" not in rows[0]:
        return []
    names = list(rows[0]["local"])
    lines = [
        "",
        "Local k (no DP): trained at centre k, mean accuracy over the 4 centres' tests:",
        "",
    ]
    lines += ["| trained at | mean over centres | " + " | ".join(names) + " | FLamby |"]
    lines += ["|---" * (len(names) + 3) + "|"]
    for k in names:
        means = [r["local"][k]["mean_client_accuracy"] for r in rows]
        per = [
            _fmt([r["local"][k]["client_accuracy"][c] for r in rows]).split(" (")[0] for c in names
        ]
        ref = f"{published[k]:.3f}" if k in published else "—"
        lines.append(f"| {k} | {_fmt(means)} | " + " | ".join(per) + f" | {ref} |")
    return lines


def _plot(bench: TaskBench, results: dict, *, suffix: str = "") -> Path | None:
    """Headline metric against privacy, one line per method (mean ± sd), references dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = list(range(len(EPSILONS)))
    for method in METHODS:
        pts = []
        for x, eps in zip(xs, EPSILONS, strict=True):
            vals = [
                v
                for r in results.get((bench.name, method, eps), [])
                if (v := _headline(bench, r)) is not None
            ]
            if vals:
                pts.append((x, *mean_sd(vals)))
        if pts:
            ax.errorbar(
                [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                marker="o", capsize=3, label=method,
            )  # fmt: skip
    by_value: dict[float, list[str]] = {}
    for ref in bench.references:  # one dashed line per published value, its labels joined
        by_value.setdefault(ref.value, []).append(
            f"{ref.method} {_eps_label(ref.epsilon)}{_delta(ref)}"
        )
    for value, labels in by_value.items():
        ax.axhline(value, linestyle="--", linewidth=0.8, color="grey")
        ax.annotate(
            "published: " + "; ".join(labels), (len(EPSILONS) - 1, value),
            fontsize=7, ha="right", va="bottom", color="grey",
        )  # fmt: skip
    ax.set_xticks(xs, [_eps_label(e) for e in EPSILONS])
    ax.set_ylabel(bench.metric_name)
    ax.set_title(f"{bench.name}: {len(next(iter(results.values())))} seed(s) per point at most")
    ax.legend(fontsize=8, loc="best", framealpha=0.6)
    PLOTS.mkdir(parents=True, exist_ok=True)
    path = PLOTS / f"{bench.name}{suffix}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _eps_arg(epsilon: float | None) -> str:
    """``--epsilons`` spelling of a privacy level: ``none`` or the number (``8``, ``3``, ``1``)."""
    return "none" if epsilon is None else f"{epsilon:g}"


def _personal_table(results: dict, task: str, bench: TaskBench) -> list[str]:
    """Per hospital, the global FedAvg model against each hospital's personal model (mean over
    seeds): accuracy under FLamby's protocol, else AUROC, each on the hospital's own test split."""
    personal = [m for m in PERSONAL if any(results.get((task, m, e)) for e in EPSILONS)]
    if not personal:
        return []
    key = "client_accuracy" if bench.protocol == "flamby" else "client_auroc"
    hospitals = sorted({s for rs in results.values() for r in rs if r.get("task") == task
                    for s in r.get(key, {})})  # fmt: skip
    lines = [
        "",
        f"Personalised FL, per hospital ({'accuracy' if key == 'client_accuracy' else 'AUROC'} "
        "on the hospital's own test split, mean over seeds; `fedavg+X`: each hospital's "
        "personal model, trained at the hospital and never sent):",
        "",
        "| method | ε | " + " | ".join(hospitals) + " | seeds |",
        "|---" * (len(hospitals) + 3) + "|",
    ]
    for method in ("fedavg", *personal):
        for eps in EPSILONS:
            rs = results.get((task, method, eps), [])
            if not rs:
                continue
            cells = []
            for hospital in hospitals:
                vals = [v for r in rs if (v := r.get(key, {}).get(hospital)) is not None]
                cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "n/a")
            lines.append(
                f"| {method} | {_eps_label(eps)} | " + " | ".join(cells) + f" | {len(rs)} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Plan the cells, compute the missing ones (one worker process per task and seed), and
    write RESULTS.md and the plots."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TABULAR), choices=list(TASK_BENCHES))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget-minutes", type=float, default=55.0)
    parser.add_argument(
        "--jobs", type=int, default=3, help="Worker processes side by side (each its own Ray)."
    )
    parser.add_argument("--report-only", action="store_true", help="Only render the cache.")
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
        help="Methods to plan (default: all); the others show as not run.",
    )  # fmt: skip
    parser.add_argument(
        "--epsilons", nargs="+", default=[_eps_arg(e) for e in EPSILONS],
        choices=[_eps_arg(e) for e in EPSILONS],
        help="Privacy levels to plan (none = no DP; default: all); the others show as not run.",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=RESULTS_MD, help="Markdown to write (default RESULTS.md)."
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker)
        return 0
    t0 = time.monotonic()
    deadline = time.time() + args.budget_minutes * 60
    CACHE.mkdir(parents=True, exist_ok=True)
    data_dirs = {t: prepare_data(t) for t in args.tasks}
    # gbsg2's task is not built in: its cells are planned (run config) inside its app copy
    apps = {t: app_dir_for(t) for t in args.tasks}
    epsilons = tuple(e for e in EPSILONS if _eps_arg(e) in args.epsilons)
    cells = _plan_in_apps(args.tasks, args.seeds, data_dirs, apps, tuple(args.methods), epsilons)
    todo = [c for c in cells if not (CACHE / c.key).exists()]
    print(
        f"{len(cells)} cells, {len(cells) - len(todo)} cached, {len(todo)} to compute", flush=True
    )
    if not args.report_only:
        from concurrent.futures import ThreadPoolExecutor

        batches = [
            [c for c in todo if c.task == task and c.seed == seed]
            for seed in range(args.seeds)
            for task in args.tasks
        ]
        # the workers mostly wait (Ray actors, Flower's polling): a few run side by side
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for batch in [b for b in batches if b]:
                pool.submit(_run_batch, batch, apps[batch[0].task], deadline)
    command = "python benchmarks/report.py " + " ".join(
        ["--tasks", *args.tasks, "--seeds", str(args.seeds), "--jobs", str(args.jobs),
         "--budget-minutes", f"{args.budget_minutes:g}"]
        + (["--methods", *args.methods] if tuple(args.methods) != METHODS else [])
        + (["--epsilons", *args.epsilons] if len(args.epsilons) != len(EPSILONS) else [])
        + (["--out", str(args.out)] if args.out != RESULTS_MD else [])
    )  # fmt: skip
    computed = sum(1 for c in todo if (CACHE / c.key).exists())
    if not args.report_only:
        with RUNS_LOG.open("a") as fh:  # every computing run, for RESULTS.md's header
            fh.write(json.dumps({
                "ended": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "minutes": round((time.monotonic() - t0) / 60, 1), "command": command,
                "computed": computed, "load": [round(v, 1) for v in os.getloadavg()],
            }) + "\n")  # fmt: skip
    args.out.write_text(
        render(
            args.tasks,
            cells,
            wall_seconds=time.monotonic() - t0,
            command=command,
            seeds=args.seeds,
            plot_suffix="" if args.out == RESULTS_MD else f"-{args.out.stem}",
        )  # fmt: skip
    )
    print(f"wrote {args.out} in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    return 0


def _plan_in_apps(tasks, seeds, data_dirs, apps, methods=METHODS, epsilons=EPSILONS) -> list[Cell]:  # type: ignore[no-untyped-def]
    """Plan cells; a task whose app is a copy is planned by a worker process inside it."""
    cells = plan_cells([t for t in tasks if apps[t] == ROOT], seeds, data_dirs, methods, epsilons)
    for task in [t for t in tasks if apps[t] != ROOT]:
        code = (
            "import json, sys; sys.argv = ['x'];"
            f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
            "import report, dataclasses;"
            f"cs = report.plan_cells([{task!r}], {seeds}, {{{task!r}: {data_dirs[task]!r}}}, "
            f"{tuple(methods)!r}, {tuple(epsilons)!r});"
            "print(json.dumps([dataclasses.asdict(c) for c in cs]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            cwd=apps[task], env={**os.environ, "PYTHONPATH": str(apps[task])},
        ).stdout  # fmt: skip
        cells += [Cell(**c) for c in json.loads(out.strip().splitlines()[-1])]
    order = {t: i for i, t in enumerate(tasks)}
    return sorted(cells, key=lambda c: (c.seed, order[c.task]))


def _run_batch(batch: list[Cell], app: Path, deadline: float) -> None:
    """Compute ``batch`` (one task, one seed) in a worker process inside ``app``; print its
    result lines (Flower's and Ray's logs only when the worker fails)."""
    from dataclasses import asdict

    print(f"{batch[0].task} seed {batch[0].seed}: {len(batch)} cells", flush=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({"deadline": deadline, "cells": [asdict(c) for c in batch]}, fh)
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", fh.name],
            cwd=app, env={**os.environ, "PYTHONPATH": str(app)},
            capture_output=True, text=True,
        )  # fmt: skip
    finally:
        os.unlink(fh.name)
    mine = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    print("\n".join(mine), flush=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).splitlines()[-40:]
        print(f"worker for {batch[0].task} seed {batch[0].seed} failed:", *tail, sep="\n")


if __name__ == "__main__":
    sys.exit(main())
