"""Deprecated path, removed in the next release: this module moved to
:mod:`npbml.algorithms.npbml.layers.film`."""

import warnings

from npbml.algorithms.npbml.layers.film import *  # noqa: F403

warnings.warn(
    "npbml.film moved to npbml.algorithms.npbml.layers.film; "
    "the old path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
