"""Loss functions with one interface, ``loss(predictions, targets) -> scalar``.

Usable as the inner-loop loss of any meta-learner and as the loss of ordinary training.
:func:`build_loss` builds one by name: ``"ce"``, ``"label_smoothing"``, ``"sparse_lsr"``,
``"mean_squared_error"`` (regression), ``"learned"`` (a loss network, fresh or loaded from a
``state_dict`` file) and ``"evolved"`` (a symbolic EvoMAL loss loaded from its JSON file).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from npbml.losses.base import LossFn
from npbml.losses.cross_entropy import CrossEntropy
from npbml.losses.label_smoothing import LabelSmoothingCE, label_smoothing_ce
from npbml.losses.learned import (
    LearnedLoss,
    all_finite,
    restore_parameters,
    snapshot_parameters,
)
from npbml.losses.mse import MeanSquaredError
from npbml.losses.sparse_lsr import SparseLSR, sparse_label_smoothing


def _evolved_loss(checkpoint: str | Path | None = None) -> nn.Module:
    # The expression language lives with the EvoMAL search; imported on use, since the search
    # itself builds on this package.
    from npbml.evomal.expression import load_evolved_loss

    if checkpoint is None:
        raise ValueError(
            "the 'evolved' loss is loaded from a file: pass checkpoint=<an `npbml evolve` output "
            "folder or a JSON file written by EvolvedLoss.save>"
        )
    return load_evolved_loss(checkpoint)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": CrossEntropy,
    "label_smoothing": LabelSmoothingCE,
    "sparse_lsr": SparseLSR,
    "mean_squared_error": MeanSquaredError,
    "learned": LearnedLoss,
    "evolved": _evolved_loss,
}
# The tasks each loss applies to (every other loss is for classification only).
LOSS_TASKS: dict[str, tuple[str, ...]] = {
    "mean_squared_error": ("regression",),
    "learned": ("classification", "regression"),
}
# Losses whose constructor takes the task (the others fix it).
_TAKES_TASK = {"learned"}
# Losses read from a file: the factory takes ``checkpoint`` itself, or a module gets the
# ``state_dict`` saved there.
_FACTORY_READS_CHECKPOINT = {"evolved"}
_LOADS_STATE_DICT = {"learned"}


def build_loss(
    name: str,
    *,
    task: str = "classification",
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a loss module by name (see :data:`LOSSES`).

    Example: ``build_loss("sparse_lsr", smoothing=0.1)``,
    ``build_loss("learned", task="regression", checkpoint="loss_net.pt")``.

    Args:
        name: A key of :data:`LOSSES`.
        task: ``"classification"`` or ``"regression"``; a loss that does not apply to it
            (:data:`LOSS_TASKS`) is an error.
        checkpoint: ``"learned"``: a ``state_dict`` file of the network (else freshly
            initialised); ``"evolved"``: an ``npbml evolve`` output folder or a JSON file
            written by ``EvolvedLoss.save`` (required).
        **kwargs: Constructor arguments of the loss.

    Returns:
        The loss module (on the CPU).

    Raises:
        ValueError: An unknown name, a loss used for the wrong task, or a checkpoint given to a
            loss that reads none.
        TypeError: Arguments the loss's constructor does not take.
        FileNotFoundError: A missing ``evolved`` loss file.
    """
    try:
        factory = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; available: {sorted(LOSSES)}") from None
    tasks = LOSS_TASKS.get(name, ("classification",))
    if task not in tasks:
        raise ValueError(
            f"loss {name!r} is a {' or '.join(tasks)} loss, not for task {task!r}; choose one "
            f"of {sorted(k for k in LOSSES if task in LOSS_TASKS.get(k, ('classification',)))}"
        )
    if checkpoint is not None and name not in _FACTORY_READS_CHECKPOINT | _LOADS_STATE_DICT:
        raise ValueError(f"loss {name!r} is not read from a file; drop the checkpoint")
    if name in _TAKES_TASK:
        kwargs["task"] = task
    if name in _FACTORY_READS_CHECKPOINT:
        kwargs["checkpoint"] = checkpoint
    try:
        loss = factory(**kwargs)
    except TypeError as err:
        raise TypeError(f"bad arguments for loss {name!r}: {err}") from err
    if checkpoint is not None and name in _LOADS_STATE_DICT:
        loss.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return loss


__all__ = [
    "LOSSES",
    "LOSS_TASKS",
    "CrossEntropy",
    "LabelSmoothingCE",
    "LearnedLoss",
    "LossFn",
    "MeanSquaredError",
    "SparseLSR",
    "all_finite",
    "build_loss",
    "label_smoothing_ce",
    "restore_parameters",
    "snapshot_parameters",
    "sparse_label_smoothing",
]
