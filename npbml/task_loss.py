"""Deprecated path, removed in the next release: this module moved to
:mod:`npbml.algorithms.npbml.layers.task_loss`."""

import warnings

from npbml.algorithms.npbml.layers.task_loss import *  # noqa: F403

warnings.warn(
    "npbml.task_loss moved to npbml.algorithms.npbml.layers.task_loss; "
    "the old path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
