"""Shared test fixtures."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import NoReturn

import pytest

from tasks.omniglot import PACKAGED_ROOT, PACKAGED_SPLITS

# tests/l2l need learn2learn, which lives in its own venv (scripts/install_learn2learn.sh; `make
# test` runs them there); without it they are not collected.
collect_ignore = [] if importlib.util.find_spec("learn2learn") else ["l2l"]

# Real-data tests read the Omniglot minimal splits that ship inside the package (the path the
# loader reads when no root is given), so a plain clone runs every one of them.
OMNIGLOT_ROOT = PACKAGED_ROOT

#: Set by `make test` and `.ci/run` (and implied by ``CI``): a test that would skip because its
#: data is missing fails instead, so a lost data file cannot turn real-data tests into quiet skips.
REQUIRE_DATA_ENV = "NPBML_REQUIRE_DATA"

#: Words in a skip reason that mark it as "data missing" (see :func:`pytest_runtest_makereport`).
_DATA_SKIP = re.compile(r"(?i)\b(data|dataset|zip|not found|missing)\b")


def require_data() -> bool:
    """Whether a skip for missing data must fail this run (``NPBML_REQUIRE_DATA=1`` or ``CI``)."""
    flag = os.environ.get(REQUIRE_DATA_ENV) or os.environ.get("CI") or ""
    return flag.strip().lower() not in ("", "0", "false", "no")


def skip_missing_data(reason: str) -> NoReturn:
    """Skip the calling test because its data is absent, or fail it where data is required."""
    if require_data():
        pytest.fail(f"{reason} ({REQUIRE_DATA_ENV} or CI is set: missing data is a failure)")
    pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Under :func:`require_data`, turn any skip whose reason reads as "data missing" into a
    failure, whichever helper raised it, so a new data-dependent skip cannot pass CI quietly."""
    report = yield
    if report.skipped and require_data() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if _DATA_SKIP.search(reason):
            report.outcome = "failed"
            why = f"skipped for missing data while {REQUIRE_DATA_ENV}/CI is set: {reason}"
            report.longrepr = why
    return report


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The real Omniglot minimal splits (images_background_small1/2.zip), bundled in the package."""
    for split in PACKAGED_SPLITS:
        path = OMNIGLOT_ROOT / f"images_{split}.zip"
        if not path.is_file():
            skip_missing_data(f"real Omniglot data not found at {path}")
    return OMNIGLOT_ROOT


def tiny_fit_config(folder: Path, epochs: int = 2) -> dict:
    """An ``npbml fit`` config of 3 separable blobs in 4-D (60 rows, written to ``folder``), an
    8-unit MLP and batch 16: a run of a second or two for CLI and plot tests."""
    import numpy as np

    g = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = (g.normal(size=(3, 4)) * 3)[y] + g.normal(size=(60, 4)) * 0.3
    np.savez(folder / "d.npz", x=x.astype(np.float32), y=y)
    return {
        "data": {"kind": "arrays", "path": str(folder / "d.npz")},
        "model": {"name": "mlp", "hidden": [8]},
        "train": {"epochs": epochs, "batch_size": 16, "progress": False},
    }


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Run the suite on one torch thread: the tests use tiny models, for which intra-op threading
    costs more than it saves (measured several-fold slower with 2 threads on a 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
