"""Shared fixtures: the real data in ../shared/data and a tiny trained model.

Tests that need the real data skip with a reason when the folder is absent. The folder can be
moved with the environment variable ``STPREDICT_SHARED_DATA``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STPREDICT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (set STPREDICT_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real public data (``../shared/data``)."""
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def wsi_dir(shared_data: Path) -> Path:
    """Real slide files for reader tests."""
    return _need(shared_data / "wsi")


@pytest.fixture(scope="session")
def her2st_dir(shared_data: Path) -> Path:
    """HER2ST legacy ST sections (counts, spots, images, labels)."""
    return _need(shared_data / "her2st")


@pytest.fixture(scope="session")
def mob_dir(shared_data: Path) -> Path:
    """STUtility mouse olfactory bulb sections."""
    return _need(shared_data / "mob")


@pytest.fixture(scope="session")
def benchmarks_data_dir() -> Path:
    """The manifests under benchmarks/data (they point at ../shared/data)."""
    return REPO_ROOT / "benchmarks" / "data"
