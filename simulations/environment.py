"""Process environment every fedcare command sets before Flower, Ray or datasets load.

No telemetry, no update checks, no runtime dependency installation, no hub downloads.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray's usage-stats reporting
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def apply_offline_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set :data:`OFFLINE_ENV` in ``env`` (default: ``os.environ``) and return it."""
    target = os.environ if env is None else env
    target.update(OFFLINE_ENV)
    return target  # type: ignore[return-value]
