"""The demo's files are package data (issue 14): a wheel carries the demo configs and the bundled
Omniglot zips, so that ``npbml demo`` runs from any folder after ``pip install .``.
scripts/check_wheel.sh goes further: it installs the wheel in a fresh venv and runs the demo."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from npbml.cli import demo

ROOT = Path(__file__).resolve().parents[1]


def _required() -> set[str]:
    """Every file the demo reads, as a path inside the wheel."""
    from tasks.omniglot import PACKAGED_SPLITS, split_filename

    files = {f"npbml/configs/{r.config}" for runs in demo.DEMO_FAMILIES.values() for r in runs}
    files |= {f"tasks/data/omniglot/{split_filename(s)}.zip" for s in PACKAGED_SPLITS}
    return files | {"tasks/data/omniglot/LICENSE", "tasks/data/omniglot/README.md"}


def test_package_data_globs_match_the_demo_files():
    tomllib = pytest.importorskip("tomllib")
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    matched = set()
    for package, globs in package_data.items():
        for g in globs:
            hits = [p.relative_to(ROOT).as_posix() for p in (ROOT / package).glob(g)]
            assert hits, f"package-data glob {package}/{g} matches no file"
            matched |= set(hits)
    missing = sorted(f for f in _required() if f not in matched)
    assert not missing, f"demo files not in [tool.setuptools.package-data]: {missing}"
    for f in _required():
        assert (ROOT / f).is_file() and not (ROOT / f).is_symlink(), f


def _can_build_wheels() -> bool:
    """setuptools >= 70.1 builds wheels itself; older ones need the wheel package."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or _importable("wheel")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_built_wheel_contains_the_configs_and_the_zips(tmp_path):
    if not _can_build_wheels():
        pytest.skip("no offline wheel build here (needs setuptools >= 70.1 or wheel)")
    src = tmp_path / "src"
    for name in ("npbml", "tasks"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation"]
    out = subprocess.run(
        [*cmd, "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("npbml-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(_required() - names)
    assert not missing, f"the wheel lacks {missing}"
    assert not fnmatch.filter(names, "configs/*")  # only the package's own copy, no top level
    from tasks.omniglot import PACKAGED_ROOT

    for f in fnmatch.filter(sorted(names), "tasks/data/omniglot/*.zip"):
        assert zipfile.ZipFile(wheel).read(f) == (PACKAGED_ROOT / Path(f).name).read_bytes()
