"""``fedcare simulate``: validate the request, run the federation, add baselines, report.

Everything a user can get wrong is checked BEFORE the federation starts (task, data files,
number of hospitals, DP budget feasible at every hospital), so mistakes leave no half-written run
folder. The hospitals run in this process by default (:func:`uses_ray`); with Ray, the checks
run in a thread while Ray starts in the main thread (both take seconds; on 2 cores they
overlap), and a failed check shuts Ray down again and reports only the mistake.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.run_config import RunOptions, UsageError, apply_rule_for_sizes, check_names

if TYPE_CHECKING:
    from shared_models.tasks import Task


@dataclass(frozen=True)
class SimulationRequest:
    """What the researcher asked for on the command line (None = the schema's default)."""

    options: RunOptions
    hospitals: int | None
    out: Path
    ledger_dir: Path | None = None
    policy: Path | None = None
    verbose: bool = False
    gpus_per_hospital: float = 0.0  # Ray GPU share of each simulated hospital (0 = CPU)
    cpus_per_hospital: float = 1.0  # Ray CPUs of each simulated hospital's actor
    ray_address: str | None = None  # an existing Ray cluster (else RAY_ADDRESS, else local)
    backend: str = "auto"  # "auto", "ray" or "in-process" (see uses_ray)
    task_file: str = ""  # text of a task file given by path (--task PATH), see task_argument
    hold_out: str = ""  # a hospital left out of the federation and validated on (--hold-out)
    cross_site: bool = False  # NVFlare's cross-site matrix in the report (--cross-site)


DEFAULT_HOSPITALS = 3
MIN_TRAINING_HOSPITALS = 1  # --hold-out: hospitals left to train (see _without_hold_out)
# How long Ray's start waits for the checks: a mistake found this fast (an option out of range in
# a process that has imported the libraries already) is reported without starting Ray.
_QUICK_CHECK_SECONDS = 0.2


@contextmanager
def task_argument(task: str) -> Iterator[tuple[str, str]]:
    """Check ``--task`` (a task name or a task file's path) before anything heavy is imported,
    and yield ``(task name, task file text)`` for the duration of the command.

    A name must be a registered task (the message suggests a close one). A path to a task file
    of the app's own ``tasks/`` folder is that task's name. A path to a task file anywhere else
    is registered for this simulation only (:func:`shared_models.tasks.simulation_task`), and
    its text travels to the simulated hospitals in the run config key ``simulation.task-file``
    (``""`` for a name). Imports pandas and the task registry, not torch, Flower or Ray.

    Raises
    ------
    UsageError
        Unknown task name.
    shared_models.tasks.TaskFileError
        The task file is missing or invalid, or names one of the app's tasks.
    """
    from shared_models.tasks import TASKS_DIR, get_task, is_task_file_arg, simulation_task

    if not is_task_file_arg(task):
        try:
            get_task(task)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        yield task, ""
        return
    path = Path(task)
    installed = TASKS_DIR / path.name
    if installed.is_file() and path.is_file() and path.resolve() == installed.resolve():
        yield path.stem, ""  # the app's own task file (checked by name later)
        return
    with simulation_task(path, shown=task) as (spec, text):
        yield spec.name, text


def check_data_dir_argument(data_dir: Path | None) -> None:
    """``--data-dir`` must exist; the message shows the path as typed (no symlink resolved).

    Raises
    ------
    UsageError
        The path does not exist.
    """
    if data_dir is not None and not data_dir.exists():
        raise UsageError(f"{data_dir}: data folder not found (--data-dir)")


def build_run_config(req: SimulationRequest) -> tuple[dict[str, Any], int]:
    """Fuse the schema's defaults with the request; return (flat run config, number of hospitals).

    Raises
    ------
    UsageError
        Out-of-range option, unknown ``--run-config`` key.
    """
    if req.hospitals is not None and req.hospitals < 1:
        raise UsageError(f"--hospitals must be at least 1 (got {req.hospitals})")
    if not 0.0 <= req.gpus_per_hospital <= 1.0:
        raise UsageError(
            f"--gpus-per-hospital must be in [0, 1] (got {req.gpus_per_hospital:g}); "
            "0.25 puts four hospitals on one GPU"
        )
    if not req.cpus_per_hospital > 0:
        raise UsageError(f"--cpus-per-hospital must be positive (got {req.cpus_per_hospital:g})")
    if req.gpus_per_hospital > 0:
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                "--gpus-per-hospital needs a CUDA GPU, and torch sees none here "
                "(a CPU build of torch, or no driver); drop the option to train on the CPU"
            )
    cfg = req.options.build()
    if req.options.data_dir:  # absolute for the hospitals, symlinks kept: messages show them
        cfg["data.dir"] = str(Path(req.options.data_dir).absolute())
    cfg["simulation.task-file"] = req.task_file  # only what task_argument registered
    cfg["simulation.hold-out"] = req.hold_out
    cfg["output.dir"] = str(req.out.resolve())
    cfg["eval.centralized"] = True
    if req.ledger_dir is not None:
        cfg["simulation.ledger-dir"] = str(req.ledger_dir.resolve())
    elif cfg["personal.method"] != "none":  # each hospital keeps its personal model
        cfg["simulation.ledger-dir"] = str((req.out / "hospitals").resolve())  # in its own folder
    if req.policy is not None:
        from client.policy import HospitalPolicy, PolicyError

        try:
            HospitalPolicy.load(req.policy)
        except PolicyError as exc:
            raise UsageError(str(exc)) from None
        cfg["simulation.policy"] = str(req.policy.resolve())
    return cfg, req.hospitals or DEFAULT_HOSPITALS


