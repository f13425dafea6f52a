"""One run directory: config snapshot and resumable check, metrics log, last and best checkpoints.

Meta-training (:mod:`npbml.train`), supervised fitting (:mod:`npbml.fit`) and the EvoMAL search
(:mod:`npbml.evomal.search`) keep their files the same way:

- a snapshot of the run's config (``config.yaml`` or ``config.json``);
- ``metrics.jsonl``: one JSON object per line, each with a ``"step"``; appended as the run goes
  and cut back to the checkpoint's step when the run resumes, so that a resumed run ends with the
  lines of an uninterrupted one (record layout below);
- ``last`` and ``best`` checkpoints, written atomically (:mod:`npbml.checkpoint`): a crash
  leaves the previous file or the new one, never a partial file. A ``.pt`` name is a torch
  checkpoint, a ``.json`` name a JSON document.

The metrics record layout, shared by ``npbml train`` and ``npbml fit`` (and read by
``npbml plot``): every record has ``"step"`` (the number of steps done when it was written;
meta-steps for ``train``, optimizer steps for ``fit``) and ``"split"``, one of

- ``"train"``: ``loss`` (mean over the steps since the last train record), ``accuracy`` when
  known (``train``), ``lr``, ``time_s`` (seconds since the process began training); ``fit``
  adds ``epoch``. A step whose loss or gradient was not finite was skipped and has a record of
  its own, ``{"step", "split": "train", "skipped": "nonfinite", ...}`` (values as strings);
- ``"validation"``: ``accuracy`` (and ``ci95``, ``tasks`` for episodes) and/or ``loss``,
  ``best`` (whether this validation wrote ``best.pt``);
- ``"test"``: ``loss``, ``accuracy``, and ``best_loss`` / ``best_accuracy`` of ``best.pt``,
  with ``"final": true``: the last record of a finished ``fit`` run (it also carries the keys
  of :func:`npbml.fit.fit`'s result, ``test_acc``, ...).

Files of the earlier ``npbml fit`` layout (records without ``"split"``) are read in this one
(:func:`upgrade_records`).

Whether a run may be resumed under a changed config is :meth:`RunDir.check_resumable`'s
decision: the dotted keys that differ, less those the caller declares harmless.

In a multi-process run only one process writes: the others hold a ``RunDir`` with
``writer=False``, whose writes do nothing, so the callers need no rank checks of their own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

from npbml.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from npbml.config import ConfigError

__all__ = ["RunDir", "check_resumable", "diff_mappings", "read_metrics", "upgrade_records"]


def diff_mappings(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two nested mappings (sorted, leaves only).

    Args:
        a: The first mapping (e.g. the config a run was started with).
        b: The second mapping (e.g. the config it is resumed with).

    Returns:
        The dotted paths of the differing leaves, in sorted key order at every level.
    """
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else str(k))
        elif x != y:
            out.append(prefix)

    # JSON round trip: tuples and lists (and other JSON-equal values) compare equal, as they
    # would after a snapshot was written and read back.
    walk(_plain(a), _plain(b), "")
    return out


def _plain(data: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(data))


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, Mapping):
            return None
        data = data.get(part)
    return data


def check_resumable(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    where: str,
    ignore: Collection[str] = (),
    tolerate: Callable[[list[str]], bool] | None = None,
) -> None:
    """:meth:`RunDir.check_resumable` for state that is not in a run directory of its own.

    Args:
        saved: The config the run was started with.
        current: The config it is being resumed with.
        where: What holds the run, for the message (a directory or a checkpoint file).
        ignore: Dotted keys that may change freely.
        tolerate: Called with the remaining changed keys; True accepts them.

    Raises:
        ConfigError: Naming the changed keys, their old and new values, and the ways out.
    """
    changed = [k for k in diff_mappings(saved, current) if k not in ignore]
    if not changed or (tolerate is not None and tolerate(changed)):
        return
    old, new = _plain(saved), _plain(current)
    detail = ", ".join(f"{k}: {_lookup(old, k)!r} -> {_lookup(new, k)!r}" for k in changed)
    raise ConfigError(
        f"{where} holds a run with a different config (changed: {', '.join(changed)}) "
        f"[{detail}]; resume with the same config, start over with --no-resume "
        "(resume=False), or choose another --out"
    )


