"""Pre-training stages of the NPBML pipeline: the supervised backbone and the relation network.

NPBML (Raymond et al., arXiv 2406.07983; docs/methods/npbml.md) starts from a backbone pre-trained
with plain supervised cross-entropy over *all* meta-train classes (a throw-away linear classifier
over every class), keeping the weights with the best nearest-prototype accuracy on validation
episodes; then the head is replaced by the permutation-invariant N-way head row
(:class:`npbml.algorithms.npbml.HeadRow`) and meta-training begins. The transductive loss term
needs a relation network (Sung et al., CVPR 2018) pre-trained episodically with the MSE between
its scores and the one-hot query labels (Sung et al., eq. 3), frozen afterwards.

Functions for programmatic use (:func:`pretrain_backbone`, :func:`pretrain_relation`,
:func:`prototype_accuracy`), the backbone files (:mod:`npbml.models.weights`, re-exported here)
and the drivers of ``npbml pretrain`` / ``npbml pretrain-relation``
(:func:`run_pretrain_backbone`, :func:`run_pretrain_relation_network`, which read the data and
model sections of an experiment config; their flags live in :mod:`npbml.cli.pretrain`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from npbml.algorithms.npbml.layers.film import block_channels
from npbml.algorithms.npbml.layers.relation import RelationNetwork, save_relation

# The nearest-prototype computation has one home, the baseline learner's module; pre-training
# uses it to pick the best-validation backbone (and re-exports it for existing callers).
from npbml.algorithms.prototype import features as _features
from npbml.algorithms.prototype import prototype_accuracy

# Backbone files live with the models (a learner loads them without importing this driver);
# re-exported here, their former home.
from npbml.models.weights import (  # noqa: F401
    BACKBONE_FORMAT,
    load_backbone_weights,
    save_backbone,
)
from tasks.dataset import ClassDataset
from tasks.sampler import EpisodeSource

Logger = Callable[[dict[str, Any]], None]
Features = Callable[[torch.Tensor], torch.Tensor]


def mean_prototype_accuracy(
    model: nn.Module,
    source: EpisodeSource,
    episodes: int,
    device: torch.device | str = "cpu",
    distance: str = "euclidean",
) -> float:
    """Mean nearest-prototype accuracy (:func:`npbml.algorithms.prototype.prototype_accuracy`,
    Snell et al. 2017) of ``model`` in eval mode over episodes ``0..episodes-1`` of ``source`` (a
    fixed set: episodes are drawn by index, so the source's own stream is untouched).

    Args:
        model: the backbone being pre-trained.
        source: validation episodes.
        episodes: how many.
        device: where to run.
        distance: ``"euclidean"`` (default) or ``"cosine"``.

    Returns:
        The mean query accuracy.
    """
    was_training = model.training
    model.eval()
    try:
        accs = [
            prototype_accuracy(model, source.sample(i).to(device), distance)
            for i in range(episodes)
        ]
    finally:
        model.train(was_training)
    return float(np.mean(accs))


class _ClassBatches:
    """Uniform random mini-batches of (image, class) over a ClassDataset, seeded."""

    def __init__(self, dataset: ClassDataset, seed: int) -> None:
        self.dataset = dataset
        self.sizes = dataset.class_sizes()
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.total = int(self.offsets[-1])
        if self.total == 0:
            raise ValueError("pre-training needs a dataset with at least one image")
        self.rng = np.random.default_rng(seed)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.rng.integers(0, self.total, size=batch_size)
        classes = np.searchsorted(self.offsets, flat, side="right") - 1
        xs, ys = [], []
        for c in np.unique(classes):
            idx = flat[classes == c] - self.offsets[c]
            xs.append(self.dataset.images(int(c), idx))
            ys.append(torch.full((len(idx),), int(c), dtype=torch.int64))
        return torch.cat(xs), torch.cat(ys)


@dataclass
class PretrainResult:
    """Outcome of a pre-training run: best validation score, its step, and the log records."""

    best_accuracy: float
    best_step: int
    history: list[dict[str, Any]] = field(default_factory=list)


def _feature_dim(model: nn.Module, batches: _ClassBatches, device: torch.device) -> int:
    """Width of ``model``'s features, probed on one image (in eval mode: one image has no
    batch statistics)."""
    x0, _ = batches.sample(1)
    with torch.no_grad():
        was = model.training
        model.eval()
        dim = _features(model, x0.to(device)).shape[1]
        model.train(was)
    return int(dim)


def pretrain_backbone(
    model: nn.Module,
    dataset: ClassDataset,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    val_source: EpisodeSource | None = None,
    val_episodes: int = 50,
    eval_every: int = 200,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Logger | None = None,
) -> PretrainResult:
    """Supervised CE pre-training of ``model``'s representation over all classes of ``dataset``.

    A linear classifier ``feature_dim -> dataset.num_classes`` is trained jointly (SGD with
    momentum, cosine-decayed ``lr``) and discarded; ``model.head`` is left untouched. With a
    ``val_source``, nearest-prototype accuracy over ``val_episodes`` fixed validation episodes is
    measured every ``eval_every`` steps and at the end, and the best weights are restored into
    ``model`` (model selection as in the NPBML pipeline). Returns a :class:`PretrainResult`.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if val_source is not None and (val_episodes < 1 or eval_every < 1):
        raise ValueError("val_episodes and eval_every must be >= 1 when validating")
    device = torch.device(device)
    torch.manual_seed(seed)
    model.to(device).train()
    batches = _ClassBatches(dataset, seed)
    classifier = nn.Linear(_feature_dim(model, batches, device), dataset.num_classes).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(classifier.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    result = PretrainResult(best_accuracy=-math.inf, best_step=0)
    best_state: dict[str, torch.Tensor] | None = None
    running, n_run = 0.0, 0
    for step in range(1, steps + 1):
        x, y = batches.sample(batch_size)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(classifier(_features(model, x)), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"pre-training loss is {float(loss)} at step {step}; lower the learning rate"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        n_run += 1
        last = step == steps
        if step % eval_every == 0 or last:
            record: dict[str, Any] = {"step": step, "loss": running / n_run}
            running, n_run = 0.0, 0
            if val_source is not None:
                acc = mean_prototype_accuracy(model, val_source, val_episodes, device)
                record["val_accuracy"] = acc
                if acc > result.best_accuracy:
                    result.best_accuracy, result.best_step = acc, step
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result.history.append(record)
            if log is not None:
                log(record)
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        result.best_accuracy, result.best_step = math.nan, steps
    return result


def pretrain_relation(
    relation: RelationNetwork,
    source: EpisodeSource,
    *,
    steps: int = 1000,
    lr: float = 1e-3,
    val_source: EpisodeSource | None = None,
    val_episodes: int = 50,
    eval_every: int = 200,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Logger | None = None,
    features: Features | None = None,
) -> PretrainResult:
    """Episodic pre-training of a relation network (Sung et al. 2018, eq. 3): Adam on the MSE
    between the scores ``[Q, N]`` and the one-hot query labels. With ``val_source``, the
    argmax-score accuracy over fixed validation episodes selects the weights kept.

    ``features`` (for ``RelationNetwork(reads="features")``) maps each episode's images
    ``[S_x; Q_x]``, in one batch as NPBML's joint forward does, to the frozen backbone features
    the relation network reads (:func:`backbone_features`)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    torch.manual_seed(seed)
    relation.to(device).train()
    opt = torch.optim.Adam(relation.parameters(), lr=lr)
    result = PretrainResult(best_accuracy=-math.inf, best_step=0)
    best_state: dict[str, torch.Tensor] | None = None
    running, n_run = 0.0, 0
    for step in range(1, steps + 1):
        ep = source.sample().to(device)
        scores = _relation_scores(relation, ep, features)
        loss = F.mse_loss(scores, F.one_hot(ep.query_y, ep.ways).to(scores.dtype))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach())
        n_run += 1
        if step % eval_every == 0 or step == steps:
            record: dict[str, Any] = {"step": step, "loss": running / n_run}
            running, n_run = 0.0, 0
            if val_source is not None:
                record["val_accuracy"] = relation_accuracy(
                    relation, val_source, val_episodes, device, features
                )
                if record["val_accuracy"] > result.best_accuracy:
                    result.best_accuracy, result.best_step = record["val_accuracy"], step
                    best_state = {k: v.detach().clone() for k, v in relation.state_dict().items()}
            result.history.append(record)
            if log is not None:
                log(record)
    if best_state is not None:
        relation.load_state_dict(best_state)
    else:
        result.best_accuracy, result.best_step = math.nan, steps
    relation.requires_grad_(False)  # frozen from here on (NPBML meta-training)
    return result


@torch.no_grad()
def relation_accuracy(
    relation: RelationNetwork,
    source: EpisodeSource,
    episodes: int,
    device: torch.device | str = "cpu",
    features: Features | None = None,
) -> float:
    """Mean query accuracy of ``argmax`` relation scores over episodes ``0..episodes-1``
    (``features`` as in :func:`pretrain_relation`)."""
    accs = []
    for i in range(episodes):
        ep = source.sample(i).to(device)
        scores = _relation_scores(relation, ep, features)
        accs.append(float((scores.argmax(1) == ep.query_y).float().mean()))
    return float(np.mean(accs))


def _relation_scores(relation: RelationNetwork, ep: Any, features: Features | None) -> torch.Tensor:
    if features is None:
        return relation(ep.support_x, ep.support_y, ep.query_x, ep.ways)
    with torch.no_grad():
        h = features(torch.cat([ep.support_x, ep.query_x]))
    n_s = ep.support_x.shape[0]
    return relation(h[:n_s], ep.support_y, h[n_s:], ep.ways)


def backbone_features(model: nn.Module, blocks: int) -> tuple[Features, int]:
    """The frozen features of the first ``blocks`` blocks of a pre-trained backbone, as NPBML
    computes them for its frozen blocks, and their channel count.

    Args:
        model: a backbone with ``blocks`` (``nn.Sequential``), e.g. :class:`~npbml.models.Conv4`.
        blocks: how many leading blocks (NPBML's default freezes all but the last).

    Returns:
        ``(features, channels)``: a no-grad function images -> ``[B, C, H, W]``, and ``C``.

    Raises:
        ValueError: when the model has no ``blocks`` or ``blocks`` is out of range.
    """
    body = getattr(model, "blocks", None)
    if not isinstance(body, nn.Sequential) or not 1 <= blocks <= len(body):
        n = len(body) if isinstance(body, nn.Sequential) else 0
        raise ValueError(
            f"feature blocks must be 1..{n} leading blocks of a backbone with `blocks` "
            f"(like npbml.models.Conv4), got {blocks} for {type(model).__name__}"
        )
    prefix = body[:blocks].requires_grad_(False)

    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        return prefix(x)

    return features, block_channels(body[blocks - 1])[1]


# --------------------------------------------------------------------------------------------
# Drivers of `npbml pretrain` / `npbml pretrain-relation` (their flags: npbml/cli/pretrain.py)
# --------------------------------------------------------------------------------------------


def run_pretrain_backbone(
    config: Any,
    tasksets: Any,
    out: str | Path,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 0.05,
    val_episodes: int = 50,
    eval_every: int = 200,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    log: Logger | None = None,
) -> tuple[PretrainResult, Path]:
    """The backbone stage of an experiment: build the config's model, pre-train it on the
    meta-train classes (:func:`pretrain_backbone`), write it with :func:`save_backbone`.

    Args:
        config: the experiment :class:`~npbml.config.Config` (its data and model sections).
        tasksets: its task sets (``npbml.train.make_tasksets(config)``).
        out: the checkpoint file to write (``algorithm.options.backbone_checkpoint``).
        steps, batch_size, lr, val_episodes, eval_every: as in :func:`pretrain_backbone`.
        seed: the seed (default ``config.train.seed``).
        device: where to train.
        log: called with each log record (``None``: silent).

    Returns:
        ``(result, path written)``.
    """
    from npbml.models import build_model
    from npbml.train import infer_model_kwargs

    kwargs = {**infer_model_kwargs(config, tasksets), **config.model.options}
    model = build_model(config.model.name, **kwargs)
    result = pretrain_backbone(
        model,
        tasksets.train.dataset,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        val_source=tasksets.validation,
        val_episodes=val_episodes,
        eval_every=eval_every,
        seed=config.train.seed if seed is None else int(seed),
        device=device,
        log=log,
    )
    path = save_backbone(
        model.cpu(),
        out,
        config.model.name,
        kwargs,
        val_accuracy=result.best_accuracy,
        best_step=result.best_step,
        config=config.to_dict(),
    )
    return result, path


def run_pretrain_relation_network(
    config: Any,
    tasksets: Any,
    out: str | Path,
    *,
    steps: int = 1000,
    lr: float = 1e-3,
    channels: int = 64,
    hidden: int = 8,
    val_episodes: int = 50,
    eval_every: int = 200,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    log: Logger | None = None,
    backbone: str | Path | None = None,
    feature_blocks: int | None = None,
    encoder_blocks: int = 0,
) -> tuple[PretrainResult, Path]:
    """The relation-network stage of an experiment: episodic pre-training on the config's task
    distribution (:func:`pretrain_relation`), written with
    :func:`~npbml.algorithms.npbml.layers.relation.save_relation`.

    Args:
        config: the experiment :class:`~npbml.config.Config`.
        tasksets: its task sets (``npbml.train.make_tasksets(config)``).
        out: the checkpoint file to write (``algorithm.options.relation_checkpoint``).
        steps, lr, val_episodes, eval_every: as in :func:`pretrain_relation`.
        channels: embedding channels of the relation network (ignored with ``backbone``).
        hidden: width of its fully connected layer.
        seed: the seed (default ``config.train.seed``).
        device: where to train.
        log: called with each log record (``None``: silent).
        backbone: a ``npbml pretrain`` checkpoint: the relation module then reads the frozen
            features of its first ``feature_blocks`` blocks (``RelationNetwork(reads=
            "features")``) instead of embedding the images itself.
        feature_blocks: how many leading blocks (default all but the last, the blocks NPBML
            freezes by default).
        encoder_blocks: with ``backbone``, conv blocks of the relation network's own on top of
            the frozen features (``RelationNetwork(encoder_blocks=...)``).

    Returns:
        ``(result, path written)``.
    """
    relation, features = _new_relation(
        config, tasksets, channels, hidden, backbone, feature_blocks, encoder_blocks, device
    )
    result = pretrain_relation(
        relation,
        tasksets.train,
        steps=steps,
        lr=lr,
        val_source=tasksets.validation,
        val_episodes=val_episodes,
        eval_every=eval_every,
        seed=config.train.seed if seed is None else int(seed),
        device=device,
        log=log,
        features=features,
    )
    path = save_relation(
        relation.cpu(), out, val_accuracy=result.best_accuracy, config_used=config.to_dict()
    )
    return result, path


def _new_relation(
    config: Any,
    tasksets: Any,
    channels: int,
    hidden: int,
    backbone: str | Path | None,
    feature_blocks: int | None,
    encoder_blocks: int,
    device: torch.device | str,
) -> tuple[RelationNetwork, Features | None]:
    """A fresh relation network for :func:`run_pretrain_relation_network` and, when it reads a
    backbone's features, the frozen feature map it reads (else ``None``)."""
    from npbml.models import build_model
    from npbml.train import infer_model_kwargs

    if encoder_blocks and backbone is None:
        raise ValueError(
            f"encoder_blocks={encoder_blocks} stacks blocks on a backbone's features: pass "
            "backbone= (`--backbone CKPT`) or drop encoder_blocks"
        )
    kwargs = {**infer_model_kwargs(config, tasksets), **config.model.options}
    if backbone is None:
        in_channels = int(kwargs.get("in_channels", 1))
        return RelationNetwork(channels=channels, in_channels=in_channels, hidden=hidden), None
    model = build_model(config.model.name, **kwargs)
    load_backbone_weights(model, backbone)
    k = len(getattr(model, "blocks", ())) - 1 if feature_blocks is None else feature_blocks
    features, width = backbone_features(model.to(device), k)
    relation = RelationNetwork(
        channels=width,
        hidden=hidden,
        reads="features",
        feature_blocks=k,
        encoder_blocks=encoder_blocks,
    )
    return relation, features
