"""The former top-level paths of NPBML's layers still import, for one release, with a warning."""

import importlib
import sys

import pytest

# old path -> a name it re-exports (the object must be the new module's own)
MOVED = {
    "film": "FiLMGenerator",
    "warp": "WarpLayer",
    "relation": "RelationNetwork",
    "task_loss": "TaskAdaptiveLoss",
    "norm": "batch_norm",
    "unfold": "Unfolded",
}


@pytest.mark.parametrize("name", sorted(MOVED))
def test_old_path_warns_and_reexports_the_new_module(name):
    old, new = f"npbml.{name}", f"npbml.algorithms.npbml.layers.{name}"
    sys.modules.pop(old, None)  # executes the shim afresh, whatever imported it before
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}; the old path will be"):
        shim = importlib.import_module(old)
    assert getattr(shim, MOVED[name]) is getattr(importlib.import_module(new), MOVED[name])
