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


__all__ = ["cpu_model", "load_average"]
