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


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Run the suite on one torch thread: the tests use tiny models, for which intra-op threading
    costs more than it saves (measured several-fold slower with 2 threads on a 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