def preflight(
    cfg: dict[str, Any], n_hospitals: int, req: SimulationRequest
):  # -> (RunConfig, hospitals)
    """Parse the run config and load every simulated hospital's data; check the DP plan.

    Raises
    ------
    UsageError, shared_models.tasks.DataError, shared_models.config.ConfigError
    """
    from client.training import plan_for_run
    from shared_models.config import RunConfig
    from shared_models.hospitals import simulated_hospitals_for
    from shared_models.tasks import get_task

    check_names(cfg)
    task = get_task(cfg["task.name"])
    n_hospitals = _hospital_count(task, cfg, req, n_hospitals)
    if req.hold_out:
        n_hospitals = _without_hold_out(cfg, n_hospitals, req.hold_out)
    # every simulated hospital takes part: the minimum node counts cannot exceed the federation
    for key in ("strategy.min-train-nodes", "strategy.min-evaluate-nodes"):
        cfg[key] = min(int(cfg[key]), n_hospitals)
    cfg["strategy.min-available-nodes"] = n_hospitals
    cfg["simulation.hospitals"] = n_hospitals
    run = RunConfig.from_run_config(cfg)
    try:
        task.resolve_model(run.model.name, task.resolve_preprocessing(run.task.preprocessing))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    hospitals = simulated_hospitals_for(run, n_hospitals)
    apply_rule_for_sizes(cfg, [s.n_train for s in hospitals])  # the rule's settings for these sizes
    run = RunConfig.from_run_config(cfg)
    if run.dp.sample_level:
        from client.policy import SIMULATION_POLICY, HospitalPolicy

        policy = HospitalPolicy.load(req.policy) if req.policy is not None else SIMULATION_POLICY
        # The plan is feasible at every hospital if it is at the smallest: delta must be below
        # 1/n, and the evaluation releases' share of the budget does not depend on n. (Each
        # hospital calibrates its own plan when it trains; this only checks.)
        hospital = min(hospitals, key=lambda s: s.n_train)
        try:
            plan_for_run(run, n_train=hospital.n_train, private_evaluation=not policy.exact_metrics)
        except ValueError as exc:
            raise UsageError(
                f"hospital {hospital.name} ({hospital.n_train} training records): {exc}"
            ) from None
    return run, hospitals


