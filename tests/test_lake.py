"""tasks.lake on a generated copy of all_runs in the exact on-disk format (zip and folder)."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.errors import CorruptDatasetError, DatasetNotFoundError
from tasks.lake import LAKE_RUNS_URL, LakeRuns, lake_error_rate
from tasks.omniglot import preprocess

RUNS, WAYS = 20, 20


def _drawing(run: int, kind: int, k: int) -> np.ndarray:
    """A distinct 105x105 1-bit drawing (True = white paper) for each (run, kind, k)."""
    a = np.ones((105, 105), dtype=bool)
    a[10 + 4 * k : 14 + 4 * k, 5 : 5 + 4 * run + 4] = False  # position encodes k, length run
    a[90:95, 10 + 40 * kind : 20 + 40 * kind] = False
    return a


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def _answer(run: int, item: int) -> int:
    """0-based class of test item ``item`` in ``run``: a non-identity permutation."""
    return (7 * item + run) % WAYS


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    """rel path (as in class_labels.txt) -> bytes, for all 20 runs."""
    out: dict[str, bytes] = {}
    for r in range(1, RUNS + 1):
        run = f"run{r:02d}"
        lines = []
        for i in range(WAYS):
            out[f"{run}/training/class{i + 1:02d}.png"] = _png(_drawing(r, 0, i))
            out[f"{run}/test/item{i + 1:02d}.png"] = _png(_drawing(r, 1, i))
            lines.append(
                f"{run}/test/item{i + 1:02d}.png {run}/training/class{_answer(r, i) + 1:02d}.png"
            )
        # Shuffled line order and CRLF endings: the loader must not depend on either.
        lines = lines[::-1]
        out[f"{run}/class_labels.txt"] = ("\r\n".join(lines) + "\r\n").encode()
    return out


def _write_folder(base: Path, files: dict[str, bytes], skip: str | None = None) -> Path:
    for rel, data in files.items():
        if rel == skip:
            continue
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return base


def _write_zip(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in files.items():
            zf.writestr(prefix + rel, data)
    return path


@pytest.fixture(scope="module")
def runs_zip(files: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> LakeRuns:
    root = tmp_path_factory.mktemp("lake_zip")
    _write_zip(root / "all_runs.zip", files)
    return LakeRuns(root)


def _check(runs: LakeRuns) -> None:
    assert len(runs) == 20 and runs.num_items == 400
    for r in (0, 7, 19):
        ep = runs.episode(r)
        assert ep.support_x.shape == (20, 1, 28, 28) and ep.query_x.shape == (20, 1, 28, 28)
        assert ep.support_x.dtype == torch.float32
        assert ep.support_y.tolist() == list(range(20))
        assert ep.classes.tolist() == list(range(20))
        # Labels come from class_labels.txt, not from file order.
        assert ep.query_y.tolist() == [_answer(r + 1, i) for i in range(20)]
        assert ep.query_y.tolist() != list(range(20))
        # Support k is classNN with NN = k + 1, query i is itemNN with NN = i + 1, preprocessed
        # like Omniglot (ink = 1, LANCZOS to 28x28).
        for k in (0, 13):
            exp = preprocess(Image.fromarray(_drawing(r + 1, 0, k)).convert("1"), 28)
            assert torch.equal(ep.support_x[k, 0], torch.from_numpy(exp).float() / 255)
            exp = preprocess(Image.fromarray(_drawing(r + 1, 1, k)).convert("1"), 28)
            assert torch.equal(ep.query_x[k, 0], torch.from_numpy(exp).float() / 255)
        assert ep.support_x.max() > 0.9 and ep.support_x.mean() < 0.3


def test_zip_without_prefix(runs_zip: LakeRuns) -> None:
    _check(runs_zip)
    assert len(runs_zip.episodes()) == 20
    assert runs_zip.support_files[0][0] == "run01/training/class01.png"


def test_zip_with_prefix_and_folders_agree(
    files: dict[str, bytes], runs_zip: LakeRuns, tmp_path: Path
) -> None:
    z = _write_zip(tmp_path / "elsewhere.zip", files, prefix="all_runs/")
    folder = _write_folder(tmp_path / "extracted" / "all_runs", files)
    for runs in (LakeRuns(z), LakeRuns(folder), LakeRuns(folder.parent)):
        _check(runs)
        for r in (0, 19):
            a, b = runs.episode(r), runs_zip.episode(r)
            assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)


def test_full_size_images_are_inverted_pixels(files: dict[str, bytes], tmp_path: Path) -> None:
    runs = LakeRuns(_write_folder(tmp_path, files), image_size=105)
    ep = runs.episode(4)
    expected = torch.from_numpy(~_drawing(5, 0, 3)).float()
    assert torch.equal(ep.support_x[3, 0], expected)


def test_error_rate(runs_zip: LakeRuns) -> None:
    truth = [runs_zip.episode(r).query_y for r in range(20)]
    assert runs_zip.error_rate(truth) == 0.0
    zeros = [[0] * 20 for _ in range(20)]
    expected = sum(int((t != 0).sum()) for t in truth) / 400
    assert runs_zip.error_rate(zeros) == pytest.approx(expected)
    assert lake_error_rate(zeros, truth) == pytest.approx(expected)
    one_wrong = [t.clone() for t in truth]
    one_wrong[3][5] = (one_wrong[3][5] + 1) % 20
    assert runs_zip.error_rate(torch.stack(one_wrong)) == pytest.approx(1 / 400)
    with pytest.raises(ValueError, match="expected 20"):
        runs_zip.error_rate(truth[:19])
    with pytest.raises(ValueError, match="argmax"):
        runs_zip.error_rate(torch.zeros(20, 20, 20))


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as e:
        LakeRuns(tmp_path / "nothing")
    assert "all_runs.zip" in str(e.value) and LAKE_RUNS_URL in str(e.value)
    with pytest.raises(DatasetNotFoundError):
        LakeRuns(tmp_path)  # exists, but holds no runs


def test_missing_labels_file(files: dict[str, bytes], tmp_path: Path) -> None:
    base = _write_folder(tmp_path / "f", files, skip="run07/class_labels.txt")
    with pytest.raises(CorruptDatasetError, match=r"run07/class_labels\.txt is missing"):
        LakeRuns(base)
    z = _write_zip(
        tmp_path / "all_runs.zip",
        {k: v for k, v in files.items() if k != "run07/class_labels.txt"},
    )
    with pytest.raises(CorruptDatasetError, match=r"run07/class_labels\.txt is missing"):
        LakeRuns(z)


def test_missing_image_and_malformed_labels(files: dict[str, bytes], tmp_path: Path) -> None:
    base = _write_folder(tmp_path / "f", files, skip="run02/training/class05.png")
    with pytest.raises(CorruptDatasetError, match=r"run02/training/class05\.png"):
        LakeRuns(base)
    bad = dict(files)
    bad["run03/class_labels.txt"] = b"run03/test/item01.png\n"
    with pytest.raises(CorruptDatasetError, match="line 1"):
        LakeRuns(_write_folder(tmp_path / "g", bad))
    bad = dict(files)
    bad["run04/test/item02.png"] = b"not a png"
    with pytest.raises(CorruptDatasetError, match=r"run04/test/item02\.png"):
        LakeRuns(_write_folder(tmp_path / "h", bad))


def test_incomplete_runs_and_truncated_zip(
    files: dict[str, bytes], runs_zip: LakeRuns, tmp_path: Path
) -> None:
    base = _write_folder(tmp_path / "f", files)
    shutil.rmtree(base / "run20")
    with pytest.raises(CorruptDatasetError, match="19 runs"):
        LakeRuns(base)
    assert len(LakeRuns(base, num_runs=None)) == 19
    data = runs_zip.source.read_bytes()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "all_runs.zip").write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptDatasetError, match="not a readable zip"):
        LakeRuns(tmp_path / "t")
    with pytest.raises(IndexError):
        runs_zip.episode(20)
