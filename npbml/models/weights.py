"""Backbone weight files: a pre-trained body saved with how to rebuild it, loaded by name.

Written by ``npbml pretrain`` (:func:`npbml.pretrain.pretrain_backbone`), read when a meta-learner
starts from a pre-trained body (NPBML's reference pipeline, docs/methods/npbml.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BACKBONE_FORMAT", "load_backbone_weights", "save_backbone"]

BACKBONE_FORMAT = "npbml-backbone"


def save_backbone(
    model: nn.Module, path: str | Path, model_name: str, model_kwargs: dict[str, Any], **meta: Any
) -> Path:
    """Write a pre-trained backbone (state dict, how to rebuild it, and ``meta``) to ``path``."""
    from npbml.checkpoint import save_checkpoint

    state = {
        "format": BACKBONE_FORMAT,
        "model": model_name,
        "model_kwargs": dict(model_kwargs),
        "state_dict": model.state_dict(),
    }
    return save_checkpoint(path, {**meta, **state})


def load_backbone_weights(
    model: nn.Module, path: str | Path, prefixes: tuple[str, ...] = ("blocks.",)
) -> list[str]:
    """Copy the entries of a :func:`save_backbone` checkpoint whose names start with
    ``prefixes`` (default: the body, not the head) into ``model``; returns the names loaded."""
    from npbml.checkpoint import CheckpointError, load_checkpoint

    state = load_checkpoint(path)
    if state.get("format") != BACKBONE_FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not a backbone checkpoint (write one with `npbml pretrain` or "
            "npbml.pretrain.save_backbone)"
        )
    saved = {k: v for k, v in state["state_dict"].items() if k.startswith(prefixes)}
    own = model.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" if k in own else f"{k} (missing)"
        for k, v in saved.items()
        if k not in own or own[k].shape != v.shape
    ]
    if bad or not saved:
        raise CheckpointError(
            f"backbone checkpoint {str(path)!r} does not fit this model ({state.get('model')} "
            f"{state.get('model_kwargs')}): {bad[:4] or 'no matching entries'}; pre-train the "
            "same architecture (model name and options) as the experiment"
        )
    missing = [k for k in own if k.startswith(prefixes) and k not in saved]
    if missing:
        raise CheckpointError(f"backbone checkpoint {str(path)!r} lacks {missing[:4]}")
    with torch.no_grad():
        for k, v in saved.items():
            own[k].copy_(v)
    return sorted(saved)