def _without_hold_out(cfg: dict[str, Any], hospitals: int, hold_out: str) -> int:
    """The number of hospitals that train when ``hold_out`` (one of the ``hospitals`` hospitals
    of the data, by name) is left out (:func:`shared_models.hospitals.simulated_hospitals_for`).

    Raises
    ------
    UsageError
        ``hold_out`` names no hospital of the data (the message lists them), or fewer than
        :data:`MIN_TRAINING_HOSPITALS` hospitals would be left to train.
    """
    from shared_models.config import RunConfig
    from shared_models.errors import DataError
    from shared_models.hospitals import held_out_hospital

    full = {**cfg, "simulation.hospitals": hospitals, "strategy.min-available-nodes": hospitals}
    for key in ("strategy.min-train-nodes", "strategy.min-evaluate-nodes"):
        full[key] = min(int(cfg[key]), hospitals)
    try:
        held_out_hospital(RunConfig.from_run_config(full), hospitals - 1)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    if hospitals - 1 < MIN_TRAINING_HOSPITALS:
        raise UsageError(
            f"--hold-out {hold_out}: the data have {hospitals} hospitals, so "
            f"{hospitals - 1} would be left to train; a federation needs at least "
            f"{MIN_TRAINING_HOSPITALS}"
        )
    return hospitals - 1


def _hospital_count(task: Task, cfg: dict[str, Any], req: SimulationRequest, hospitals: int) -> int:
    """How many hospitals to simulate: the data's real hospitals when it has several (a natural
    split, or a data folder with one file or image folder per hospital), else ``hospitals`` (one
    dataset to partition, e.g. the embedded WDBC data or a MedMNIST file).

    A ``repartitionable`` task (icu-mortality) keeps its real hospitals (and ``data.partition``
    becomes ``natural``) unless ``--hospitals N`` asks for a partition of the pooled data.

    Raises
    ------
    UsageError
        ``--hospitals`` for data that come as several real hospitals that cannot be pooled, or
        ``--partition dirichlet`` where the real hospitals are kept.
    """
    if req.hospitals is not None and task.repartitionable:
        return hospitals
    if task.natural_split and req.hospitals is not None:
        raise UsageError(f"task {task.name} has real hospitals (a natural split); drop --hospitals")
    if task.repartitionable and cfg["data.partition"] == "dirichlet":
        raise UsageError(
            f"--partition dirichlet needs --hospitals N: without it task {task.name} keeps its "
            "real hospitals"
        )
    if not (task.natural_split or cfg["data.dir"]):
        return hospitals
    found = len(task.load_hospitals(cfg["data.dir"]))
    if task.repartitionable:
        cfg["data.partition"] = "natural"
    if not task.natural_split and found == 1:
        return hospitals  # one dataset: partitioned into --hospitals
    if req.hospitals is not None and req.hospitals != found:
        raise UsageError(
            f"{cfg['data.dir']} holds {found} real hospitals; drop --hospitals (got {req.hospitals})"
        )
    return found


