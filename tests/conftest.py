"""Shared fixtures. Real datasets are read from ../shared/data, or from $FEDCARE_SHARED_DATA
(never copied into the repo); tests that need one skip with the reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared_models.runtime import apply_offline_env

apply_offline_env()

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDCARE_SHARED_DATA") or ROOT.parent / "shared" / "data")
HEART_DIR = SHARED_DATA / "heart_disease_uci"
PNEUMONIA_DIR = SHARED_DATA / "pneumoniamnist"
PHYSIONET_DIR = SHARED_DATA / "physionet2012"


@pytest.fixture
def heart_dir() -> Path:
    if not (HEART_DIR / "processed.cleveland.data").exists():
        pytest.skip(
            f"UCI heart-disease files not found in {HEART_DIR} (../shared/data is absent; set FEDCARE_SHARED_DATA)"
        )
    return HEART_DIR


@pytest.fixture
def pneumonia_dir() -> Path:
    if not (PNEUMONIA_DIR / "pneumoniamnist.npz").exists():
        pytest.skip(
            f"pneumoniamnist.npz not found in {PNEUMONIA_DIR} (../shared/data is absent; "
            "set FEDCARE_SHARED_DATA)"
        )
    return PNEUMONIA_DIR


@pytest.fixture
def physionet_dir() -> Path:
    """The folder holding PhysioNet 2012 set-a.tar.gz (FEDCARE_SHARED_DATA/physionet2012)."""
    if not (PHYSIONET_DIR / "set-a.tar.gz").exists():
        pytest.skip(
            f"PhysioNet 2012 set-a.tar.gz not found in {PHYSIONET_DIR} (set FEDCARE_SHARED_DATA "
            "to the shared data folder)"
        )
    return PHYSIONET_DIR


@pytest.fixture
def default_cfg() -> dict:
    """The run-config schema's defaults (pyproject.toml), flat."""
    from server.run_config import default_run_config

    return default_run_config()
