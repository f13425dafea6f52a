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


def test_fit_command_class_subset_and_learned_only_overrides(lc):
    args = lc.argparse.Namespace(
        epochs=3,
        classes=20,
        offline_steps=7,
        meta_lr=0.01,
        learned_set=["loss.inputs=log_prob"],
        set=["train.batch_size=32"],
        config="configs/fit_omniglot.yaml",
    )
    ce = lc.fit_command(args, "ce", 1, Path("out"), None)
    ml3 = lc.fit_command(args, "ml3", 1, Path("out"), None)
    assert "data.first_classes=20" in ce and "data.first_classes=20" in ml3
    assert "loss.inputs=log_prob" in ml3 and "loss.inputs=log_prob" not in ce
    assert "loss.offline_steps=7" in ml3 and "loss.offline_steps=7" not in ce
    assert ce[-1] == "train.batch_size=32" and ml3[-1] == "train.batch_size=32"


def test_markdown_uses_the_tag_markers_and_data_counts(lc, tmp_path):
    data = {
        "classes": 20,
        "first_classes": 20,
        "train_images": 240,
        "val_images": 60,
        "test_images": 100,
        "val_per_class": 3,
        "test_per_class": 5,
        "batch_size": 32,
        "steps_per_epoch": 8,
        "model": "conv4",
    }
    result = {"test_error": [0.1, 0.2, 0.3], "mean": 0.2, "ci95": 0.25, "best_mean": 0.2}
    summary = {
        "data": data,
        "learned_set": [],
        "model": "conv4",
        "budget": "3 epochs",
        "jobs": 1,
        "seeds": [0, 1, 2],
        "command": "python scripts/loss_comparison.py --classes 20",
        "evolved_source": "x",
        "results": {"ce": {**result, "seconds_mean": 5.0}},
    }
    text = lc.markdown(summary, "analysis here", tag="loss_comparison_c20")
    start, end = lc.markers("loss_comparison_c20")
    assert text.startswith(start) and text.rstrip().endswith(end)
    assert "20-class" in text and "100 images per seed" in text and "Balinese" in text
    assert "| cross-entropy | **20.00% +- 25.00%** | 10.0, 20.0, 30.0 |" in text
    assert "EvoMAL loss" not in text  # no evolved row
    summary["learned_set"] = ["loss.inputs=log_prob"]
    titled = lc.markdown(summary, "", tag="x")
    assert "learned-loss options" in titled and "`loss.inputs=log_prob`" in titled
    path = tmp_path / "r.md"
    lc.write_section(path, text, "loss_comparison_c20")
    lc.write_section(path, f"{lc.START}\nother\n{lc.END}\n")  # another tag leaves it alone
    assert "analysis here" in path.read_text() and "other" in path.read_text()
