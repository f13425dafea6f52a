"""``npbml demo``: MAML, NPBML and the nearest-prototype baseline on real Omniglot characters,
meta-trained and tested within one time budget.

The default data are the Omniglot "minimal" splits bundled with the package (``tasks/data/
omniglot``, Lake et al. 2015): meta-train on ``images_background_small1``, test 5-way 1-shot on
the characters of ``images_background_small2`` from other alphabets (cross-alphabet), so no
download is needed. ``--data glyphs`` runs the generated glyph family instead.

The budget (``--minutes``) is shared by the methods of :data:`DEMO_FAMILIES` in proportion to
their ``weight``. NPBML's share starts with its two pre-training stages
(:func:`npbml.pretrain.run_pretrain_backbone` and
:func:`npbml.pretrain.run_pretrain_relation_network`, the functions behind ``npbml pretrain`` and
``npbml pretrain-relation``); every trained method then meta-trains until the time left only
just covers testing. The nearest-prototype baseline ("Proto") trains nothing: it classifies by
the nearest class mean on NPBML's pre-trained backbone. Every method is tested on the same fixed
test episodes (same data section and seed), so the demo reports paired per-episode differences
(:func:`npbml.evaluate.paired_difference`) besides each accuracy, and draws every method's
validation curve into ``OUT/curves.png`` (with the ``plot`` extra).
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

# The demo's configs are package data (npbml/configs/), so an installed wheel runs the demo from
# any folder; configs/demo*.yaml in a checkout are links to them.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# The budget the pre-training step counts below are sized for; smaller budgets scale them down.
REFERENCE_MINUTES = 8.0


@dataclass
class DemoRun:
    """One entry of the demo comparison.

    Attributes:
        label: the method's name in the report (also its run folder, lower-cased).
        config: a config file in :data:`CONFIG_DIR`.
        overrides: ``--set`` values applied to that config first.
        pretrain_steps: NPBML's supervised backbone pre-training steps (docs/methods/npbml.md), at
            the :data:`REFERENCE_MINUTES` budget; run inside this method's share.
        relation_steps: its relation-network pre-training steps, likewise.
        pretrain_batch: the backbone pre-training batch size.
        weight: this method's share of the budget, relative to the others'.
        backbone_of: a label whose pre-trained backbone this method is tested on, without
            training (the nearest-prototype baseline); that method must come earlier.
    """

    label: str
    config: str
    overrides: tuple[str, ...] = ()
    pretrain_steps: int = 0
    relation_steps: int = 0
    pretrain_batch: int = 64
    weight: float = 1.0
    backbone_of: str | None = None


# Real characters: the recipe issue 12 chose on validation (docs/results.md): a backbone
# pre-trained with batch 128 (best 20-way validation at 500-750 steps there) and meta-lr 1e-3.
OMNIGLOT_RUNS: list[DemoRun] = [
    DemoRun("MAML", "demo_omniglot.yaml"),
    DemoRun(
        "NPBML",
        "npbml_demo_omniglot.yaml",
        pretrain_steps=500,
        relation_steps=200,
        pretrain_batch=128,
    ),
    # Testing only (a few seconds): a small share, taken from the two trained methods.
    DemoRun(
        "Proto",
        "npbml_demo_omniglot.yaml",
        ("algorithm.name=proto", "algorithm.options={distance: cosine}"),
        weight=0.06,
        backbone_of="NPBML",
    ),
]
GLYPH_RUNS: list[DemoRun] = [
    DemoRun("MAML", "demo.yaml"),
    DemoRun("NPBML", "npbml_demo.yaml", pretrain_steps=300, relation_steps=200),
]
# --data -> the methods the demo compares, in order.
DEMO_FAMILIES: dict[str, list[DemoRun]] = {"omniglot": OMNIGLOT_RUNS, "glyphs": GLYPH_RUNS}
DEMO_RUNS = OMNIGLOT_RUNS  # the default family


def demo_config(run: DemoRun, extra: Sequence[str] = ()) -> Config:
    """The validated config of a demo run.

    Args:
        run: the demo entry.
        extra: overrides applied after the entry's own (``--set`` values, checkpoints).

    Returns:
        The config.

    Raises:
        ConfigError: the config file is missing from the install.
    """
    path = CONFIG_DIR / run.config
    if not path.is_file():
        raise ConfigError(
            f"demo config {str(path)!r} not found: the npbml install lacks its package data; "
            "reinstall it (pip install --force-reinstall npbml, or pip install -e . in a checkout)"
        )
    return load_config(path, [*run.overrides, *extra])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``npbml demo``.

    Args:
        p: the command's parser.
    """
    p.add_argument("--minutes", type=float, default=8.0, help="total time budget (default 8)")
    p.add_argument(
        "--data",
        choices=sorted(DEMO_FAMILIES),
        default="omniglot",
        help="omniglot: the bundled Omniglot minimal characters (default); glyphs: generated",
    )
    p.add_argument("--out", default="runs/demo", help="directory for the runs (default runs/demo)")
    p.add_argument(
        "--tasks", type=int, default=None, help="test tasks per method (default: eval.tasks)"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of every method (train.seed; default 0)"
    )
    add_set_flag(p, what="a value in every demo config", example="train.threads=1")
    add_json_flag(p, help="print the results as one JSON object")


