"""NPBML (Raymond et al., "Meta-Learning Neural Procedural Biases", arXiv 2406.07983).

One folder, one concept (docs/methods/npbml.md; docs/npbml.md lists every deviation):

* :mod:`.options` - :class:`NPBMLOptions`, the single source of defaults, and the paper's
  ablation presets :data:`ABLATIONS`;
* :mod:`.network` - :class:`NPBMLNetwork` (backbone + FiLM + warps + head row) and which
  tensors adapt;
* :mod:`.learner` - :class:`NPBML`, the meta-learner (no file I/O);
* :mod:`.build` - :func:`build_npbml`, which loads the checkpoints the options name.

The reusable pieces live in their own modules: :mod:`npbml.film`, :mod:`npbml.warp`,
:mod:`npbml.task_loss`, :mod:`npbml.relation`.
"""

from npbml.algorithms.npbml.build import build_npbml
from npbml.algorithms.npbml.learner import NPBML, nonfinite_gradients
from npbml.algorithms.npbml.network import HeadRow, NPBMLNetwork
from npbml.algorithms.npbml.options import ABLATIONS, NPBMLOptions

__all__ = [
    "ABLATIONS",
    "NPBML",
    "HeadRow",
    "NPBMLNetwork",
    "NPBMLOptions",
    "build_npbml",
    "nonfinite_gradients",
]
