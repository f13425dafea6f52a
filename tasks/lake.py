"""The one-shot classification benchmark of Lake et al. (Science 2015): 20 fixed runs of 20-way
within-alphabet one-shot classification on Omniglot's evaluation alphabets.

On-disk format (docs/data-formats.md): ``all_runs.zip`` or its extracted folder, holding
``run01`` .. ``run20``, each with ``training/classNN.png`` (one drawing per class),
``test/itemNN.png`` (the drawings to classify) and ``class_labels.txt`` whose lines read
``runXX/test/itemNN.png runXX/training/classMM.png`` (paths relative to the folder holding the
runs). The score is the error rate over all 400 test items.

Images get the same preprocessing as :class:`tasks.omniglot.Omniglot` (ink = 1, resized to
``image_size`` with LANCZOS). Within a run, support label ``k`` is the ``k``-th training image in
sorted file order (``class01.png`` -> 0, ...), queries are the test items listed in
``class_labels.txt`` in sorted file order, and ``Episode.classes`` is ``arange(N)``, following
the reference ``demo_classification.py`` of the Omniglot repository (which sorts both lists).

No download is offered: no md5 is published for ``all_runs.zip``, and unverified downloads
are not allowed. Get it from :data:`LAKE_RUNS_URL`.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from tasks.episode import Episode
from tasks.errors import CorruptDatasetError, DatasetNotFoundError
from tasks.omniglot import decode_image

LAKE_RUNS_URL = (
    "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
    "one-shot-classification/all_runs.zip"
)
LABELS_FILE = "class_labels.txt"
NUM_RUNS = 20
_RUN_RE = re.compile(r"^run\d+$")


def _find_source(root: Path) -> Path | None:
    """all_runs.zip, or the folder directly holding the runNN folders."""
    if root.is_file():
        return root
    if not root.is_dir():
        return None
    if (root / "all_runs.zip").is_file():
        return root / "all_runs.zip"
    for base in (root, root / "all_runs"):
        if base.is_dir() and any(p.is_dir() and _RUN_RE.match(p.name) for p in base.iterdir()):
            return base
    return None


class _Files:
    """Read access to the files of the runs, by path relative to the folder holding the runs."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.fix = (
            f"the copy at {source} is damaged or incomplete: delete it and download "
            f"all_runs.zip again from {LAKE_RUNS_URL}"
        )
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        if source.is_dir():
            self.base = source
            self.runs = sorted(
                p.name for p in source.iterdir() if p.is_dir() and _RUN_RE.match(p.name)
            )
            return
        try:
            self._zip = zipfile.ZipFile(source)
            names = self._zip.namelist()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise CorruptDatasetError(f"{source} is not a readable zip ({e}); {self.fix}") from e
        # Runs may sit at the top of the zip or under a folder (all_runs/run01/...): strip the
        # prefix that precedes the run folders.
        runs, prefix = set(), None
        for name in names:
            parts = PurePosixPath(name).parts
            for i, part in enumerate(parts[:-1]):
                if _RUN_RE.match(part) and not any(p.startswith(("__", ".")) for p in parts):
                    runs.add(part)
                    prefix = prefix if prefix is not None else "/".join(parts[:i])
                    break
        self.runs = sorted(runs)
        pre = f"{prefix}/" if prefix else ""
        self._members = {n[len(pre) :]: n for n in names if n.startswith(pre) and n[-1] != "/"}

    def exists(self, rel: str) -> bool:
        if self._zip is None:
            return (self.base / rel).is_file()
        return rel in self._members

    def listdir(self, rel: str) -> list[str]:
        if self._zip is None:
            d = self.base / rel
            return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []
        pre = rel.rstrip("/") + "/"
        return sorted(
            k[len(pre) :] for k in self._members if k.startswith(pre) and "/" not in k[len(pre) :]
        )

    def read(self, rel: str) -> bytes:
        if not self.exists(rel):
            raise CorruptDatasetError(f"{rel} is missing from {self.source}; {self.fix}")
        try:
            if self._zip is None:
                return (self.base / rel).read_bytes()
            return self._zip.read(self._members[rel])
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise CorruptDatasetError(f"cannot read {rel} in {self.source}: {e}; {self.fix}") from e

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


