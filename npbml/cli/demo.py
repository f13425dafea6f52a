"""``npbml demo``: meta-train and test the demo methods on generated glyphs in a time budget.

Each method of :data:`DEMO_RUNS` gets the same share of the budget. NPBML's share starts with its
two pre-training stages (:func:`npbml.pretrain.run_pretrain_backbone` and
:func:`npbml.pretrain.run_pretrain_relation_network`, the functions behind ``npbml pretrain`` and
``npbml pretrain-relation``); every method then meta-trains until the time left only just covers
testing, and is tested on fixed episodes of classes unseen in meta-training.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

from npbml.cli.common import (
    Command,
    add_json_flag,
    add_set_flag,
    describe,
    format_accuracy,
    use_threads,
)
from npbml.config import Config, ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class DemoRun:
    """One entry of the demo comparison: a label, a config file in configs/, overrides."""

    label: str
    config: str
    overrides: tuple[str, ...] = ()
    # NPBML's pipeline (METHODS.md sec 3): supervised backbone pre-training and relation-network
    # pre-training steps, run inside this method's share of the budget before meta-training.
    pretrain_steps: int = 0
    relation_steps: int = 0


# The methods the demo compares, in order, each with the same share of the time budget.
DEMO_RUNS: list[DemoRun] = [
    DemoRun("MAML", "demo.yaml"),
    DemoRun("NPBML", "npbml_demo.yaml", pretrain_steps=300, relation_steps=200),
]


def demo_config(run: DemoRun, extra: Sequence[str] = ()) -> Config:
    """The validated config of a demo run.

    Args:
        run: the demo entry.
        extra: overrides applied after the entry's own (``--set`` values, checkpoints).

    Returns:
        The config.

    Raises:
        ConfigError: ``configs/`` is not next to the package (not a source checkout).
    """
    path = CONFIG_DIR / run.config
    if not path.is_file():
        raise ConfigError(
            f"demo config {str(path)!r} not found; run the demo from a source checkout "
            "(pip install -e .) so that configs/ is next to the package"
        )
    return load_config(path, [*run.overrides, *extra])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``npbml demo``.

    Args:
        p: the command's parser.
    """
    p.add_argument("--minutes", type=float, default=8.0, help="total time budget (default 8)")
    p.add_argument("--out", default="runs/demo", help="directory for the runs (default runs/demo)")
    p.add_argument(
        "--tasks", type=int, default=None, help="test tasks per method (default: eval.tasks)"
    )
    add_set_flag(p, what="a value in every demo config", example="train.threads=1")
    add_json_flag(p, help="print the results as one JSON object")


def _pretrain(
    run: DemoRun, config: Config, tasksets: Any, out_dir: Path, log: TextIO
) -> tuple[str, ...]:
    """Run NPBML's two pre-training stages for a demo run.

    Args:
        run: the demo entry (its ``pretrain_steps`` and ``relation_steps``).
        config: its config.
        tasksets: its task sets.
        out_dir: where ``backbone.pt`` and ``relation.pt`` go.
        log: where progress goes.

    Returns:
        The overrides that point the run at the two checkpoints.
    """
    from npbml.pretrain import run_pretrain_backbone, run_pretrain_relation_network

    t0 = time.perf_counter()
    # Validate once, at the end of each stage: the demo's budget goes to meta-training.
    bb, backbone = run_pretrain_backbone(
        config,
        tasksets,
        out_dir / "backbone.pt",
        steps=run.pretrain_steps,
        eval_every=run.pretrain_steps,
    )
    rel, relation = run_pretrain_relation_network(
        config,
        tasksets,
        out_dir / "relation.pt",
        steps=run.relation_steps,
        eval_every=run.relation_steps,
        channels=int(config.model.options.get("hidden", 64)),  # the backbone's width
    )
    print(
        f"   pre-training ({time.perf_counter() - t0:.0f} s): backbone nearest-prototype "
        f"validation accuracy {100 * bb.best_accuracy:.1f}%, relation network "
        f"{100 * rel.best_accuracy:.1f}%",
        file=log,
        flush=True,
    )
    return (
        f"algorithm.options.backbone_checkpoint={backbone}",
        f"algorithm.options.relation_checkpoint={relation}",
    )


def _seconds_per_test_task(config: Config, tasksets: Any) -> float:
    """Time one test task on this machine, as the final test will run it (8 tasks, after a
    warm-up), with a learner built for the purpose and dropped."""
    from npbml.evaluate import Evaluable, evaluate
    from npbml.train import build_learner, infer_model_kwargs

    # Every learner of npbml.algorithms has evaluate(episode) (the Evaluable protocol).
    probe = cast(Evaluable, build_learner(config, infer_model_kwargs(config, tasksets)))
    probe.evaluate(tasksets.test.sample(0))  # warm-up
    t0 = time.perf_counter()
    evaluate(probe, tasksets.test, 8, workers=config.train.task_workers)
    return (time.perf_counter() - t0) / 8


