"""Deprecated path, removed in the next release: this module moved to
:mod:`npbml.algorithms.npbml.layers.unfold`."""

import warnings

from npbml.algorithms.npbml.layers.unfold import *  # noqa: F403

warnings.warn(
    "npbml.unfold moved to npbml.algorithms.npbml.layers.unfold; "
    "the old path will be removed in the next release",
    DeprecationWarning,
    stacklevel=2,
)