def upgrade_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of the legacy ``npbml fit`` layout rewritten in the shared one (module docstring).

    Before the layouts were unified, ``npbml fit`` wrote one record per epoch, ``{"step",
    "epoch", "lr", "train_loss", "time", "val_loss", "val_acc", ...}``, and a last one
    ``{"step", "final": true, "test_loss", "test_acc", ...}``, none with a ``"split"``. Each
    epoch record becomes a ``train`` record (``loss``, ``lr``, the other keys) and a
    ``validation`` one (``loss``, ``accuracy``, ``best``: lowest validation loss so far); the
    final record gets ``split="test"``, ``loss``, ``accuracy`` and ``best_loss`` /
    ``best_accuracy`` besides its own keys. Other records (with a ``"split"``, or of another
log) are kept as they are.

    Args:
        records: Records in file order.

    Returns:
        The records in the shared layout.
    """
    out: list[dict[str, Any]] = []
    best = float("inf")
    for r in records:
        if "split" in r or not ("train_loss" in r or (r.get("final") and "test_loss" in r)):
            out.append(r)  # the shared layout, or another log (e.g. an EvoMAL search's)
        elif r.get("final"):
            named = {"loss": "test_loss", "accuracy": "test_acc"}
            named.update(best_loss="best_test_loss", best_accuracy="best_test_acc")
            out.append({"split": "test", **{k: r[o] for k, o in named.items() if o in r}, **r})
        else:
            train = {k: v for k, v in r.items() if not k.startswith("val_")}
            train = {"split": "train", **train}
            if "train_loss" in train:
                train["loss"] = train.pop("train_loss")
            out.append(train)
            if "val_loss" in r:
                val = {"step": r["step"], "split": "validation", "epoch": r.get("epoch")}
                val["loss"] = r["val_loss"]
                if "val_acc" in r:
                    val["accuracy"] = r["val_acc"]
                val["best"] = r["val_loss"] < best
                best = min(best, r["val_loss"])
                out.append(val)
    return out


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in the shared layout (module docstring).

    Args:
        path: The file; a missing file has no records.

    Returns:
        The records in file order, up to the first line that is not valid JSON (a line cut by a
        kill mid-write: everything after it is lost anyway); a file of the legacy
        ``npbml fit`` layout is read through :func:`upgrade_records`.
    """
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return upgrade_records(out)


