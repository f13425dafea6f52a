"""The tiny MAML run the training, CLI and distributed tests share: a 12-class glyph family of
16x16 images and a Conv4 with 4 strided filters (seconds per run on one CPU thread)."""

from __future__ import annotations

from typing import Any

GLYPHS = {
    "name": "glyphs",
    "ways": 3,
    "shots": 1,
    "queries": 2,
    "options": {
        "num_train": 12,
        "num_validation": 6,
        "num_test": 6,
        "images_per_class": 4,
        "image_size": 16,
    },
}
CONV4 = {"name": "conv4", "options": {"hidden": 4, "variant": "strided"}}
MAML_1STEP = {"name": "maml", "inner_lr": 0.4, "inner_steps": 1}


def tiny_run(train: dict[str, Any], **algorithm: Any) -> dict[str, Any]:
    """A config dict: the tiny data and model, MAML (``algorithm`` entries override it) and
    ``train``. Fresh nested dicts every call, so callers may modify the result."""
    import copy

    return copy.deepcopy(
        {"data": GLYPHS, "model": CONV4, "algorithm": {**MAML_1STEP, **algorithm}, "train": train}
    )