class LakeRuns:
    """The 20 runs of Lake et al. (2015)'s 20-way one-shot benchmark, as Episodes.

    ``root`` is ``all_runs.zip``, a folder holding it, a folder ``all_runs/``, or the folder that
    holds ``run01`` .. ``run20`` directly. All images are decoded once at construction.
    ``num_runs`` is the number of runs required (20 for the published benchmark; ``None``
    accepts any number), so an incomplete copy cannot silently give a non-comparable score.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_size: int = 28,
        num_runs: int | None = NUM_RUNS,
    ) -> None:
        root = Path(root).expanduser()
        source = _find_source(root)
        if source is None:
            raise DatasetNotFoundError(
                f"Lake et al. one-shot runs not found at {root}: expected all_runs.zip, or a "
                "folder holding run01 .. run20 (each with training/, test/ and "
                f"{LABELS_FILE}). Download all_runs.zip from {LAKE_RUNS_URL} and pass its path "
                "(no automatic download: no published md5 to verify it against)."
            )
        self.source, self.image_size = source, int(image_size)
        files = _Files(source)
        try:
            if not files.runs:
                raise CorruptDatasetError(f"{source} holds no runNN folders; {files.fix}")
            if num_runs is not None and len(files.runs) != num_runs:
                raise CorruptDatasetError(
                    f"{source} holds {len(files.runs)} runs ({', '.join(files.runs)}), "
                    f"expected {num_runs}; {files.fix} (or pass num_runs=None)"
                )
            self.run_names: list[str] = list(files.runs)
            self._support: list[torch.Tensor] = []
            self._query: list[torch.Tensor] = []
            self._targets: list[torch.Tensor] = []
            self.support_files: list[list[str]] = []
            self.query_files: list[list[str]] = []
            for run in self.run_names:
                self._load_run(files, run)
        finally:
            files.close()

    def _load_run(self, files: _Files, run: str) -> None:
        labels_rel = f"{run}/{LABELS_FILE}"
        if not files.exists(labels_rel):
            raise CorruptDatasetError(f"{labels_rel} is missing from {files.source}; {files.fix}")
        text = files.read(labels_rel).decode("utf-8", errors="replace")
        answers: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise CorruptDatasetError(
                    f"{labels_rel} line {lineno} should be '<test image> <training image>', got "
                    f"{line.strip()!r}; {files.fix}"
                )
            answers[fields[0]] = fields[1]
        if not answers:
            raise CorruptDatasetError(f"{labels_rel} lists no test items; {files.fix}")
        support = [
            f"{run}/training/{n}" for n in files.listdir(f"{run}/training") if n.endswith(".png")
        ]
        for train_file in answers.values():
            if train_file not in support:
                raise CorruptDatasetError(
                    f"{labels_rel} names {train_file}, which is missing from {files.source}; "
                    f"{files.fix}"
                )
        query = sorted(answers)
        index = {f: k for k, f in enumerate(support)}
        fix = files.fix
        S = self.image_size

        def decode(rel: str) -> np.ndarray:
            return decode_image(files.read(rel), S, f"{rel} in {files.source}", fix)

        self._support.append(torch.from_numpy(np.stack([decode(f) for f in support]))[:, None])
        self._query.append(torch.from_numpy(np.stack([decode(f) for f in query]))[:, None])
        self._targets.append(torch.as_tensor([index[answers[q]] for q in query]))
        self.support_files.append(support)
        self.query_files.append(query)

    def __len__(self) -> int:
        return len(self.run_names)

    def episode(self, r: int) -> Episode:
        """Run ``r`` (0-based: ``episode(0)`` is ``run01``) as an Episode with float images."""
        if not 0 <= r < len(self):
            raise IndexError(f"run {r} out of range: there are {len(self)} runs (0-based)")
        n = len(self._support[r])
        return Episode(
            support_x=self._support[r].float().div_(255.0),
            support_y=torch.arange(n, dtype=torch.int64),
            query_x=self._query[r].float().div_(255.0),
            query_y=self._targets[r].clone(),
            classes=torch.arange(n, dtype=torch.int64),
        )

    def episodes(self) -> list[Episode]:
        """All runs in order."""
        return [self.episode(r) for r in range(len(self))]

    @property
    def num_items(self) -> int:
        """Number of test items over all runs (400 for the published benchmark)."""
        return sum(len(t) for t in self._targets)

    def error_rate(self, predictions: Sequence[Sequence[int]] | torch.Tensor) -> float:
        """Fraction of misclassified test items over all runs (Lake et al. 2015's score).

        ``predictions[r][i]`` is the predicted label (0-based support index) of query ``i`` of
        run ``r``; pass labels (e.g. ``logits.argmax(-1)``), not scores.
        """
        if len(predictions) != len(self):
            raise ValueError(f"got predictions for {len(predictions)} runs, expected {len(self)}")
        wrong = 0
        for r, (pred, target) in enumerate(zip(predictions, self._targets)):
            p = pred if torch.is_tensor(pred) else torch.as_tensor(np.asarray(pred))
            if p.dim() != 1 or p.numel() != target.numel() or p.is_floating_point():
                raise ValueError(
                    f"predictions for run {r} must be {target.numel()} integer labels, got "
                    f"shape {tuple(p.shape)} dtype {p.dtype}; take argmax over classes first"
                )
            wrong += int((p.cpu().long() != target).sum())
        return wrong / self.num_items

    def __repr__(self) -> str:
        return (
            f"LakeRuns({len(self)} runs, {self.num_items} test items, source={str(self.source)!r})"
        )


def lake_error_rate(
    predictions: Sequence[Sequence[int]] | torch.Tensor,
    targets: Sequence[Sequence[int]] | torch.Tensor,
) -> float:
    """Error rate over all items of all runs given per-run predicted and true labels."""
    p = [torch.as_tensor(np.asarray(x)).reshape(-1) for x in predictions]
    t = [torch.as_tensor(np.asarray(x)).reshape(-1) for x in targets]
    if len(p) != len(t) or any(a.shape != b.shape for a, b in zip(p, t)):
        raise ValueError("predictions and targets must have the same runs and items per run")
    return sum(int((a != b).sum()) for a, b in zip(p, t)) / sum(b.numel() for b in t)
