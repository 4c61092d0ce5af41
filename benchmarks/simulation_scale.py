"""Simulation at scale: per-round time and peak memory of ``fedcare simulate``'s machinery for
3 ... 300 simulated hospitals (every hospital trains every round), and 1000 with Flower's
client sampling (``strategy.fraction-train``), with the growth per added hospital.

    nice -n 10 python benchmarks/simulation_scale.py [--sizes 3 10 30 100 300]
        [--sampled 1000] [--fraction 0.03] [--rounds 4] [--rows-per-hospital 19] [--dp]
        [--backend in-process|ray]

Each size is one federation through the project's harness and engine, as ``fedcare simulate
--task breast-cancer --hospitals N --no-dp`` runs it (:func:`simulations.harness.preflight`,
then :func:`simulations.engine.run_federation`: Flower's Simulation Engine with the ClientApps
in the measuring process (``--backend in-process``, ``fedcare simulate``'s default), or on a
local Ray instance started and stopped for the run (``--backend ray``; its actor pool is sized
to the machine's CPUs, not to the number of hospitals)). The coordinator's centralised
evaluation is off (``eval.centralized = false``) so that a round is what the federation itself
costs.

Data: WDBC (569 patients). The harness gives every simulated hospital at least 10 patients
(``shared_models.partition.MIN_PARTITION_SIZE``), so up to 56 hospitals split the real
records (IID); beyond that, the run is a LOAD TEST ON RESAMPLED RECORDS: ``rows-per-hospital ×
N`` records drawn with replacement from WDBC, written as one CSV in the task's format and split
by the harness like a user's CSV (``--data-dir``). The output says which sizes are which.

Measured
--------
- ``to round 1``: from the call into the engine to the end of round 1 (with Ray: its start,
  actors; node registration, DP planning when ``--dp``, the first round); ``after``: from the end of
  the last round to the engine's return (final federated evaluation, Ray shutdown).
- ``round``: the median duration of rounds 2 .. R-1, from the ServerApp's per-round progress
  records (the last round also runs the federated evaluation and is left out).
- ``peak RSS``: the largest sum of resident set sizes over the measuring process (each size
  runs in a fresh Python process, as one ``fedcare simulate``) and all its descendants (Ray's
  GCS, raylet and worker processes), sampled every 0.2 s with psutil from the parent.
  Shared pages (libraries, Ray's object store) count once per process, so it is an upper bound.
- Growth per added hospital: the least-squares slope (:func:`slope`) of round time (ms per
  hospital) and peak RSS (MB per hospital) over the full-participation sizes.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared_models.runtime import apply_offline_env  # noqa: E402

apply_offline_env()  # before Flower, Ray or datasets are imported

REAL_ROWS = 569  # WDBC
GOAL_MS_PER_HOSPITAL = 5.0  # issue #14
GOAL_GB_AT_300 = 8.0


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Ordinary least-squares line through ``(xs, ys)``: ``(slope, intercept)``.

    Raises
    ------
    ValueError
        Fewer than two points, or all ``xs`` equal.
    """
    n = len(xs)
    if n < 2 or n != len(ys):
        raise ValueError(f"a line needs at least two (x, y) points (got {n} x, {len(ys)} y)")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all x are equal: no slope")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return b, my - b * mx


def resampled_rows(n_hospitals: int, rows_per_hospital: int, *, seed: int = 0):  # -> np.ndarray
    """Row indices into WDBC for a load test: ``n_hospitals × rows_per_hospital`` draws with
    replacement (``numpy.random.default_rng(seed).integers``), every one a real record."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, REAL_ROWS, n_hospitals * rows_per_hospital)


class TreeMemorySampler:
    """Samples the summed RSS (bytes) of process ``pid`` (default: this one) and all its
    descendants in a thread."""

    def __init__(self, pid: int | None = None, interval: float = 0.2) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        """One sample: the summed RSS now (bytes); updates the peak."""
        total, count = 0, 0
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
                count += 1
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
        if total > self.peak:
            self.peak, self.peak_processes = total, count
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _RoundClock(logging.Handler):
    """Collects the ServerApp's per-round progress records (emitted in this process, in the
    ServerApp's thread, at the end of each round): round -> ``time.monotonic()`` then."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.at: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        info = getattr(record, "fedcare_progress", None)
        if info:
            self.at[int(info["round"])] = time.monotonic()


@dataclass(frozen=True)
class Measurement:
    """One federation's timings (seconds) and memory (bytes)."""

    hospitals: int
    sampled: int  # hospitals training per round
    rows_per_hospital: float
    resampled: bool
    preflight_s: float
    to_round1_s: float
    round_s: float  # median of rounds 2 .. R-1
    shutdown_s: float  # end of the last round to the engine's return
    wall_s: float
    peak_rss: int
    processes: int