def _scaled(steps: int, minutes: float) -> int:
    """Pre-training steps for a ``minutes`` budget: ``steps`` at :data:`REFERENCE_MINUTES`,
    proportionally fewer below it (at least 5, so that a tiny test budget still pre-trains)."""
    return max(5, min(steps, round(steps * minutes / REFERENCE_MINUTES)))


def _pretrain(
    run: DemoRun, config: Config, tasksets: Any, out_dir: Path, minutes: float, log: TextIO
) -> tuple[tuple[str, ...], float]:
    """Run NPBML's two pre-training stages for a demo run.

    Args:
        run: the demo entry (its pre-training step counts and batch size).
        config: its config.
        tasksets: its task sets.
        out_dir: where ``backbone.pt`` and ``relation.pt`` go.
        minutes: the demo's budget (scales the step counts, :func:`_scaled`).
        log: where progress goes.

    Returns:
        The overrides that point the run at the two checkpoints, and the seconds taken.
    """
    from npbml.pretrain import run_pretrain_backbone, run_pretrain_relation_network

    t0 = time.perf_counter()
    steps, rel_steps = _scaled(run.pretrain_steps, minutes), _scaled(run.relation_steps, minutes)
    print(
        f"   pre-training the backbone ({steps} steps x batch {run.pretrain_batch}) and the "
        f"relation network ({rel_steps} steps)",
        file=log,
        flush=True,
    )
    # Validate twice in the backbone stage and keep the better one; once in the relation stage.
    bb, backbone = run_pretrain_backbone(
        config,
        tasksets,
        out_dir / "backbone.pt",
        steps=steps,
        batch_size=run.pretrain_batch,
        eval_every=max(1, (steps + 1) // 2),
    )
    rel, relation = run_pretrain_relation_network(
        config,
        tasksets,
        out_dir / "relation.pt",
        steps=rel_steps,
        eval_every=rel_steps,
        channels=int(config.model.options.get("hidden", 64)),  # the backbone's width
    )
    print(
        f"   pre-training ({time.perf_counter() - t0:.0f} s): backbone nearest-prototype "
        f"validation accuracy {100 * bb.best_accuracy:.1f}% (step {bb.best_step}), relation "
        f"network {100 * rel.best_accuracy:.1f}%",
        file=log,
        flush=True,
    )
    overrides = (
        f"algorithm.options.backbone_checkpoint={backbone}",
        f"algorithm.options.relation_checkpoint={relation}",
    )
    return overrides, time.perf_counter() - t0


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


class _BudgetBar:
    """A progress bar of the time budget (elapsed / budget seconds), not of the step ceiling:
    a demo run stops at its time share, far below ``train.meta_steps``."""

    def __init__(self, label: str, budget_s: float, show: bool) -> None:
        self.t0 = time.perf_counter()
        self.val = ""
        self.total = max(1, round(budget_s))
        self.bar: Any = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total,
                desc=f"{label} meta-train",
                # tqdm puts ", " before a postfix: "MAML meta-train: 45%|#  | 108/240 s, step 9"
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} s{postfix}",
                dynamic_ncols=True,
            )

    def __call__(self, step: int, records: list[dict[str, Any]]) -> None:
        """A training callback: move the bar to the elapsed time; show the step and the
        latest validation accuracy."""
        bar = self.bar
        if bar is None:
            return
        for r in records:
            if r["split"] == "validation":
                bar.write(f"   step {step}: validation accuracy {100 * r['accuracy']:.2f}%")
                self.val = f", val {100 * r['accuracy']:.1f}%"
        bar.n = min(self.total, round(time.perf_counter() - self.t0))
        bar.set_postfix_str(f"step {step}{self.val}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stop_rule(
    config: Config, tasksets: Any, tasks: int, deadline: float, minutes: float, log: TextIO
) -> tuple[Any, Any]:
    """When a demo method stops meta-training: when the time left before ``deadline`` only
    just covers testing ``tasks`` tasks, but not before its first validation.

    The minimum is the config's ``val_every`` steps (scaled down for budgets under
    :data:`REFERENCE_MINUTES`, :func:`_scaled`): on a busy machine pre-training and the test
    reservation can eat a whole share, and a method tested at its starting point says nothing,
    so the budget overruns instead.

    Args:
        config: the run's config.
        tasksets: its task sets.
        tasks: test tasks.
        deadline: ``time.perf_counter()`` value by which testing should end.
        minutes: the demo's budget.
        log: where the "budget too small" note goes.

    Returns:
        ``(measure, out_of_time)``: a training callback that re-measures the cost of a test task
        at validations, and the ``stop_when`` predicate.
    """
    # The cost of a test task is timed before training and re-measured at every validation
    # (same episode shape and steps).
    per_task = [_seconds_per_test_task(config, tasksets)]
    min_steps = min(config.train.val_every, _scaled(config.train.val_every, minutes))

    validated = [False]

    def measure(step: int, records: list[dict[str, Any]]) -> None:
        for r in records:
            if r["split"] == "validation":
                cost = r["eval_s"] / r["tasks"]
                # The first validation meets its episodes for the first time, as the test will;
                # later ones can be faster than a test task (NPBML caches the frozen features of
                # episodes seen before), so they can only raise the estimate (a busier machine).
                per_task[0] = max(per_task[0], cost) if validated[0] else cost
                validated[0] = True

    def out_of_time(step: int) -> bool:
        late = time.perf_counter() + 1.1 * per_task[0] * tasks >= deadline
        return late and step >= min_steps

    if time.perf_counter() + 1.1 * per_task[0] * tasks >= deadline:
        print(
            f"   budget too small: testing alone takes ~{per_task[0] * tasks:.0f} s of the "
            f"{deadline - time.perf_counter():.0f} s left; training {min_steps} steps anyway, "
            "past the budget (raise --minutes or lower --tasks)",
            file=log,
        )
    return measure, out_of_time