class _ProgressHandler(logging.Handler):
    """Renders the ServerApp's per-round progress records (logger ``fedcare.progress``)."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        from server.cli import print_progress

        info = getattr(record, "fedcare_progress", None)
        if info:
            print_progress(info)


def export_hospitals(req: SimulationRequest, folder: Path) -> list[tuple[Path, int]]:
    """Write each simulated hospital's raw rows as a file in the task's format (for deployment).

    Never overwrites: an existing file is an error.
    """
    from shared_models.hospitals import simulated_hospital_frames
    from shared_models.tasks import get_task

    cfg, hospitals = build_run_config(req)
    check_names(cfg)
    task = get_task(cfg["task.name"])
    hospitals = _hospital_count(task, cfg, req, hospitals)
    frames = simulated_hospital_frames(
        task, data_dir=cfg["data.dir"], num_hospitals=hospitals, scheme=cfg["data.partition"],
        alpha=cfg["data.alpha"], seed=cfg["train.seed"],
    )  # fmt: skip
    targets = [(folder / task.file_name(name), frame) for name, frame in frames]
    clash = [str(p) for p, _ in targets if p.exists()]
    if clash:
        raise UsageError(f"{clash[0]} exists; export into an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    for path, frame in targets:
        task.write_file(frame, path)
    return [(path, len(frame)) for path, frame in targets]


def run_simulation_job(req: SimulationRequest, *, console: Any) -> dict[str, Any]:
    """Validate, run the simulation, add baselines and wall time, and (re)write the reports.

    The hospitals' ClientApps run in this process (:class:`simulations.engine.InProcessBackend`)
    or, when :func:`uses_ray`, in Ray actors, Ray starting while the request is checked (the
    federation starts only once the checks passed). The non-private baselines train in a thread
    while the federation runs. The partition is computed once, by the checks, and shared with
    the hospitals: in this process through the memo of
    :func:`shared_models.hospitals.simulated_hospitals`, with Ray's actors through a temporary folder
    (:func:`shared_models.runtime.partition_cache`).

    Returns the final ``summary.json`` content.
    """
    t0 = time.monotonic()
    if req.out.exists() and any(req.out.iterdir()):
        raise UsageError(f"{req.out}: run folder exists and is not empty; choose another --out")
    from shared_models.runtime import partition_cache

    with partition_cache():  # the checks partition once; the hospitals' actors reuse it
        return _run_job(req, console=console, t0=t0)


def uses_ray(req: SimulationRequest) -> bool:
    """Whether the hospitals run in Ray actors (Flower's ``RayBackend``) or in this process.

    ``--backend auto`` picks Ray when an option only Ray serves is set (``--ray-address`` or
    ``$RAY_ADDRESS``, a ``--gpus-per-hospital`` share, ``--cpus-per-hospital`` other than 1),
    else this process: starting Ray and actors that import torch again costs more than a small
    federation's training on a 2-core machine (docs/benchmarks.md, "Main job wall time"). An explicit
    ``--backend in-process`` ignores an inherited ``$RAY_ADDRESS``.

    Raises
    ------
    UsageError
        ``--backend in-process`` together with a Ray-only option, or an unknown backend.
    """
    if req.backend not in ("auto", "ray", "in-process"):
        raise UsageError(f"--backend must be auto, ray or in-process (got {req.backend!r})")
    ray_options = [
        name
        for name, given in (
            ("--ray-address", req.ray_address is not None),
            ("$RAY_ADDRESS", req.backend == "auto" and _ray_address(req) is not None),
            ("--gpus-per-hospital", req.gpus_per_hospital > 0),
            ("--cpus-per-hospital", req.cpus_per_hospital != 1.0),
        )
        if given
    ]
    if req.backend == "in-process" and ray_options:
        raise UsageError(
            f"--backend in-process runs every hospital in this process; {ray_options[0]} needs "
            "--backend ray (or drop it)"
        )
    return req.backend == "ray" or (req.backend == "auto" and bool(ray_options))


def _run_job(req: SimulationRequest, *, console: Any, t0: float) -> dict[str, Any]:
    ray = uses_ray(req)
    cfg, run, hospitals = _checked_while_ray_starts(req) if ray else _checked_request(req)
    dp = f"DP ε={run.dp.target_epsilon:g}, δ={run.dp.target_delta:g}" if run.dp.enabled else "no DP"
    from shared_models.tasks import get_task

    positive = get_task(run.task.name).positive_class_for(cfg["data.dir"])
    console.print(
        f"fedcare simulate: task {run.task.name} (label 1 = {positive}), {len(hospitals)} hospitals "
        f"({', '.join(f'{s.name} {s.n_train}+{s.n_test}' for s in hospitals)}), "
        f"{run.strategy.name}, {run.train.rounds} rounds, {dp}"
        + (f"; {run.simulated_hold_out} held out for external validation" if req.hold_out else "")
    )
    from shared_models.recipes import settings_table, summary_line

    console.print(summary_line(settings_table(run.recipe_values(), run.settings_from)))

    from server.history import RunHistory
    from server.model_card import write_model_card
    from server.report import nobody_trained, write_reports
    from simulations.baselines import (
        auroc_on_every_test_split,
        compute_baselines,
        cross_site_matrix,
    )
    from simulations.engine import run_federation
    from simulations.uncertainty import final_model_validation, write_calibration_figure

    device = "cuda" if req.gpus_per_hospital > 0 else "cpu"
    external = None
    if req.cross_site and run.simulated_hold_out:  # the local models meet the held-out hospital
        from shared_models.hospitals import held_out_hospital
        from simulations.uncertainty import held_out_records

        external = held_out_records(held_out_hospital(run, len(hospitals)))
    baselines = _Background(compute_baselines, run, hospitals, device=device, external=external)
    handler = _ProgressHandler()
    progress_logger = logging.getLogger("fedcare.progress")
    progress_logger.addHandler(handler)
    progress_logger.setLevel(logging.INFO)
    progress_logger.propagate = False
    if not req.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        run_federation(
            run_config=cfg, num_supernodes=len(hospitals), verbose=req.verbose,
            num_cpus_per_client=req.cpus_per_hospital, num_gpus_per_client=req.gpus_per_hospital,
            ray_address=_ray_address(req), in_process=not ray,
        )  # fmt: skip
    finally:
        progress_logger.removeHandler(handler)
    summary_path = req.out / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the ServerApp finished without writing {summary_path}")
    summary = json.loads(summary_path.read_text())
    history = RunHistory.from_dict(json.loads((req.out / "history.json").read_text()))
    done = baselines.result()
    summary["baselines"] = done.table
    summary["positive_class"] = positive  # what label 1 means, for every metric of the report
    not_trained = nobody_trained(summary)  # else the final model is the untrained one
    scores = _final_model_scores(run, hospitals, req.out, device) if not_trained is None else None
    summary["test_split_auroc"] = auroc_on_every_test_split(
        hospitals, federated=scores, baselines=done
    )
    if req.cross_site:
        summary["cross_site"] = cross_site_matrix(
            hospitals, federated=scores, baselines=done,
            held_out=_held_out_column(run, len(hospitals), req.out, device, trained=scores is not None),
        )  # fmt: skip
    summary["validation"] = final_model_validation(hospitals, scores, why_not=not_trained or "")
    write_calibration_figure(req.out, summary["validation"])
    if run.simulated_hold_out:
        summary["external_validation"] = _external_validation(
            run, len(hospitals), req.out, device, why_not=not_trained
        )
    _record_training_data(run, hospitals, req.out)
    summary["wall_seconds"] = round(time.monotonic() - t0, 2)
    write_reports(req.out, run, history, summary)
    write_model_card(req.out)  # again: with positive_class and the baselines' warnings
    if (problem := nobody_trained(summary)) is not None:
        raise UsageError(f"{problem}. Reports are in {req.out}")
    return summary


def _record_training_data(run: Any, hospitals: Any, out: Path) -> None:
    """Replace ``model.json``'s ``training_data`` (what a deployment's hospitals released) with
    the simulation's exact figures (:func:`simulations.external_validation.simulation_training_data`)
    for ``fedcare evaluate``'s shift warnings; nothing when the run wrote no model."""
    from shared_models.files import write_json_atomic
    from simulations.external_validation import simulation_training_data

    path = out / "model.json"
    if not path.exists():
        return
    card = json.loads(path.read_text())
    card["training_data"] = simulation_training_data(
        run.task.name, run.task.preprocessing, hospitals
    )
    write_json_atomic(path, card)