def measure(n: int, *, rounds: int, rows_per_hospital: int, fraction: float, dp: bool,
            workdir: Path, in_process: bool = False) -> Measurement:  # fmt: skip
    """Run one federation of ``n`` hospitals and measure it (see the module docstring)."""
    from server.run_config import RunOptions
    from shared_models.tasks import get_task
    from simulations.engine import run_federation
    from simulations.harness import SimulationRequest, build_run_config, preflight

    resampled = n * 10 > REAL_ROWS  # the harness's MIN_PARTITION_SIZE
    data_dir = ""
    if resampled:
        task = get_task("breast-cancer")
        frame = task.load_hospitals("")[0][1]
        folder = workdir / f"data-{n}"
        folder.mkdir(exist_ok=True)
        rows = frame.iloc[resampled_rows(n, rows_per_hospital)].reset_index(drop=True)
        task.write_file(rows, folder / "wdbc-resampled.csv")
        data_dir = str(folder)
    t0 = time.monotonic()
    options = RunOptions(task="breast-cancer", data_dir=data_dir, rounds=rounds, dp=dp)
    req = SimulationRequest(options=options, hospitals=n, out=workdir / f"run-{n}")
    cfg, n_hospitals = build_run_config(req)
    cfg["eval.centralized"] = False
    if fraction < 1.0:
        cfg["strategy.fraction-train"] = fraction
        cfg["strategy.fraction-evaluate"] = fraction
    run, hospitals = preflight(cfg, n_hospitals, req)
    t1 = time.monotonic()
    clock = _RoundClock()
    progress = logging.getLogger("fedcare.progress")
    progress.addHandler(clock)
    progress.setLevel(logging.INFO)
    progress.propagate = False
    logging.getLogger("flwr").setLevel(logging.WARNING)
    try:
        run_federation(run_config=cfg, num_supernodes=len(hospitals), in_process=in_process)
    finally:
        progress.removeHandler(clock)
    t2 = time.monotonic()
    at = clock.at
    if not all(r in at for r in range(1, rounds + 1)):
        raise RuntimeError(f"{n} hospitals: progress records for rounds {sorted(at)} only")
    steady = [at[r] - at[r - 1] for r in range(2, rounds)]
    n_train = sum(s.n_train + s.n_test for s in hospitals) / len(hospitals)
    return Measurement(
        hospitals=len(hospitals),
        sampled=max(int(cfg["strategy.min-train-nodes"]), int(len(hospitals) * fraction)),
        rows_per_hospital=n_train,
        resampled=resampled,
        preflight_s=t1 - t0,
        to_round1_s=at[1] - t1,
        shutdown_s=t2 - at[rounds],
        round_s=statistics.median(steady),
        wall_s=t2 - t0,
        peak_rss=0,  # the parent samples this process' tree (see measure_in_child)
        processes=0,
    )


def measure_in_child(n: int, *, rounds: int, rows_per_hospital: int, fraction: float, dp: bool,
                     workdir: Path, timeout: float, backend: str) -> Measurement | None:  # fmt: skip
    """:func:`measure` in a fresh Python process (one federation per process, as ``fedcare
    simulate``), sampling the memory of that process and its Ray processes from here.

    Returns None when it did not finish within ``timeout`` seconds (the child's threads' stacks
    are then on stderr, from :mod:`faulthandler`); the child and its descendants are killed.
    """
    import contextlib
    import json
    import subprocess

    import psutil

    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(n), "--fraction",
           str(fraction), "--rounds", str(rounds), "--rows-per-hospital", str(rows_per_hospital),
           "--workdir", str(workdir), "--timeout", str(timeout), "--backend", backend,
           ] + (["--dp"] if dp else [])  # fmt: skip
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with TreeMemorySampler(child.pid) as memory:
        try:
            out, _ = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = psutil.Process(child.pid).children(recursive=True)
            for proc in [*tree, psutil.Process(child.pid)]:  # only what this run started
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            child.wait()
            return None
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"{n} hospitals: the measuring process failed (exit {child.returncode})")
    fields = json.loads(lines[-1][len("RESULT ") :])
    fields.update(peak_rss=memory.peak, processes=memory.peak_processes)
    return Measurement(**fields)


def machine() -> list[str]:
    """CPU, RAM, load and versions."""
    import flwr
    import psutil
    import ray
    import torch
    from machine import cpu_model, load_average

    cpu = cpu_model()
    load = load_average()
    return [
        f"machine: {os.cpu_count()} CPUs ({cpu}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, load average {load}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"flwr {getattr(flwr, '__version__', '?')}, ray {ray.__version__}",
    ]


