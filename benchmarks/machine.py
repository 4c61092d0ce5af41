"""What a benchmark ran on, for the lines it prints with its figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform``'s best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, e.g. ``"0.52, 3.74, 6.62"``."""
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def machine_line(*libraries: str) -> str:
    """One line for a benchmark's output: host, OS, CPUs and their model, memory, Python, the
    versions of ``libraries`` (importable module names) and the load average now."""
    import importlib

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = ", ".join(
        f"{name} {getattr(importlib.import_module(name), '__version__', '?')}" for name in libraries
    )
    return (
        f"machine: {platform.node()} {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs ({cpu_model()}), {mem:.0f} GiB; Python "
        f"{platform.python_version()}, {versions}; load average {load_average()}"
    )


__all__ = ["cpu_model", "load_average", "machine_line"]
