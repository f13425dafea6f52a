"""Command-line interface: ``npbml <subcommand> ...``.

Subcommands: ``train``, ``eval``, ``eval-lake``, ``demo``. Each is registered with
:func:`subcommand`; a module that defines more (e.g. ``fit``, ``evolve``) decorates its handler
with ``@subcommand(...)`` and adds its module name to :data:`SUBCOMMAND_MODULES`, which
:func:`build_parser` imports before building the parser.

Bad input (missing config file, unknown key, missing dataset, damaged checkpoint) is reported as
one line ``npbml: error: ...`` on stderr with exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from npbml import pretrain
from npbml.checkpoint import CheckpointError
from npbml.config import Config, ConfigError, load_config
from tasks.errors import TaskDataError

# Modules imported by build_parser so that their @subcommand registrations run.
SUBCOMMAND_MODULES: list[str] = ["npbml.fit", "npbml.evomal.cli"]

# Exceptions that mean "the input is wrong", reported without a traceback (exit code 2).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    CheckpointError,
    TaskDataError,
    FileNotFoundError,
    FloatingPointError,  # a diverging run (train names the step and the settings to change)
)

EXIT_USAGE = 2

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


_SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[Callable[[argparse.Namespace], int | None]], Callable[..., int | None]]:
    """Register ``fn(args) -> exit code`` as ``npbml <name>``; ``arguments(p)`` adds options."""

    def register(fn: Callable[[argparse.Namespace], int | None]) -> Callable[..., int | None]:
        if name in _SUBCOMMANDS:
            raise ValueError(f"subcommand {name!r} is already registered")
        _SUBCOMMANDS[name] = Subcommand(name, help, arguments or (lambda p: None), fn)
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    import importlib

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module)
    from npbml import __version__

    parser = argparse.ArgumentParser(
        prog="npbml", description="Few-shot meta-learning: train, evaluate, demo."
    )
    parser.add_argument("--version", action="version", version=f"npbml {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in _SUBCOMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``npbml`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with code 2 on bad usage
    threads = torch.get_num_threads()
    try:
        code = args._run(args)
    except USER_ERRORS as e:
        msg = str(e) or type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"npbml: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("npbml: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # commands may set train.threads; main() is reentrant
    return int(code or 0)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def format_accuracy(res: dict[str, Any]) -> str:
    """``"47.20% +- 1.81% (95% CI, 600 tasks)"``."""
    return f"{_pct(res['accuracy'])} +- {_pct(res['ci95'])} (95% CI, {res['tasks']} tasks)"


def _describe(config: Config) -> str:
    d, a, m = config.data, config.algorithm, config.model
    opts = ", ".join(f"{k}={v}" for k, v in m.options.items())
    return (
        f"{a.name} on {d.name} {d.ways}-way {d.shots}-shot, {m.name}"
        f"{f'({opts})' if opts else ''}, inner lr {a.inner_lr}, {a.inner_steps} inner steps "
        f"(test {a.eval_inner_steps or a.inner_steps}), meta-batch {config.train.meta_batch_size}"
    )


def _use_threads(config: Config) -> None:
    """Evaluate with the run's ``train.threads`` (this process only runs this command)."""
    if config.train.threads is not None:
        torch.set_num_threads(config.train.threads)


def _emit(result: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(result) if as_json else text)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.meta_steps=100 (repeatable)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run directory: checkpoints, metrics, config (default: runs/<config file name>)",
    )
    p.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start over even if DIR/last.pt exists (its files are overwritten)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="pause after this many steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


