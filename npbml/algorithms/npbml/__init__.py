"""NPBML (Raymond et al., "Meta-Learning Neural Procedural Biases", arXiv 2406.07983).

One folder, one concept (docs/methods/npbml.md; docs/npbml.md lists every deviation):

* :mod:`.options` - :class:`NPBMLOptions`, the single source of defaults, and the paper's
  ablation presets :data:`ABLATIONS`;
* :mod:`.network` - :class:`NPBMLNetwork` (backbone + FiLM + warps + head row) and which
  tensors adapt;
* :mod:`.learner` - :class:`NPBML`, the meta-learner (no file I/O);
* :mod:`.build` - :func:`build_npbml`, which loads the checkpoints the options name;
* :mod:`.batched` - the inner loop of a meta-batch of tasks in one ``vmap``'d pass;
* :mod:`.cache` - the per-episode work shared by the inner steps (frozen features, relation
  scores);
* :mod:`.layers` - NPBML's layers: :mod:`.layers.film` (FiLM, psi), :mod:`.layers.warp` (the
  warp layers, omega), :mod:`.layers.task_loss` (the learned inner loss ``M``, phi),
  :mod:`.layers.relation` (the frozen relation network behind ``L_Q``), :mod:`.layers.norm`
  (BatchNorm and spatial means fast in the adapted layout) and :mod:`.layers.unfold` (the adapted
  convolution's input unfolded once per episode).

Channels-last execution (:mod:`npbml.layout`) is shared with every gradient-based learner and
stays outside this folder.
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