def _final_model_scores(run: Any, hospitals: Any, out: Path, device: str) -> list[Any] | None:
    """The final federated model (``model.safetensors``) on each hospital's test split: ``[n_test_j]``
    probabilities of class 1 per hospital, exact (the simulation holds every test split, as for the
    pooled evaluation); None when the run wrote no final model."""
    return _final_model_on(run, [s.x_test for s in hospitals], out, device)


def _final_model_on(run: Any, inputs: list[Any], out: Path, device: str) -> list[Any] | None:
    """The final federated model's ``[n_k]`` probabilities of class 1 on each of ``inputs``
    (``[n_k, ...]`` arrays); None when the run wrote no ``model.safetensors``."""
    from server.checkpoint import load_weights
    from shared_models.models import model_for_run, predict_proba

    path = out / "model.safetensors"
    if not path.exists():
        return None
    model, _ = model_for_run(run)
    model.load_state_dict(load_weights(path))
    return [predict_proba(model, x, device=device) for x in inputs]


def _held_out_column(
    run: Any, n_hospitals: int, out: Path, device: str, *, trained: bool
) -> tuple[str, Any, Any] | None:
    """``--hold-out`` with ``--cross-site``: the held-out hospital's name, labels of all its
    records and the final model's scores on them (None without a final model), for
    :func:`simulations.baselines.cross_site_matrix`; None without ``--hold-out``."""
    if not run.simulated_hold_out:
        return None
    from shared_models.hospitals import held_out_hospital
    from simulations.uncertainty import held_out_labels, held_out_records

    hospital = held_out_hospital(run, n_hospitals)
    found = _final_model_on(run, [held_out_records(hospital)], out, device) if trained else None
    return hospital.name, held_out_labels(hospital), found[0] if found is not None else None


