"""The main job's wall time before and after a change, side by side, in one run.

``fedcare simulate`` with its defaults (3 hospitals, breast-cancer, 5 rounds of FedAvg, DP) is
run from two checkouts of this repository: ``--before REF`` (default: the commit before the
start-up work of issue #14) in a temporary ``git worktree``, and the working tree itself. Runs
alternate (before, after, before, ...) so both variants see the same machine load, and the
medians are compared as a ratio. Each run is a fresh process, as a researcher's would be: the
wall time counts from process start to exit (imports, Ray start, the rounds, baselines, report,
Ray shutdown).

Figures per variant: wall seconds, seconds to the first output line, seconds to the line of
round 1 (what the researcher waits for before anything happens).

Usage::

    python benchmarks/main_job.py [--before REF] [--repeats 3]

Both variants use this virtual environment (the same torch, Flower, Ray, Opacus); a variant's
own modules come first on ``sys.path`` (``python -m`` from its folder), also in Ray's workers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "c1b7dfc^"  # main before "simulate: fixed costs overlapped" (issue #14)


def machine() -> str:
    """One line: host, CPUs, memory, Python and the library versions both variants share."""
    import flwr
    import ray
    import torch
    from machine import cpu_model

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"machine: {platform.node()} {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs ({cpu_model()}), {mem:.0f} GiB; "
        f"Python {platform.python_version()}, torch {torch.__version__}, flwr {flwr.__version__}, "
        f"ray {ray.__version__}; load average before the runs {os.getloadavg()[0]:.2f}"
    )


def one_run(checkout: Path, out: Path) -> dict[str, float]:
    """``python -m simulations.cli simulate --out OUT`` in ``checkout``; seconds to the first
    line, to round 1 and to exit.

    Raises
    ------
    RuntimeError
        The run failed (its output is in the message).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "simulate", "--out", str(out)],
        cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    first = round1 = float("nan")
    lines = []
    for line in proc.stdout:
        now = time.monotonic() - t0
        lines.append(line)
        if first != first:  # NaN: not seen yet
            first = now
        if round1 != round1 and "round   1/" in line:
            round1 = now
    proc.wait()
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{checkout}: exit {proc.returncode}\n{''.join(lines)[-3000:]}")
    return {"wall": wall, "first line": first, "round 1": round1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE, help="git ref of the 'before' variant")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="fedcare-main-job-") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
            check=True, capture_output=True,
        )  # fmt: skip
        commit = subprocess.run(
            ["git", "-C", str(before), "rev-parse", "--short", "HEAD"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        variants = {f"before ({args.before} = {commit})": before, "after (working tree)": ROOT}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        try:
            for i in range(args.repeats):
                for name, checkout in variants.items():
                    r = one_run(checkout, Path(tmp) / f"run-{len(results[name])}-{i}-{id(name)}")
                    results[name].append(r)
                    print(
                        f"  run {i + 1}/{args.repeats} {name}: wall {r['wall']:.1f} s, first "
                        f"line {r['first line']:.1f} s, round 1 {r['round 1']:.1f} s",
                        flush=True,
                    )
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                check=False, capture_output=True,
            )  # fmt: skip
    print(f"\nfedcare simulate (defaults), median of {args.repeats} alternating runs:")
    print(f"  {'variant':<34} {'wall s':>8} {'first line s':>13} {'round 1 s':>10}")
    medians = {}
    for name, runs in results.items():
        medians[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        m = medians[name]
        print(f"  {name:<34} {m['wall']:>8.1f} {m['first line']:>13.1f} {m['round 1']:>10.1f}")
    b, a = (medians[name] for name in variants)
    print(
        f"  after / before: wall {a['wall'] / b['wall']:.2f}, round 1 {a['round 1'] / b['round 1']:.2f}"
    )


if __name__ == "__main__":
    main()
