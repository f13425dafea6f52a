"""``npbml pretrain`` and ``npbml pretrain-relation``: NPBML's two pre-training stages.

METHODS.md section 3: the supervised backbone, then the relation network of the transductive
loss. Both read the data and model sections of an experiment config and write one checkpoint;
the work is :func:`npbml.pretrain.run_pretrain` / :func:`npbml.pretrain.run_pretrain_relation`.
"""

from __future__ import annotations

import argparse

from npbml import pretrain
from npbml.cli.common import Command, add_config_flag, add_device_flag, add_set_flag


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


PRETRAIN = Command(
    "pretrain",
    "supervised backbone pre-training for NPBML",
    add_backbone_arguments,
    pretrain.run_pretrain,
)
PRETRAIN_RELATION = Command(
    "pretrain-relation",
    "relation-network pre-training for NPBML's transductive loss",
    add_relation_arguments,
    pretrain.run_pretrain_relation,
)