def main(argv: list[str] | None = None) -> int:
    """Measure every size and print the table and the per-hospital growth."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 10, 30, 100, 300])
    parser.add_argument("--sampled", type=int, nargs="*", default=[1000])
    parser.add_argument("--fraction", type=float, default=0.03)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rows-per-hospital", type=int, default=19)
    parser.add_argument("--dp", action="store_true", help="DP-SGD at every hospital (ε = 2).")
    parser.add_argument("--timeout", type=float, default=900.0, help="Seconds per size.")
    parser.add_argument(
        "--backend", choices=["in-process", "ray"], default="in-process",
        help="Where the ClientApps run (fedcare simulate --backend); default: its default.",
    )  # fmt: skip
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the measuring child
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        import dataclasses
        import faulthandler
        import json

        faulthandler.dump_traceback_later(max(1.0, args.timeout - 20), exit=False)
        m = measure(
            args.one, rounds=args.rounds, rows_per_hospital=args.rows_per_hospital,
            fraction=args.fraction, dp=args.dp, workdir=args.workdir,
            in_process=args.backend == "in-process",
        )  # fmt: skip
        print("RESULT " + json.dumps(dataclasses.asdict(m)), flush=True)
        return 0
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (rounds 2 .. R-1 are timed)")
    print("\n".join(machine()), flush=True)
    print(
        f"backend {args.backend}; task breast-cancer, {'DP-SGD ε=2' if args.dp else 'no DP'}, "
        f"{args.rounds} rounds, "
        f"MLP; hospitals with > {REAL_ROWS // 10} needed: load test on resampled records "
        f"({args.rows_per_hospital} per hospital, drawn with replacement from WDBC)",
        flush=True,
    )
    header = (
        f"{'hospitals':>9} {'train/rnd':>9} {'rows/h':>7} {'data':>9} {'preflight':>9} "
        f"{'to round1':>9} {'round':>8} {'ms/hosp':>8} {'after':>7} {'peak RSS':>9} {'procs':>5} "
        f"{'wall':>7}"
    )
    print(header, flush=True)
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="fedcare-scale-") as tmp:
        plan = [(n, 1.0) for n in args.sizes] + [(n, args.fraction) for n in args.sampled]
        for n, fraction in plan:
            m = measure_in_child(
                n, rounds=args.rounds, rows_per_hospital=args.rows_per_hospital,
                fraction=fraction, dp=args.dp, workdir=Path(tmp), timeout=args.timeout,
                backend=args.backend,
            )  # fmt: skip
            if m is None:
                print(f"{n:>9} did not finish within {args.timeout:g} s (killed)", flush=True)
                continue
            results.append(m)
            print(
                f"{m.hospitals:>9} {m.sampled:>9} {m.rows_per_hospital:>7.1f} "
                f"{'resampled' if m.resampled else 'real':>9} {m.preflight_s:>8.1f}s "
                f"{m.to_round1_s:>8.1f}s {m.round_s:>7.2f}s {1000 * m.round_s / m.sampled:>8.1f} "
                f"{m.shutdown_s:>6.1f}s "
                f"{m.peak_rss / 2**30:>7.2f}GB {m.processes:>5} {m.wall_s:>6.1f}s",
                flush=True,
            )
    full = [m for m in results if m.sampled == m.hospitals]
    if len(full) >= 2:
        xs = [float(m.hospitals) for m in full]
        t_slope, t_icpt = slope(xs, [1000 * m.round_s for m in full])
        m_slope, m_icpt = slope(xs, [m.peak_rss / 2**20 for m in full])
        at300 = [m for m in full if m.hospitals == 300]
        print(
            f"growth per added hospital (least squares over {len(full)} full-participation "
            f"sizes): round time {t_slope:.2f} ms/hospital (intercept {t_icpt:.0f} ms; goal "
            f"<= {GOAL_MS_PER_HOSPITAL:g}: {'met' if t_slope <= GOAL_MS_PER_HOSPITAL else 'NOT met'}), "
            f"peak RSS {m_slope:.2f} MB/hospital (intercept {m_icpt:.0f} MB)"
        )
        if at300:
            gb = at300[0].peak_rss / 2**30
            print(
                f"300 hospitals: peak RSS {gb:.2f} GB (goal < {GOAL_GB_AT_300:g} GB: "
                f"{'met' if gb < GOAL_GB_AT_300 else 'NOT met'})"
            )
    print(
        "wall times on a shared machine are inflated by other work; "
        "RSS sums count shared pages once per process (an upper bound)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
