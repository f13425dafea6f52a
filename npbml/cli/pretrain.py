"""``npbml pretrain`` and ``npbml pretrain-relation``: NPBML's two pre-training stages.

NPBML (Raymond et al., arXiv 2406.07983; docs/methods/npbml.md): the supervised backbone, then
the relation network of the transductive loss. Both read the data and model sections of an
experiment config and write one checkpoint; the work is
:func:`npbml.pretrain.run_pretrain_backbone` / :func:`npbml.pretrain.run_pretrain_relation_network`.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from npbml.cli.common import Command, add_config_flag, add_device_flag, add_set_flag
from npbml.pretrain import run_pretrain_backbone, run_pretrain_relation_network


def _common_arguments(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    """The options both stages take.

    Args:
        p: the command's parser.
        steps: the stage's default number of steps.
        lr: the stage's default learning rate.
    """
    add_config_flag(p, "experiment YAML; its data and model sections are used", required=False)
    add_set_flag(p, example="data.ways=20")
    p.add_argument("--root", default=None, help="dataset root (overrides data.root)")
    p.add_argument("--out", required=True, help="where to write the checkpoint (.pt)")
    p.add_argument("--steps", type=int, default=steps, help=f"training steps (default {steps})")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    p.add_argument("--val-episodes", type=int, default=50, help="validation episodes (50)")
    p.add_argument("--eval-every", type=int, default=200, help="validate every N steps (200)")
    add_device_flag(p)
    p.add_argument("--seed", type=int, default=None, help="seed (default: train.seed)")


def add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``npbml pretrain`` (supervised backbone pre-training).

    Args:
        p: the command's parser.
    """
    _common_arguments(p, steps=1000, lr=0.05)
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")


def add_relation_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``npbml pretrain-relation`` (relation network pre-training).

    Args:
        p: the command's parser.
    """
    _common_arguments(p, steps=1000, lr=1e-3)
    p.add_argument("--channels", type=int, default=64, help="embedding channels (default 64)")
    p.add_argument("--hidden", type=int, default=8, help="relation FC width (default 8)")
    p.add_argument(
        "--backbone",
        default=None,
        help="a `npbml pretrain` checkpoint: score its frozen features instead of embedding the "
        "images (the relation module alone; much cheaper in NPBML)",
    )
    p.add_argument(
        "--feature-blocks",
        type=int,
        default=None,
        help="with --backbone: leading blocks whose features are scored (default: all but the "
        "last, NPBML's frozen blocks)",
    )
    p.add_argument(
        "--encoder-blocks",
        type=int,
        default=0,
        help="with --backbone: conv blocks of the relation network's own on top of the frozen "
        "features (default 0: score the features as they are)",
    )


def _setup(args: argparse.Namespace) -> tuple[Any, Any, int, torch.device]:
    from npbml.config import load_config
    from npbml.train import make_tasksets, resolve_device

    config = load_config(args.config, args.overrides)
    tasksets = make_tasksets(config, args.root)
    seed = config.train.seed if args.seed is None else int(args.seed)
    return config, tasksets, seed, resolve_device(args.device)


def _printer(record: dict[str, Any]) -> None:
    print(
        " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
    )


def run_pretrain(args: argparse.Namespace) -> int:
    """``npbml pretrain``: pre-train the config's backbone on its meta-train classes, keep the
    best nearest-prototype validation weights, write a backbone checkpoint to ``--out``
    (load it with ``algorithm.options.backbone_checkpoint``).

    Args:
        args: the options of :func:`add_backbone_arguments`.

    Returns:
        The exit code, 0.
    """
    config, tasksets, seed, device = _setup(args)
    result, path = run_pretrain_backbone(
        config,
        tasksets,
        args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        val_episodes=args.val_episodes,
        eval_every=args.eval_every,
        seed=seed,
        device=device,
        log=_printer,
    )
    print(
        f"best validation prototype accuracy {result.best_accuracy:.4f} at step "
        f"{result.best_step}; wrote {path}"
    )
    return 0


def run_pretrain_relation(args: argparse.Namespace) -> int:
    """``npbml pretrain-relation``: episodic relation-network pre-training on the config's task
    distribution; writes a checkpoint to ``--out`` (``algorithm.options.relation_checkpoint``).

    Args:
        args: the options of :func:`add_relation_arguments`.

    Returns:
        The exit code, 0.
    """
    config, tasksets, seed, device = _setup(args)
    result, path = run_pretrain_relation_network(
        config,
        tasksets,
        args.out,
        steps=args.steps,
        lr=args.lr,
        channels=args.channels,
        hidden=args.hidden,
        val_episodes=args.val_episodes,
        eval_every=args.eval_every,
        seed=seed,
        device=device,
        log=_printer,
        backbone=args.backbone,
        feature_blocks=args.feature_blocks,
        encoder_blocks=args.encoder_blocks,
    )
    print(f"best validation relation accuracy {result.best_accuracy:.4f}; wrote {path}")
    return 0


PRETRAIN = Command(
    "pretrain",
    "supervised backbone pre-training for NPBML",
    add_backbone_arguments,
    run_pretrain,
)
PRETRAIN_RELATION = Command(
    "pretrain-relation",
    "relation-network pre-training for NPBML's transductive loss",
    add_relation_arguments,
    run_pretrain_relation,
)
