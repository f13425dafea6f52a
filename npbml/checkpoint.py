"""Crash-safe checkpoints: atomic writes and readable errors on damaged files.

A checkpoint is a dict of tensors and plain Python values written with :func:`torch.save`.
:func:`save_checkpoint` writes a temporary file in the destination directory, fsyncs it and then
renames it over the destination with :func:`os.replace` (atomic on POSIX and Windows), so a crash
at any point leaves either the previous checkpoint or the new one, never a partial file. The file
gets the mode a plain ``open()`` gives (``0666`` less the umask), not the temp file's ``0600``.

Everything stored must be loadable with ``torch.load(weights_only=True)`` (tensors, numbers,
strings, lists, tuples, dicts), so loading a checkpoint never executes pickled code;
:func:`rng_state` and :func:`set_rng_state` convert the RNG states accordingly.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or incompatible."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` (temp file + fsync + os.replace); return the path."""
    return _atomic_write(path, lambda f: torch.save(state, f))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8), as :func:`save_checkpoint` does.

    Args:
        path: The destination file; its directory is created when missing.
        text: The complete new contents.

    Returns:
        The path written.
    """
    return _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Temp file in the destination directory, ``write`` into it, fsync, ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the
        # umask), as the other files of the run have.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Whatever went wrong (disk full, KeyboardInterrupt), the old file is untouched.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` naming the file when it is missing or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        detail = (str(e).splitlines() or ["no detail"])[0]
        detail = detail if len(detail) <= 120 else detail[:117] + "..."
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({type(e).__name__}: {detail}); "
            "delete it to start over, or use another checkpoint of the run (best.pt / last.pt)"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a checkpoint dict"
        )
    return state


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, and CUDA when present) RNG states, weights_only-safe."""
    py_version, py_internal, py_gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
