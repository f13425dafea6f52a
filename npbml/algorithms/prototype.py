"""Nearest-prototype classification on a frozen backbone: the baseline every meta-learner must beat.

Prototypical networks (Snell et al., "Prototypical Networks for Few-shot Learning", NeurIPS 2017,
eq. 1-2) classify a query by the nearest class prototype, the mean support embedding of each
class, in squared Euclidean distance. SimpleShot (Wang et al., "SimpleShot: Revisiting
Nearest-Neighbor Classification for Few-Shot Learning", arXiv 1911.04623, 2019) showed that the
same rule on the features of a backbone trained with plain supervised cross-entropy, after L2
normalisation, is a strong few-shot baseline (docs/methods/protocol.md). Nothing is adapted and
nothing is meta-learned: this is what a user would try first.

This module is the one home of the nearest-prototype computation: :func:`npbml.pretrain`'s
validation (best-checkpoint selection of the supervised backbone) calls
:func:`prototype_accuracy` from here.

Distances (``distance=``):

- ``"euclidean"``: prototypes are the mean support embeddings; logits are the negative squared
  Euclidean distances ``-||f(q) - c_k||^2`` (Snell et al. 2017, eq. 2).
- ``"cosine"``: every embedding is first L2-normalised (SimpleShot's "L2N"); prototypes are the
  means of the normalised support embeddings; logits are the cosine similarities between the
  normalised query and each prototype (in ``[-1, 1]``). A prototype's norm does not change a
  cosine, so this is the nearest prototype in angle.

BatchNorm: the toolkit's backbones use batch statistics (MAML's convention), so an embedding
depends on the batch it is computed in. :meth:`PrototypeClassifier.evaluate` embeds the support
and query of a task in one batch ``[S_x; Q_x]``, the batch NPBML's inner loop sees
(docs/methods/npbml.md) and the one the backbone's validation used during pre-training.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tasks.episode import Episode

__all__ = [
    "DISTANCES",
    "PrototypeClassifier",
    "class_prototypes",
    "features",
    "prototype_accuracy",
    "prototype_logits",
]

Distance = Literal["cosine", "euclidean"]
DISTANCES: tuple[str, ...] = ("cosine", "euclidean")
Metrics = dict[str, Any]


def _check_distance(distance: str) -> str:
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    return distance


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The representation before the head, ``model.features(x)`` (``[batch, dim]``).

    Args:
        model: a backbone with a ``features(x)`` method (every :mod:`npbml.models` backbone).
        x: a batch of inputs.

    Returns:
        The flat per-example embeddings (gradients flow as usual; callers choose ``no_grad``).
    """
    fn = getattr(model, "features", None)
    if fn is None:
        raise TypeError(
            f"{type(model).__name__} has no features(x) method; nearest-prototype classification "
            "and backbone pre-training need the representation before the head "
            "(npbml.models backbones provide it)"
        )
    return fn(x)


def class_prototypes(
    embeddings: torch.Tensor, labels: torch.Tensor, ways: int, distance: str = "euclidean"
) -> torch.Tensor:
    """Class prototypes ``[ways, dim]``: the mean support embedding of each class (Snell et al.
    2017, eq. 1), of the L2-normalised embeddings for ``distance="cosine"`` (SimpleShot).

    Args:
        embeddings: support embeddings ``[n_support, dim]``.
        labels: their labels ``[n_support]`` in ``0..ways-1``.
        ways: the number of classes N.
        distance: ``"euclidean"`` or ``"cosine"``.

    Returns:
        The prototypes, one row per class.
    """
    _check_distance(distance)
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"need embeddings [n, dim] and labels [n]; got {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}"
        )
    counts = torch.bincount(labels, minlength=ways)
    if counts.numel() != ways or bool((counts == 0).any()):
        raise ValueError(
            f"every class 0..{ways - 1} needs at least one support example; got label counts "
            f"{counts.tolist()}"
        )
    if distance == "cosine":
        embeddings = F.normalize(embeddings, dim=1)
    protos = torch.zeros(
        ways, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device
    )
    protos.index_add_(0, labels, embeddings)
    return protos / counts.to(embeddings.dtype).unsqueeze(1)


def prototype_logits(
    queries: torch.Tensor, prototypes: torch.Tensor, distance: str = "euclidean"
) -> torch.Tensor:
    """Scores ``[n_query, ways]``; the predicted class is their argmax.

    Args:
        queries: query embeddings ``[n_query, dim]``.
        prototypes: :func:`class_prototypes` ``[ways, dim]`` (of the same ``distance``).
        distance: ``"euclidean"`` (negative squared distance, Snell et al. 2017, eq. 2) or
            ``"cosine"`` (cosine similarity of the L2-normalised query to each prototype).

    Returns:
        The logits.
    """
    _check_distance(distance)
    if distance == "cosine":
        return F.normalize(queries, dim=1) @ F.normalize(prototypes, dim=1).T
    # The expanded difference, not cdist's matmul trick: exact for near-identical vectors.
    return -((queries.unsqueeze(1) - prototypes.unsqueeze(0)) ** 2).sum(-1)


