"""The learn2learn integration tests run only where learn2learn 0.2.0 imports: the separate venv
built by scripts/install_learn2learn.sh (``make test`` builds it once per machine and runs these
tests with it). tests/conftest.py keeps this folder out of runs without learn2learn."""

from __future__ import annotations

try:
    import learn2learn  # noqa: F401
except ImportError as exc:  # an explicit `pytest tests/l2l` in the wrong venv
    raise ImportError(
        "tests/l2l need learn2learn 0.2.0, which is not importable here. Run them with the venv "
        "from scripts/install_learn2learn.sh: `make test-l2l` (builds it in the user cache), or "
        "`<venv>/bin/python -m pytest tests/l2l` with the repository on PYTHONPATH"
    ) from exc