def _train_and_test(
    config: Config,
    tasksets: Any,
    out_dir: Path,
    tasks: int,
    deadline: float,
    args: Any,
    log: TextIO,
) -> dict[str, Any]:
    """Meta-train until the time left before ``deadline`` only just covers testing ``tasks``
    tasks, then test the best-validation checkpoint.

    Args:
        config: the run's config.
        tasksets: its task sets.
        out_dir: its run directory.
        tasks: test tasks.
        deadline: ``time.perf_counter()`` value by which testing should end.
        args: the command's options (``json``).
        log: where progress goes.

    Returns:
        The test result with the meta-steps, best validation accuracy and timings.
    """
    from npbml.evaluate import Evaluable, evaluate
    from npbml.train import load_learner, train

    # The cost of a test task is timed before training and re-measured at every validation
    # (same episode shape and steps).
    per_task = [_seconds_per_test_task(config, tasksets)]

    def measure(step: int, records: list[dict[str, Any]]) -> None:
        for r in records:
            if r["split"] == "validation":
                per_task[0] = r["eval_s"] / r["tasks"]

    def out_of_time(step: int) -> bool:
        return time.perf_counter() + 1.1 * per_task[0] * tasks >= deadline

    if out_of_time(0):
        print(
            f"   budget too small: testing alone takes ~{per_task[0] * tasks:.0f} s; "
            "training one step only (raise --minutes or lower --tasks)",
            file=log,
        )
    t0 = time.perf_counter()
    tr = train(
        config,
        out_dir,
        resume=False,
        callbacks=[measure],
        stop_when=out_of_time,
        tasksets=tasksets,
        progress=not args.json,
    )
    t1 = time.perf_counter()
    learner, _, _ = load_learner(out_dir, "cpu")
    use_threads(config)
    res = evaluate(
        cast(Evaluable, learner),  # every learner of npbml.algorithms is Evaluable
        tasksets.test,
        tasks,
        progress=not args.json,
        desc="test",
        workers=config.train.task_workers,
    )
    return {
        **res,
        "meta_steps": tr.step,
        "best_val_accuracy": tr.best_val_accuracy,
        "train_s": round(t1 - t0, 1),
        "test_s": round(time.perf_counter() - t1, 1),
    }


def _run_method(
    run: DemoRun, config: Config, args: Any, deadline: float, log: TextIO
) -> dict[str, Any]:
    """Pre-train (NPBML), meta-train and test one method of the demo.

    Args:
        run: the demo entry.
        config: its config (``--set`` applied).
        args: the command's options.
        deadline: ``time.perf_counter()`` value by which this method should be done.
        log: where progress goes.

    Returns:
        The result record, with the config finally used (pre-trained checkpoints included).
    """
    from npbml.train import make_tasksets

    tasks = args.tasks if args.tasks is not None else config.eval.tasks
    use_threads(config)
    tasksets = make_tasksets(config)
    out_dir = Path(args.out) / run.label.lower().replace(" ", "-")
    if run.pretrain_steps or run.relation_steps:
        out_dir.mkdir(parents=True, exist_ok=True)
        extra = _pretrain(run, config, tasksets, out_dir, log)
        config = demo_config(run, [*args.overrides, *extra])
    res = _train_and_test(config, tasksets, out_dir, tasks, deadline, args, log)
    return {"method": run.label, **res, "config": config.to_dict(), "run_dir": str(out_dir)}


def _print_table(args: Any, configs: list[Config], results: list[dict[str, Any]]) -> None:
    """The human-readable summary: one block per method."""
    d = configs[0].data
    print(
        f"\nDemo ({args.minutes:g} min budget): {d.ways}-way {d.shots}-shot {d.name} test "
        "accuracy (best-validation checkpoint, classes unseen in meta-training)"
    )
    for r, config in zip(results, configs):
        print(
            f"  {r['method']:<8} {format_accuracy(r)}  after {r['meta_steps']} meta-steps "
            f"({r['train_s']:.0f} s training incl. validation, {r['test_s']:.0f} s testing)"
        )
        print(f"           {describe(config)}")
        print(f"           run directory: {r['run_dir']}")


def run(args: argparse.Namespace) -> int:
    """Run every method of :data:`DEMO_RUNS` in its share of ``--minutes`` and report.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: ``--minutes`` or ``--tasks`` is not positive.
    """
    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {args.minutes}")
    if args.tasks is not None and args.tasks < 1:
        raise ConfigError(f"--tasks must be >= 1, got {args.tasks}")
    configs = [(run, demo_config(run, args.overrides)) for run in DEMO_RUNS]
    log = sys.stderr if args.json else sys.stdout
    deadline = time.perf_counter() + 60.0 * args.minutes
    results = []
    for i, (demo_run, config) in enumerate(configs):
        print(f"== {demo_run.label}: {describe(config)}", file=log, flush=True)
        # The methods share what is left of the budget.
        share = (deadline - time.perf_counter()) / (len(configs) - i)
        results.append(_run_method(demo_run, config, args, time.perf_counter() + share, log))
    if args.json:
        print(json.dumps({"results": results}))
    else:
        _print_table(args, [c for _, c in configs], results)
    return 0


COMMAND = Command(
    "demo", "meta-train and test the demo methods on generated glyphs", add_arguments, run
)