def _external_validation(
    run: Any, n_hospitals: int, out: Path, device: str, *, why_not: str | None
) -> dict[str, Any]:
    """``--hold-out``: the final model on every record of the held-out hospital
    (:func:`simulations.uncertainty.held_out_validation`)."""
    from shared_models.hospitals import held_out_hospital
    from simulations.uncertainty import held_out_records, held_out_validation

    hospital = held_out_hospital(run, n_hospitals)
    scores = None
    if why_not is None:
        found = _final_model_on(run, [held_out_records(hospital)], out, device)
        scores = found[0] if found is not None else None
    return held_out_validation(hospital, scores, why_not=why_not or "")


def _checked_while_ray_starts(req: SimulationRequest) -> tuple[dict[str, Any], Any, Any]:
    """:func:`_checked_request` in a thread while Ray starts in this one (``ray.init`` must run
    in the main thread). A mistake found within ``_QUICK_CHECK_SECONDS`` starts no Ray; a later
    one stops it. Either way the mistake is what is raised."""
    # Imports Flower, before the checks thread also imports parts of it (see simulations.engine)
    from simulations.engine import start_ray, stop_ray

    checks = _Background(_checked_request, req)
    if checks.wait(_QUICK_CHECK_SECONDS):
        checks.result()  # raises a mistake found at once, before any Ray start-up
    try:
        start_ray(
            num_cpus_per_client=req.cpus_per_hospital, num_gpus_per_client=req.gpus_per_hospital,
            ray_address=_ray_address(req), verbose=req.verbose,
        )  # fmt: skip
    except BaseException:
        checks.result()  # a mistake in the request is the message the user needs first
        raise
    try:
        return checks.result()
    except BaseException:
        stop_ray()
        raise


def _checked_request(req: SimulationRequest) -> tuple[dict[str, Any], Any, Any]:
    """:func:`build_run_config` then :func:`preflight`: (flat run config, RunConfig, hospitals)."""
    cfg, n_hospitals = build_run_config(req)
    run, hospitals = preflight(cfg, n_hospitals, req)
    return cfg, run, hospitals


def _ray_address(req: SimulationRequest) -> str | None:
    return req.ray_address or os.environ.get("RAY_ADDRESS") or None


class _Background:
    """``fn(*args, **kwargs)`` in a daemon thread; :meth:`result` joins it and re-raises.

    Not ``concurrent.futures``: its worker threads are joined at interpreter exit, so a run that
    fails early would wait for the baselines before the command could exit.
    """

    def __init__(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None

        def target() -> None:
            try:
                self._value = fn(*args, **kwargs)
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds; True if ``fn`` has finished (or failed)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
