"""Shared test fixtures."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# tests/l2l need learn2learn, which lives in its own venv (scripts/install_learn2learn.sh; `make
# test` runs them there); without it they are not collected.
collect_ignore = [] if importlib.util.find_spec("learn2learn") else ["l2l"]

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
