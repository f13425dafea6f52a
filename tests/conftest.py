"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The repository and the read-only data folder sit side by side (/work/main and /work/shared
# locally; CI clones the repository with ../shared beside it).
OMNIGLOT_ROOT = Path(os.path.abspath(__file__)).parents[2] / "shared/data/omniglot"


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The real Omniglot minimal splits (images_background_small1/2.zip); skip if absent."""
    if not OMNIGLOT_ROOT.is_dir():
        pytest.skip(f"real Omniglot data not found at {OMNIGLOT_ROOT}")
    return OMNIGLOT_ROOT
