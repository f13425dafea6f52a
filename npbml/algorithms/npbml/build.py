"""Building NPBML from its options, reading the checkpoints they name.

The learner itself reads no files (ARCHITECTURE.md: "a learner does no file I/O"); this is the
one place that turns ``backbone_checkpoint`` / ``relation_checkpoint`` into loaded modules.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from npbml.algorithms.npbml.learner import NPBML
from npbml.algorithms.npbml.options import NPBMLOptions

__all__ = ["build_npbml"]


def build_npbml(
    model: nn.Module,
    options: NPBMLOptions | None = None,
    *,
    relation_net: nn.Module | None = None,
    **kwargs: Any,
) -> NPBML:
    """NPBML around ``model``, with the checkpoints named in the options loaded first.

    Args:
        model: the backbone; its body (``blocks.*``) is overwritten from
            ``options.backbone_checkpoint`` when one is named.
        options: NPBML options (fields may also be given in ``kwargs``).
        relation_net: a relation network; when None and the ``query`` term is on, it is read
            from ``options.relation_checkpoint``.
        **kwargs: :class:`NPBML` arguments (``inner_lr``, ``inner_steps``, ...) and option
            fields.

    Returns:
        The learner.
    """
    fields = set(NPBMLOptions.__dataclass_fields__)
    opts = NPBMLOptions.from_kwargs(options, **{k: v for k, v in kwargs.items() if k in fields})
    rest = {k: v for k, v in kwargs.items() if k not in fields}
    if opts.backbone_checkpoint is not None:
        from npbml.models.weights import load_backbone_weights

        load_backbone_weights(model, opts.backbone_checkpoint)
    needs_query = "query" in opts.resolved().loss_terms
    if needs_query and relation_net is None and opts.relation_checkpoint is not None:
        from npbml.algorithms.npbml.layers.relation import load_relation

        relation_net = load_relation(opts.relation_checkpoint)
    return NPBML(model, opts, relation_net=relation_net, checkpoints_loaded=True, **rest)
