"""Shared fixtures. Real datasets are read from $FEDCARE_SHARED_DATA (default ../shared/data beside
the repository; never copied into it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared_models.runtime import apply_offline_env

apply_offline_env()

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDCARE_SHARED_DATA", ROOT.parent / "shared" / "data"))
HEART_DIR = SHARED_DATA / "heart_disease_uci"


@pytest.fixture
def heart_dir() -> Path:
    if not (HEART_DIR / "processed.cleveland.data").exists():
        pytest.skip(f"UCI heart-disease files not found in {HEART_DIR} (../shared/data is absent)")
    return HEART_DIR


@pytest.fixture
def default_cfg() -> dict:
    """The run-config schema's defaults (pyproject.toml), flat."""
    from server.run_config import default_run_config

    return default_run_config()