def _episode_logits(model: nn.Module, episode: Episode, distance: str) -> torch.Tensor:
    # Support and query in one batch (module docstring: batch-statistics BatchNorm).
    n_s = episode.support_x.shape[0]
    feats = features(model, torch.cat([episode.support_x, episode.query_x]))
    protos = class_prototypes(feats[:n_s], episode.support_y, episode.ways, distance)
    return prototype_logits(feats[n_s:], protos, distance)


@torch.no_grad()
def prototype_accuracy(model: nn.Module, episode: Episode, distance: str = "euclidean") -> float:
    """Nearest-prototype query accuracy of ``model.features`` on one (unbatched) task.

    Args:
        model: the backbone (used as it is: the caller picks train/eval mode).
        episode: one task.
        distance: ``"euclidean"`` (the default, Snell et al. 2017) or ``"cosine"`` (SimpleShot).

    Returns:
        The fraction of query examples assigned to their own class.
    """
    pred = _episode_logits(model, episode, distance).argmax(1)
    return float((pred == episode.query_y).float().mean())


class PrototypeClassifier(nn.Module):
    """Nearest-prototype learner on a frozen backbone (Snell et al. 2017; Wang et al. 2019).

    The learner interface of :class:`~npbml.algorithms.base.GradientLearner`, with nothing to
    adapt or meta-learn: ``fast = learner.adapt(sx, sy)`` returns ``{"prototypes": [N, dim]}``,
    ``logits = learner(qx, fast)``, ``metrics = learner.evaluate(episode)`` (keys ``loss``,
    ``accuracy``, ``losses``, ``accuracies``), ``learner.meta_parameters() == []``. The backbone's
    parameters are frozen (``requires_grad=False``) and it is run in eval mode.

    Args:
        model: a backbone with ``features(x)`` (e.g. a pre-trained :class:`npbml.models.Conv4`);
            its head is not used.
        distance: ``"cosine"`` (default; SimpleShot's L2-normalised features) or ``"euclidean"``
            (squared, ProtoNets).
        inner_lr, inner_steps, eval_inner_steps, first_order: accepted so that an experiment
            config's algorithm section builds this learner like any other; ignored (no
            adaptation).
    """

    def __init__(
        self,
        model: nn.Module,
        distance: Distance = "cosine",
        *,
        inner_lr: float | None = None,
        inner_steps: int | None = None,
        eval_inner_steps: int | None = None,
        first_order: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module) or not callable(getattr(model, "features", None)):
            raise TypeError(
                f"PrototypeClassifier needs an nn.Module with a features(x) method; got "
                f"{type(model).__name__}"
            )
        self.distance = _check_distance(distance)
        self.model = model
        self.model.requires_grad_(False)  # frozen: nothing here is trained

    # ----------------------------------------------------------------- parameters
    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Nothing is meta-learned (an empty iterator)."""
        return iter(())

    def meta_parameters(self) -> list[nn.Parameter]:
        """Nothing is meta-learned: ``[]``."""
        return []

    # ----------------------------------------------------------------- embedding
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of ``x`` in eval mode, without a graph."""
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return features(self.model, x)
        finally:
            self.model.train(was)

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        *,
        steps: int | None = None,
        first_order: bool | None = None,
        query_x: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"prototypes": [N, dim]}`` of the support set (no gradient step: ``steps`` and
        ``first_order`` are ignored). With ``query_x`` the support is embedded in one batch with
        it, as :meth:`evaluate` does."""
        if support_x.shape[0] != support_y.shape[0]:
            raise ValueError(
                f"support_x has {support_x.shape[0]} examples but support_y has "
                f"{support_y.shape[0]}; pass one task (no leading task dimension) to adapt()"
            )
        n_s = support_x.shape[0]
        batch = support_x if query_x is None else torch.cat([support_x, query_x])
        feats = self.embed(batch)[:n_s]
        ways = int(support_y.max()) + 1
        return {"prototypes": class_prototypes(feats, support_y, ways, self.distance)}

    def forward(
        self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Logits of ``x`` against ``params["prototypes"]`` (from :meth:`adapt`)."""
        if params is None or "prototypes" not in params:
            raise ValueError(
                "PrototypeClassifier(x, params) needs the prototypes: pass "
                "params=learner.adapt(support_x, support_y)"
            )
        return prototype_logits(self.embed(x), params["prototypes"], self.distance)

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, episode: Episode, inner_steps: int | None = None) -> Metrics:
        """Query metrics of one task or a meta-batch, the keys of
        :meth:`GradientLearner.evaluate`: mean ``loss`` (cross-entropy of the logits) and
        ``accuracy``, per-task ``losses`` and ``accuracies``. ``inner_steps`` is ignored."""
        if not isinstance(episode, Episode):
            raise TypeError(f"expected a tasks.Episode, got {type(episode).__name__}")
        tasks = episode.unstack() if episode.is_batched else [episode]
        losses, accs = [], []
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for task in tasks:
                    logits = _episode_logits(self.model, task, self.distance)
                    losses.append(float(F.cross_entropy(logits, task.query_y)))
                    accs.append(float((logits.argmax(1) == task.query_y).float().mean()))
        finally:
            self.model.train(was)
        n = len(accs)
        return {
            "loss": sum(losses) / n,
            "accuracy": sum(accs) / n,
            "losses": losses,
            "accuracies": accs,
        }

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}"
