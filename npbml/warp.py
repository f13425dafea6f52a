"""Deprecated path, removed in the next release: this module moved to
:mod:`npbml.algorithms.npbml.layers.warp`."""

import warnings

from npbml.algorithms.npbml.layers.warp import *  # noqa: F403

warnings.warn(
    "npbml.warp moved to npbml.algorithms.npbml.layers.warp; "
    "the old path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