@subcommand("train", "meta-train a learner from a YAML config", _train_args)
def _cmd_train(args: argparse.Namespace) -> int:
    from npbml.train import train

    config = load_config(args.config, args.overrides)
    out = args.out if args.out is not None else Path("runs") / Path(args.config).stem
    result = train(
        config, out, resume=args.resume, max_steps=args.max_steps, progress=not args.quiet
    )
    if result.rank != 0:
        return 0  # under torchrun, rank 0 alone reports
    best = result.best_val_accuracy
    status = "finished" if result.finished else "paused"
    print(
        f"{status} at step {result.step}/{config.train.meta_steps}; best validation accuracy "
        f"{_pct(best) if best is not None else 'n/a'}; run directory {result.out_dir}\n"
        f"evaluate with: npbml eval --checkpoint {result.out_dir}"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory (uses best.pt) or a .pt file")
    p.add_argument("--tasks", type=int, default=None, help="number of tasks (default: eval.tasks)")
    p.add_argument(
        "--split",
        choices=("train", "validation", "test"),
        default=None,
        help="episodes of this split (default: eval.split, normally test)",
    )
    p.add_argument("--which", default="best.pt", help="checkpoint file in a run directory")
    p.add_argument("--root", default=None, help="dataset root (default: the run's data.root)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _load_run(args: argparse.Namespace) -> tuple[Any, Path, Any, Any, dict[str, Any]]:
    """``(device, checkpoint path, learner, config, state)`` from ``--checkpoint``, ``--which``
    and ``--device`` (the shared start of ``eval`` and ``eval-lake``)."""
    from npbml.train import load_learner, resolve_checkpoint, resolve_device

    device = resolve_device(args.device)
    path = resolve_checkpoint(args.checkpoint, args.which)
    learner, config, state = load_learner(path, device)
    return device, path, learner, config, state


@subcommand("eval", "mean test accuracy with a 95%% interval over fixed episodes", _eval_args)
def _cmd_eval(args: argparse.Namespace) -> int:
    from npbml.evaluate import evaluate
    from npbml.train import make_tasksets

    device, path, learner, config, state = _load_run(args)
    _use_threads(config)
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
    _emit(out, args.json, f"{split} accuracy {format_accuracy(res)}\n  {_describe(config)}")
    return 0


# ---------------------------------------------------------------------------------------------
# eval-lake
# ---------------------------------------------------------------------------------------------


def _lake_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory (uses best.pt) or a .pt file")
    p.add_argument("--runs", required=True, help="all_runs.zip or the folder with run01..run20")
    p.add_argument("--which", default="best.pt", help="checkpoint file in a run directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")


@subcommand("eval-lake", "error rate on Lake et al.'s 20-way one-shot runs", _lake_args)
def _cmd_eval_lake(args: argparse.Namespace) -> int:
    from npbml.evaluate import evaluate_lake
    from tasks.lake import LakeRuns

    device, path, learner, config, state = _load_run(args)
    mk = state["model_kwargs"]
    if mk.get("num_classes") != 20:
        raise ConfigError(
            f"the Lake runs are 20-way, but {path} holds a {mk.get('num_classes')}-way model; "
            "evaluate a checkpoint trained with data.ways=20 (e.g. configs/omniglot_20w1s.yaml)"
        )
    _use_threads(config)
    runs = LakeRuns(args.runs, image_size=int(mk.get("image_size", 28)))
    res = evaluate_lake(learner, runs, device=device)
    out = {**res, "checkpoint": str(path), "step": int(state["step"])}
    text = (
        f"Lake 20-way one-shot error rate {_pct(res['error_rate'])} "
        f"({res['errors']}/{res['items']} items, {res['runs']} runs)\n  {_describe(config)}"
    )
    _emit(out, args.json, text)
    return 0


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------


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


def _demo_pretrain(
    run: DemoRun, config: Config, tasksets: Any, out_dir: Path, log: Any
) -> tuple[str, ...]:
    """Pre-train the backbone and the relation network of an NPBML demo run; returns the config
    overrides that point the run at the two checkpoints."""
    from npbml.models import build_model
    from npbml.relation import RelationNetwork, save_relation
    from npbml.train import infer_model_kwargs

    kwargs = {**infer_model_kwargs(config, tasksets), **config.model.options}
    model = build_model(config.model.name, **kwargs)
    seed = config.train.seed
    t0 = time.perf_counter()
    bb = pretrain.pretrain_backbone(
        model,
        tasksets.train.dataset,
        steps=run.pretrain_steps,
        val_source=tasksets.validation,
        eval_every=run.pretrain_steps,
        seed=seed,
    )
    backbone = pretrain.save_backbone(model, out_dir / "backbone.pt", config.model.name, kwargs)
    relation = RelationNetwork(
        channels=int(kwargs.get("hidden", 64)), in_channels=int(kwargs.get("in_channels", 1))
    )
    rel = pretrain.pretrain_relation(
        relation,
        tasksets.train,
        steps=run.relation_steps,
        val_source=tasksets.validation,
        eval_every=run.relation_steps,
        seed=seed,
    )
    rel_path = save_relation(relation, out_dir / "relation.pt")
    print(
        f"   pre-training ({time.perf_counter() - t0:.0f} s): backbone nearest-prototype "
        f"validation accuracy {100 * bb.best_accuracy:.1f}%, relation network "
        f"{100 * rel.best_accuracy:.1f}%",
        file=log,
        flush=True,
    )
    return (
        f"algorithm.options.backbone_checkpoint={backbone}",
        f"algorithm.options.relation_checkpoint={rel_path}",
    )


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=8.0, help="total time budget (default 8)")
    p.add_argument("--out", default="runs/demo", help="directory for the runs (default runs/demo)")
    p.add_argument(
        "--tasks", type=int, default=None, help="test tasks per method (default: eval.tasks)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value in every demo config (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")


def demo_config(run: DemoRun, extra: Sequence[str] = ()) -> Config:
    path = CONFIG_DIR / run.config
    if not path.is_file():
        raise ConfigError(
            f"demo config {str(path)!r} not found; run the demo from a source checkout "
            "(pip install -e .) so that configs/ is next to the package"
        )
    return load_config(path, [*run.overrides, *extra])


# NPBML's two pre-training stages (METHODS.md section 3): the backbone, then the relation network.
subcommand(
    "pretrain", "supervised backbone pre-training for NPBML", pretrain.add_pretrain_arguments
)(pretrain.run_pretrain)
subcommand(
    "pretrain-relation",
    "relation-network pre-training for NPBML's transductive loss",
    pretrain.add_pretrain_relation_arguments,
)(pretrain.run_pretrain_relation)


@subcommand("demo", "meta-train and test the demo methods on generated glyphs", _demo_args)
def _cmd_demo(args: argparse.Namespace) -> int:
    from npbml.evaluate import evaluate
    from npbml.train import build_learner, infer_model_kwargs, load_learner, make_tasksets, train

    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {args.minutes}")
    if args.tasks is not None and args.tasks < 1:
        raise ConfigError(f"--tasks must be >= 1, got {args.tasks}")
    configs = [(run, demo_config(run, args.overrides)) for run in DEMO_RUNS]
    log = sys.stderr if args.json else sys.stdout
    deadline = time.perf_counter() + 60.0 * args.minutes
    results = []
    for i, (run, config) in enumerate(configs):
        print(f"== {run.label}: {_describe(config)}", file=log, flush=True)
        tasks = args.tasks if args.tasks is not None else config.eval.tasks
        # The methods share what is left of the budget. Each trains until the time left in its
        # share only just covers testing: the cost of a test task is timed on this machine
        # before training and re-measured at every validation (same episode shape and steps).
        run_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (len(configs) - i)
        _use_threads(config)
        tasksets = make_tasksets(config)
        out_dir = Path(args.out) / run.label.lower().replace(" ", "-")
        if run.pretrain_steps or run.relation_steps:
            out_dir.mkdir(parents=True, exist_ok=True)
            extra = _demo_pretrain(run, config, tasksets, out_dir, log)
            config = demo_config(run, [*args.overrides, *extra])
        probe = build_learner(config, infer_model_kwargs(config, tasksets))
        workers = config.train.task_workers
        probe.evaluate(tasksets.test.sample(0))  # warm-up
        t0 = time.perf_counter()
        evaluate(probe, tasksets.test, 8, workers=workers)  # as the final test will run
        per_task = [(time.perf_counter() - t0) / 8]
        del probe

        def measure(step: int, records: list[dict[str, Any]], per_task=per_task) -> None:
            for r in records:
                if r["split"] == "validation":
                    per_task[0] = r["eval_s"] / r["tasks"]

        def out_of_time(
            step: int, per_task=per_task, run_deadline=run_deadline, tasks=tasks
        ) -> bool:
            return time.perf_counter() + 1.1 * per_task[0] * tasks >= run_deadline

        if out_of_time(0):
            print(
                f"   budget too small: testing alone takes ~{per_task[0] * tasks:.0f} s; "
                "training one step only (raise --minutes or lower --tasks)",
                file=log,
            )
        t2 = time.perf_counter()
        tr = train(
            config,
            out_dir,
            resume=False,
            callbacks=[measure],
            stop_when=out_of_time,
            tasksets=tasksets,
            progress=not args.json,
        )
        t3 = time.perf_counter()
        learner, _, _ = load_learner(out_dir, "cpu")
        _use_threads(config)
        res = evaluate(
            learner,
            tasksets.test,
            tasks,
            progress=not args.json,
            desc="test",
            workers=config.train.task_workers,
        )
        results.append(
            {
                "method": run.label,
                **res,
                "meta_steps": tr.step,
                "best_val_accuracy": tr.best_val_accuracy,
                "train_s": round(t3 - t2, 1),
                "test_s": round(time.perf_counter() - t3, 1),
                "config": config.to_dict(),
                "run_dir": str(out_dir),
            }
        )
    if args.json:
        print(json.dumps({"results": results}))
        return 0
    d = configs[0][1].data
    print(
        f"\nDemo ({args.minutes:g} min budget): {d.ways}-way {d.shots}-shot {d.name} test "
        "accuracy (best-validation checkpoint, classes unseen in meta-training)"
    )
    for r, (_, config) in zip(results, configs):
        print(
            f"  {r['method']:<8} {format_accuracy(r)}  after {r['meta_steps']} meta-steps "
            f"({r['train_s']:.0f} s training incl. validation, {r['test_s']:.0f} s testing)"
        )
        print(f"           {_describe(config)}")
        print(f"           run directory: {r['run_dir']}")
    return 0
