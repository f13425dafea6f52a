"""``npbml eval`` and ``npbml eval-lake``: test a trained run.

``eval`` gives the mean accuracy with a 95% interval over fixed episodes of a split (of an
``npbml train`` run), or the accuracy and loss on every row of a split (of an ``npbml fit`` run);
``eval-lake`` the error rate on Lake et al.'s twenty 20-way one-shot runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from npbml.cli.common import (
    Command,
    add_device_flag,
    add_json_flag,
    describe,
    emit,
    format_accuracy,
    pct,
    use_threads,
)
from npbml.config import ConfigError


def _checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--which``, ``--device`` and ``--json``: the options both commands
    share (read by :func:`_load_run`)."""
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory of npbml train or npbml fit (uses best.pt), or a .pt file in one",
    )
    p.add_argument("--which", default="best.pt", help="checkpoint file in a run directory")
    add_device_flag(p)
    add_json_flag(p)


def _load_run(args: argparse.Namespace) -> tuple[Any, Path, Any, Any, dict[str, Any]]:
    """Load the learner a command evaluates.

    Args:
        args: options with ``checkpoint``, ``which`` and ``device``.

    Returns:
        ``(device, checkpoint path, learner, config, checkpoint state)``.
    """
    from npbml.train import load_learner, resolve_checkpoint, resolve_device

    device = resolve_device(args.device)
    path = resolve_checkpoint(args.checkpoint, args.which)
    learner, config, state = load_learner(path, device)
    return device, path, learner, config, state


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``npbml eval``.

    Args:
        p: the command's parser.
    """
    _checkpoint_arguments(p)
    p.add_argument("--tasks", type=int, default=None, help="number of tasks (default: eval.tasks)")
    p.add_argument(
        "--split",
        choices=("train", "validation", "test"),
        default=None,
        help="episodes of this split (default: eval.split, normally test); of an npbml fit "
        "run: all its rows of this split (default test)",
    )
    p.add_argument("--root", default=None, help="dataset root (default: the run's data.root)")


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on fixed episodes and print the accuracy (or one JSON object).

    Args:
        args: the parsed options of :func:`add_eval_arguments`.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: ``--tasks`` is below 1.
    """
    from npbml.evaluate import evaluate
    from npbml.fit import fit_run_dir
    from npbml.train import make_tasksets

    if fit_run_dir(args.checkpoint) is not None:
        return _run_eval_fit(args)
    device, path, learner, config, state = _load_run(args)
    use_threads(config)
    split = args.split or config.eval.split
    tasks = args.tasks if args.tasks is not None else config.eval.tasks
    if tasks < 1:
        raise ConfigError(f"--tasks must be >= 1, got {tasks}")
    sampler = getattr(make_tasksets(config, root=args.root), split)
    res = evaluate(
        learner,
        sampler,
        tasks,
        device=device,
        progress=not args.json,
        workers=config.train.task_workers,
    )
    out = {
        **res,
        "split": split,
        "checkpoint": str(path),
        "step": int(state["step"]),
        "data": config.data.name,
        "ways": config.data.ways,
        "shots": config.data.shots,
    }
    emit(out, args.json, f"{split} accuracy {format_accuracy(res)}\n  {describe(config)}")
    return 0


def _run_eval_fit(args: argparse.Namespace) -> int:
    """``npbml eval`` of an ``npbml fit`` run: its checkpoint on every row of one split of its
    own data (default test), as :func:`npbml.fit.evaluate_run`.

    Args:
        args: the parsed options of :func:`add_eval_arguments`.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: ``--tasks`` was given (a fit run is not evaluated on episodes).
    """
    from npbml.fit import evaluate_run
    from npbml.train import resolve_device

    if args.tasks is not None:
        raise ConfigError(
            f"--tasks counts few-shot episodes, but {args.checkpoint} is an `npbml fit` run, "
            "evaluated on every row of a split: drop --tasks"
        )
    split = args.split or "test"
    res = evaluate_run(
        args.checkpoint, args.which, split, resolve_device(args.device), root=args.root
    )
    score = f"accuracy {pct(res['accuracy'])}, " if "accuracy" in res else ""
    text = (
        f"{split} {score}loss {res['loss']:.4f} ({res['rows']} rows; {res['checkpoint']} "
        f"at step {res['step']})"
    )
    emit(res, args.json, text)
    return 0


def add_lake_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``npbml eval-lake``.

    Args:
        p: the command's parser.
    """
    _checkpoint_arguments(p)
    p.add_argument("--runs", required=True, help="all_runs.zip or the folder with run01..run20")


def run_eval_lake(args: argparse.Namespace) -> int:
    """Classify the items of Lake et al.'s 20 runs and print the error rate.

    Args:
        args: the parsed options of :func:`add_lake_arguments`.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: the checkpoint holds a model that is not 20-way.
    """
    from npbml.evaluate import evaluate_lake
    from tasks.lake import LakeRuns

    device, path, learner, config, state = _load_run(args)
    mk = state["model_kwargs"]
    if mk.get("num_classes") != 20:
        raise ConfigError(
            f"the Lake runs are 20-way, but {path} holds a {mk.get('num_classes')}-way model; "
            "evaluate a checkpoint trained with data.ways=20 (e.g. configs/omniglot_20w1s.yaml)"
        )
    use_threads(config)
    runs = LakeRuns(args.runs, image_size=int(mk.get("image_size", 28)))
    res = evaluate_lake(learner, runs, device=device)
    out = {**res, "checkpoint": str(path), "step": int(state["step"])}
    text = (
        f"Lake 20-way one-shot error rate {pct(res['error_rate'])} "
        f"({res['errors']}/{res['items']} items, {res['runs']} runs)\n  {describe(config)}"
    )
    emit(out, args.json, text)
    return 0


EVAL = Command(
    "eval",
    "mean test accuracy with a 95%% interval over fixed episodes",
    add_eval_arguments,
    run_eval,
)
EVAL_LAKE = Command(
    "eval-lake",
    "error rate on Lake et al.'s 20-way one-shot runs",
    add_lake_arguments,
    run_eval_lake,
)