def _train_and_test(
    label: str,
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
        label: the method's name (progress bar).
        config: the run's config.
        tasksets: its task sets.
        out_dir: its run directory.
        tasks: test tasks.
        deadline: ``time.perf_counter()`` value by which testing should end.
        args: the command's options (``json``).
        log: where progress goes.

    Returns:
        The test result (per-episode accuracies included) with the meta-steps, best validation
        accuracy and timings.
    """
    from npbml.train import load_learner, train

    measure, out_of_time = _stop_rule(config, tasksets, tasks, deadline, args.minutes, log)
    bar = _BudgetBar(label, deadline - time.perf_counter(), show=not args.json)
    t0 = time.perf_counter()
    try:
        # train's own bar counts steps up to the meta_steps ceiling; the demo shows its budget.
        tr = train(
            config,
            out_dir,
            resume=False,
            callbacks=[measure, bar],
            stop_when=out_of_time,
            tasksets=tasksets,
            progress=False,
        )
    finally:
        bar.close()
    t1 = time.perf_counter()
    learner, _, _ = load_learner(out_dir, "cpu")
    res = _test(learner, config, tasksets, tasks, args)
    return {
        **res,
        "meta_steps": tr.step,
        "best_val_accuracy": tr.best_val_accuracy,
        "train_s": round(t1 - t0, 1),
        "test_s": round(time.perf_counter() - t1, 1),
    }


def _test(learner: Any, config: Config, tasksets: Any, tasks: int, args: Any) -> dict[str, Any]:
    """Per-episode accuracies of ``learner`` on test episodes ``0 .. tasks-1``."""
    from npbml.evaluate import Evaluable, evaluate

    use_threads(config)
    return evaluate(
        cast(Evaluable, learner),  # every learner of npbml.algorithms is Evaluable
        tasksets.test,
        tasks,
        progress=not args.json,
        desc="test",
        workers=config.train.task_workers,
        per_task=True,
    )


def _test_untrained(
    config: Config, tasksets: Any, backbone: str, tasks: int, args: Any
) -> dict[str, Any]:
    """Test a method that trains nothing: the nearest-prototype baseline on a pre-trained
    backbone. Its accuracy on the trained methods' validation episodes stands in for a curve.

    Args:
        config: its config (``algorithm.name: proto``).
        tasksets: its task sets.
        backbone: the pre-trained backbone checkpoint (``npbml pretrain``'s output).
        tasks: test tasks.
        args: the command's options (``json``).

    Returns:
        As :func:`_train_and_test`, with 0 meta-steps.
    """
    from npbml.evaluate import Evaluable, evaluate
    from npbml.models.weights import load_backbone_weights
    from npbml.train import build_learner, infer_model_kwargs

    learner = build_learner(config, infer_model_kwargs(config, tasksets))
    load_backbone_weights(cast(Any, learner).model, backbone)  # PrototypeClassifier's backbone
    t0 = time.perf_counter()
    val = evaluate(
        cast(Evaluable, learner),
        tasksets.validation,
        config.train.val_tasks,
        workers=config.train.task_workers,
    )
    res = _test(learner, config, tasksets, tasks, args)
    return {
        **res,
        "meta_steps": 0,
        "best_val_accuracy": val["accuracy"],
        "train_s": 0.0,
        "test_s": round(time.perf_counter() - t0, 1),
    }


def _run_method(
    run: DemoRun,
    config: Config,
    args: Any,
    deadline: float,
    done: dict[str, dict[str, Any]],
    log: TextIO,
) -> dict[str, Any]:
    """Pre-train (NPBML), meta-train and test one method of the demo.

    Args:
        run: the demo entry.
        config: its config (``--set`` applied).
        args: the command's options.
        deadline: ``time.perf_counter()`` value by which this method should be done.
        done: the results of the methods run before, by label (``backbone_of`` reads them).
        log: where progress goes.

    Returns:
        The result record, with the config finally used (pre-trained checkpoints included).
    """
    from npbml.train import make_tasksets

    tasks = args.tasks if args.tasks is not None else config.eval.tasks
    use_threads(config)
    tasksets = make_tasksets(config)
    out_dir = Path(args.out) / run.label.lower().replace(" ", "-")
    if run.backbone_of is not None:
        backbone = done[run.backbone_of]["config"]["algorithm"]["options"]["backbone_checkpoint"]
        res = _test_untrained(config, tasksets, backbone, tasks, args)
        return {"method": run.label, **res, "config": config.to_dict(), "run_dir": None}
    pretrain_s = 0.0
    if run.pretrain_steps or run.relation_steps:
        out_dir.mkdir(parents=True, exist_ok=True)
        extra, pretrain_s = _pretrain(run, config, tasksets, out_dir, args.minutes, log)
        config = demo_config(run, [*_overrides(args), *extra])
    res = _train_and_test(run.label, config, tasksets, out_dir, tasks, deadline, args, log)
    res["pretrain_s"] = round(pretrain_s, 1)
    if res["best_val_accuracy"] is None:
        # Stopped before its first validation: the number is (nearly) the starting point.
        pre = f"pre-training took {pretrain_s:.0f} s; " if pretrain_s else ""
        res["warning"] = (
            f"{run.label} ran out of its share after {res['meta_steps']} meta-step(s), before its "
            f"first validation ({pre}a small budget or a busy machine): its accuracy is its "
            "starting point, not a meta-trained result; raise --minutes"
        )
    return {"method": run.label, **res, "config": config.to_dict(), "run_dir": str(out_dir)}


def _overrides(args: Any) -> list[str]:
    """The ``--set`` values of every demo config, ``--seed`` first (a ``--set`` wins)."""
    seed = [] if args.seed is None else [f"train.seed={args.seed}"]
    return [*seed, *args.overrides]


def _check_same_episodes(runs: Sequence[DemoRun], configs: Sequence[Config]) -> None:
    """The paired comparison needs every method on the same test episodes: the same data
    section and seed (the test sampler's seed derives from ``train.seed``)."""
    first = configs[0]
    for run, config in zip(runs, configs):
        if config.data != first.data or config.train.seed != first.train.seed:
            raise ConfigError(
                f"demo method {run.label} would see other test episodes than {runs[0].label} "
                f"(its data section or train.seed differs); change the --set values so that "
                "every method has the same data and seed"
            )


def _paired(results: Sequence[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """The paired per-episode difference ``a - b`` of two methods (None if one is missing)."""
    from npbml.evaluate import paired_difference

    by = {r["method"]: r for r in results}
    if a not in by or b not in by:
        return None
    return {"a": a, "b": b, **paired_difference(by[a]["accuracies"], by[b]["accuracies"])}


def _describe(run: DemoRun, config: Config) -> str:
    """One line naming the method (:func:`describe`, or the baseline's backbone)."""
    if run.backbone_of is None:
        return describe(config)
    m = config.model
    opts = ", ".join(f"{k}={v}" for k, v in m.options.items())
    distance = config.algorithm.options.get("distance", "cosine")
    return (
        f"nearest prototype ({distance}) on {run.backbone_of}'s pre-trained {m.name}({opts}), "
        f"{config.data.name} {config.data.ways}-way {config.data.shots}-shot, no meta-training"
    )


def _print_report(
    args: Any,
    runs: Sequence[DemoRun],
    configs: list[Config],
    results: list[dict[str, Any]],
    diffs: list[dict[str, Any]],
) -> None:
    """The human-readable summary: one block per method, then the paired differences."""
    d = configs[0].data
    where = "cross-alphabet, " if d.name == "omniglot-minimal" else ""
    print(
        f"\nDemo ({args.minutes:g} min budget, seed {configs[0].train.seed}): {d.ways}-way "
        f"{d.shots}-shot {d.name} test accuracy ({where}best-validation checkpoint, classes "
        "unseen in meta-training, the same test episodes for every method)"
    )
    for run, r, config in zip(runs, results, configs):
        steps = f"after {r['meta_steps']} meta-steps" if r["meta_steps"] else "no meta-training"
        print(
            f"  {r['method']:<8} {format_accuracy(r)}  {steps} "
            f"({r['train_s']:.0f} s training incl. validation, {r['test_s']:.0f} s testing)"
        )
        print(f"           {_describe(run, config)}")
        if r["run_dir"] is not None:
            print(f"           run directory: {r['run_dir']}")
    for r in results:
        if r.get("warning"):
            print(f"  warning: {r['warning']}")
    for p in diffs:
        print(
            f"  {p['a']} - {p['b']}: {100 * p['mean']:+.2f} +- {100 * p['ci95']:.2f} points "
            f"(95% CI, paired over {p['n']} episodes; {p['a']} better on {p['wins']}, worse on "
            f"{p['losses']})"
        )


def _plot(results: Sequence[dict[str, Any]], out: Path, log: TextIO) -> str | None:
    """Every method's validation curve against its time since the start of its share into
    ``out`` (pre-training included), None without matplotlib: the numbers do not need it."""
    from npbml.plots import plot_validation_curves
    from npbml.run_dir import read_metrics

    runs = {r["method"]: Path(r["run_dir"]) for r in results if r["run_dir"] is not None}
    # A run stopped before its first logged step (a tiny budget) has no curve to draw.
    runs = {k: d for k, d in runs.items() if read_metrics(d / "metrics.jsonl")}
    flat = {r["method"]: r["best_val_accuracy"] for r in results if r["run_dir"] is None}
    offsets = {r["method"]: r.get("pretrain_s", 0.0) for r in results}
    d = results[0]["config"]["data"]
    title = f"validation accuracy, {d['ways']}-way {d['shots']}-shot {d['name']}"
    try:
        return str(plot_validation_curves(runs, out, flat, offsets, title))
    except ImportError as e:
        print(f"   no curves picture: {e}", file=log)
        return None


def run(args: argparse.Namespace) -> int:
    """Run every method of the ``--data`` family in its share of ``--minutes`` and report.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: ``--minutes`` or ``--tasks`` is not positive, or the methods' configs
            would not share their test episodes.
    """
    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {args.minutes}")
    if args.tasks is not None and args.tasks < 1:
        raise ConfigError(f"--tasks must be >= 1, got {args.tasks}")
    runs = DEMO_FAMILIES[getattr(args, "data", "omniglot")]
    configs = [demo_config(r, _overrides(args)) for r in runs]
    _check_same_episodes(runs, configs)
    log = sys.stderr if args.json else sys.stdout
    deadline = time.perf_counter() + 60.0 * args.minutes
    done: dict[str, dict[str, Any]] = {}
    for i, (demo_run, config) in enumerate(zip(runs, configs)):
        print(f"== {demo_run.label}: {_describe(demo_run, config)}", file=log, flush=True)
        # The methods left share what is left of the budget, in proportion to their weights.
        share = demo_run.weight / sum(r.weight for r in runs[i:])
        end = time.perf_counter() + share * (deadline - time.perf_counter())
        done[demo_run.label] = _run_method(demo_run, config, args, end, done, log)
    results = list(done.values())
    pairs = (_paired(results, "NPBML", "MAML"), _paired(results, "NPBML", "Proto"))
    diffs = [p for p in pairs if p is not None]
    curves = _plot(results, Path(args.out) / "curves.png", log)
    summary = {"results": results, "paired": diffs, "curves": curves, "minutes": args.minutes}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary))
    else:
        _print_report(args, runs, configs, results, diffs)
        if curves is not None:
            print(f"  validation curves: {curves}")
    return 0


COMMAND = Command(
    "demo",
    "meta-train and test MAML, NPBML and nearest prototypes on real Omniglot characters",
    add_arguments,
    run,
)
