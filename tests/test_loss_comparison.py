"""scripts/loss_comparison.py: its confidence interval and the marked results section."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "loss_comparison.py"


@pytest.fixture(scope="module")
def lc():
    spec = importlib.util.spec_from_file_location("loss_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_ci_uses_student_t(lc):
    mean, half = lc.mean_ci([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert half == pytest.approx(4.303 * 0.1 / math.sqrt(3))  # s = 0.1, t_{0.975, 2}
    assert math.isnan(lc.mean_ci([0.5])[1])


def test_write_section_touches_only_its_markers(lc, tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# Results\n\nother section\n<!-- other:start -->\nkeep\n<!-- other:end -->\n")
    lc.write_section(path, f"{lc.START}\nfirst\n{lc.END}\n")
    lc.write_section(path, f"{lc.START}\nsecond\n{lc.END}\n")
    text = path.read_text()
    assert text.count(lc.START) == 1 and "second" in text and "first" not in text
    assert "other section\n<!-- other:start -->\nkeep\n<!-- other:end -->" in text
    path.write_text(text + "\ntrailing text\n")
    lc.write_section(path, f"{lc.START}\nthird\n{lc.END}\n")
    assert path.read_text().endswith("third\n" + lc.END + "\n\ntrailing text\n")
