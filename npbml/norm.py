"""Deprecated path, removed in the next release: this module moved to
:mod:`npbml.algorithms.npbml.layers.norm`."""

import warnings

from npbml.algorithms.npbml.layers.norm import *  # noqa: F403

warnings.warn(
    "npbml.norm moved to npbml.algorithms.npbml.layers.norm; "
    "the old path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