class RunDir:
    """The files of one run in directory ``path``.

    Args:
        path: The run directory (created on the first write).
        config_name: File name of the config snapshot; ``.yaml``/``.yml`` or ``.json``.
        metrics_name: File name of the metrics log.
        last_name: File name of the latest checkpoint (``.pt``: torch, ``.json``: JSON).
        best_name: File name of the best checkpoint (same formats).
        writer: Whether this process writes (False on the non-main ranks of a multi-process
            run: every write is then skipped; reads still work).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        config_name: str = "config.yaml",
        metrics_name: str = "metrics.jsonl",
        last_name: str = "last.pt",
        best_name: str = "best.pt",
        writer: bool = True,
    ) -> None:
        self.path = Path(path)
        self.config_path = self.path / config_name
        self.metrics_path = self.path / metrics_name
        self.last_path = self.path / last_name
        self.best_path = self.path / best_name
        self.writer = writer

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, writer={self.writer})"

    # --- config snapshot -----------------------------------------------------------------------
    def save_config(self, config: Mapping[str, Any]) -> None:
        """Write the snapshot of the run's config (YAML or JSON by the file name), atomically.

        Args:
            config: The config as a plain nested mapping (``to_dict()`` of a config object).
        """
        if not self.writer:
            return
        if self.config_path.suffix in (".yaml", ".yml"):
            text = yaml.safe_dump(dict(config), sort_keys=False)
        else:
            text = json.dumps(config, indent=2)
        atomic_write_text(self.config_path, text)

    def saved_config(self) -> dict[str, Any] | None:
        """The config snapshot on disk, or None when there is none."""
        if not self.config_path.is_file():
            return None
        text = self.config_path.read_text()
        if self.config_path.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text) or {}
        return json.loads(text)

    def check_resumable(
        self,
        saved: Mapping[str, Any],
        current: Mapping[str, Any],
        *,
        ignore: Collection[str] = (),
        tolerate: Callable[[list[str]], bool] | None = None,
    ) -> None:
        """Refuse to continue a run whose config changed in a way that alters its course.

        Args:
            saved: The config the run was started with (from its checkpoint or snapshot).
            current: The config it is being resumed with.
            ignore: Dotted keys that may change freely (paths, thread counts, log intervals).
            tolerate: Called with the remaining changed keys; True accepts them (e.g. a longer
                run with a constant learning rate).

        Raises:
            ConfigError: Naming the changed keys, their old and new values, and the ways out.
        """
        check_resumable(saved, current, where=str(self.path), ignore=ignore, tolerate=tolerate)

    # --- metrics log ---------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of the metrics log (see :func:`read_metrics`)."""
        return read_metrics(self.metrics_path)

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one record (a JSON line) to the metrics log.

        Args:
            record: JSON-serialisable values, including ``"step"``.
        """
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Keep the records of steps ``<= step``: the log as it was when that checkpoint was made.

        Args:
            step: The step of the checkpoint being resumed.
        """
        if not self.writer:
            return
        kept = [r for r in self.read_metrics() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    # --- checkpoints ---------------------------------------------------------------------------
    def start_fresh(self) -> None:
        """Forget an earlier run in this directory: empty metrics log, no last/best checkpoint."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text("")
        for p in (self.last_path, self.best_path):
            p.unlink(missing_ok=True)

    def has_last(self) -> bool:
        """Whether there is a latest checkpoint to resume from."""
        return self.last_path.exists()

    def save_last(self, state: Mapping[str, Any]) -> None:
        """Atomically write the latest checkpoint.

        Args:
            state: A checkpoint dict (see :func:`npbml.checkpoint.save_checkpoint`), or a
                JSON-serialisable dict for a ``.json`` file name.
        """
        self._save(self.last_path, state, indent=None)

    def save_best(self, state: Mapping[str, Any]) -> None:
        """Atomically write the best checkpoint (same formats as :meth:`save_last`; a JSON one is
        indented for reading)."""
        self._save(self.best_path, state, indent=2)

    def load_last(self, map_location: Any = "cpu") -> dict[str, Any]:
        """The latest checkpoint.

        Args:
            map_location: Where tensors of a torch checkpoint go.

        Returns:
            The checkpoint dict.

        Raises:
            CheckpointError: The file is missing, truncated or corrupt.
        """
        return self._load(self.last_path, map_location)

    def load_best(self, map_location: Any = "cpu") -> dict[str, Any]:
        """The best checkpoint (see :meth:`load_last`)."""
        return self._load(self.best_path, map_location)

    def write_text(self, name: str, text: str) -> None:
        """Atomically write another file of the run (e.g. a hall of fame).

        Args:
            name: File name inside the run directory.
            text: Its complete contents.
        """
        if self.writer:
            atomic_write_text(self.path / name, text)

    def _save(self, path: Path, state: Mapping[str, Any], indent: int | None) -> None:
        if not self.writer:
            return
        if path.suffix == ".json":
            text = json.dumps(state, indent=indent)
            atomic_write_text(path, text if indent is None else text + "\n")
        else:
            save_checkpoint(path, dict(state))

    @staticmethod
    def _load(path: Path, map_location: Any) -> dict[str, Any]:
        if path.suffix == ".json":
            try:
                return json.loads(path.read_text())
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint {str(path)!r} not found") from None
            except json.JSONDecodeError as exc:
                raise CheckpointError(
                    f"{path} is not valid JSON ({exc}); delete it or pass --no-resume"
                ) from None
        return load_checkpoint(path, map_location=map_location)
