"""The conftest switch that turns skips for missing data into failures under `make test` and CI."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

_TESTS = """
import pytest
from conftest import skip_missing_data

def test_helper():
    skip_missing_data("real Omniglot data not found at /nowhere")

def test_any_data_skip():
    pytest.skip("dataset not found: /nowhere/fashion-mnist")

def test_other_skip():
    pytest.skip("no /proc/self/task on this system")
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> pytest.Pytester:
    pytester.makeconftest(request.config.rootpath.joinpath("tests/conftest.py").read_text())
    pytester.makepyfile(test_it=_TESTS)
    return pytester


@pytest.mark.parametrize("env", [{}, {"NPBML_REQUIRE_DATA": "0", "CI": "false"}])
def test_data_skips_skip_when_data_is_not_required(suite, monkeypatch, env):
    monkeypatch.delenv("NPBML_REQUIRE_DATA", raising=False)
    monkeypatch.delenv("CI", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    suite.runpytest("-p", "no:cacheprovider").assert_outcomes(skipped=3)


@pytest.mark.parametrize("env", [{"NPBML_REQUIRE_DATA": "1"}, {"CI": "true"}])
def test_data_skips_fail_when_data_is_required(suite, monkeypatch, env):
    monkeypatch.delenv("NPBML_REQUIRE_DATA", raising=False)
    monkeypatch.delenv("CI", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = suite.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(failed=2, skipped=1)
    result.stdout.fnmatch_lines(["*missing data is a failure*", "*skipped for missing data*"])
