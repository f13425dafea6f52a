"""Deprecated path, removed in the next release: this module moved to
:mod:`npbml.algorithms.npbml.layers.relation`."""

import warnings

from npbml.algorithms.npbml.layers.relation import *  # noqa: F403

warnings.warn(
    "npbml.relation moved to npbml.algorithms.npbml.layers.relation; "
    "the old path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
