"""Compare six losses for ordinary training on Omniglot minimal (`npbml fit`).

All 242 characters are the classes by default; ``--classes K`` keeps the first ``K`` (e.g. 20:
Balinese characters 1-20), the few-class regime of the learned-loss papers' MNIST / CIFAR-10
results. ``--learned-set KEY=VALUE`` overrides the config of the ML3 and AdaLFL runs only (e.g.
``loss.inputs=log_prob``, a toolkit option, not the papers' form).

CE, label smoothing, SparseLSR (docs/methods/sparse-lsr.md), ML3 and AdaLFL
(docs/methods/learned-losses.md) and an EvoMAL loss (docs/methods/evomal.md) train the same model
(``configs/fit_omniglot.yaml``: Conv4-32, SGD Nesterov, cosine) with the same budget (epochs, batch
size) for each seed. Every run is an ``npbml fit`` subprocess with one torch thread, ``--jobs`` at a
time; finished runs are skipped and interrupted ones resume, so the script can be re-run after a
kill. The EvoMAL loss is either ``--evolved PATH`` (an ``npbml evolve`` output folder or an
``EvolvedLoss`` JSON) or, by default, the result of an ``npbml evolve`` search run first with
``--evolve-config`` (default ``configs/evomal_glyphs.yaml``: generated glyphs, no Omniglot image
involved).

Writes ``OUT/summary.json`` and, with ``--results``, a Markdown section between
``<!-- TAG:start -->`` and ``<!-- TAG:end -->`` of that file (``--tag``, default
``loss_comparison``; appended when the markers are absent; the rest of the file is left as it is).

    python scripts/loss_comparison.py --out runs/loss_comparison --results docs/results.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- loss_comparison:start -->", "<!-- loss_comparison:end -->"


def markers(tag: str) -> tuple[str, str]:
    """The start / end markers of the results section named ``tag``."""
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


#: Each loss: label, extra ``--set`` overrides of the base config. The evolved loss's
#: checkpoint is filled in at run time.
LOSSES: dict[str, tuple[str, list[str]]] = {
    "ce": ("cross-entropy", ["loss.name=ce"]),
    "label_smoothing": ("label smoothing (xi=0.1)", ["loss.name=label_smoothing"]),
    "sparse_lsr": ("SparseLSR (xi=0.1)", ["loss.name=sparse_lsr"]),
    "ml3": ("ML3 (offline, then frozen)", ["loss.name=ml3"]),
    "adalfl": ("AdaLFL (offline init + online)", ["loss.name=adalfl"]),
    "evolved": ("EvoMAL (evolved formula)", ["loss.name=evolved"]),
}
#: Longest first, so that two workers finish at about the same time.
ORDER = ["adalfl", "ml3", "evolved", "ce", "label_smoothing", "sparse_lsr"]

#: Two-sided 95% Student-t quantiles t_{0.975, n-1}: with 3 seeds the normal 1.96 would make the
#: interval less than half as wide as it should be.
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width ``t_{0.975,n-1} s / sqrt(n)`` (``s`` with ddof=1)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), math.nan
    t = T975.get(len(x), 1.96)
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def final_record(run: Path) -> dict[str, Any] | None:
    """The ``final`` record of a finished ``npbml fit`` run, else ``None``."""
    m = run / "metrics.jsonl"
    if not m.exists():
        return None
    lines = m.read_text().splitlines()
    if not lines:
        return None
    last = json.loads(lines[-1])
    return last if last.get("final") else None


def run_job(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run ``cmd`` with one thread, output to ``log``; returns (exit code, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.time()
    with open(log, "a") as fh:
        fh.write("$ " + shlex.join(cmd) + "\n")
        fh.flush()
        code = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    return code, time.time() - t0


def evolve(args: argparse.Namespace, out: Path) -> Path:
    """The EvoMAL loss to compare: ``--evolved`` or a fresh ``npbml evolve`` search."""
    if args.evolved:
        return Path(args.evolved)
    evo = out / "evomal"
    # Always called: a finished search returns at once, an interrupted one resumes.
    cmd = [sys.executable, "-m", "npbml", "evolve", "--config", args.evolve_config]
    cmd += ["--out", str(evo)]
    evo.mkdir(parents=True, exist_ok=True)
    code, secs = run_job(cmd, out / "evomal.log")
    print(f"evolve: exit {code} after {secs:.0f} s", flush=True)
    if code != 0 or not (evo / "best.json").exists():
        raise SystemExit(f"npbml evolve failed; see {out / 'evomal.log'}")
    return evo


def fit_command(args: argparse.Namespace, loss: str, seed: int, out: Path, evolved: Path | None):
    """The ``npbml fit`` command line of one (loss, seed) run."""
    sets = [*LOSSES[loss][1], f"train.seed={seed}", f"train.epochs={args.epochs}"]
    sets += ["train.threads=1", "train.progress=false"]
    if args.classes is not None:
        sets.append(f"data.first_classes={args.classes}")
    if loss in ("ml3", "adalfl"):
        sets += [f"loss.offline_steps={args.offline_steps}", f"loss.meta_lr={args.meta_lr}"]
        sets += args.learned_set
    if loss == "evolved":
        assert evolved is not None
        sets.append(f"loss.checkpoint={evolved.resolve()}")
    sets += args.set
    cmd = [sys.executable, "-m", "npbml", "fit", "--config", args.config, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def describe_data(config: str, sets: list[str]) -> dict[str, Any]:
    """Class and image counts, batch size and steps per epoch of the runs' data (seed 0)."""
    from npbml.config import apply_overrides, read_yaml
    from npbml.fit import build_fit_data, fit_config_from_dict

    cfg = fit_config_from_dict(apply_overrides(read_yaml(config), sets))
    data = build_fit_data(cfg)
    d = cfg.data
    return {
        "classes": data.num_outputs,
        "first_classes": d.first_classes,
        "train_images": len(data.train[0]),
        "val_images": len(data.val[0]),
        "test_images": len(data.test[0]),
        "val_per_class": d.val_per_class,
        "test_per_class": d.test_per_class,
        "batch_size": cfg.train.batch_size,
        "steps_per_epoch": math.ceil(len(data.train[0]) / cfg.train.batch_size),
        "model": f"{cfg.model.name}-{cfg.model.options.get('hidden', '')} (max-pool), "
        f"{cfg.optim.name.upper()} lr {cfg.optim.lr} Nesterov {cfg.optim.momentum} "
        f"wd {cfg.optim.weight_decay}, {cfg.optim.schedule} schedule",
    }


def markdown(summary: dict[str, Any], analysis: str, tag: str = "loss_comparison") -> str:
    """The results section (between the markers of ``tag``)."""
    s = summary
    d = s["data"]
    start, end = markers(tag)
    if d["first_classes"] is None:
        title = f"## Loss functions for ordinary {d['classes']}-class training (Omniglot minimal)"
        which = (
            "Every character of `images_background_small1` and `images_background_small2` is a "
            "class (Greek and Latin, present in both splits, are kept once"
            f": {d['classes']} classes)"
        )
    else:
        title = (
            f"## Loss functions for ordinary {d['classes']}-class training "
            f"(first {d['classes']} Omniglot minimal characters)"
        )
        which = (
            f"The first {d['classes']} characters of `images_background_small1` (Balinese "
            f"characters 1-{d['classes']}; `data.first_classes={d['classes']}`) are the classes"
        )
    learned = ""
    if s["learned_set"]:
        learned = f" ML3 / AdaLFL overrides: `{' '.join(s['learned_set'])}`."
        title += ", learned-loss options"
    lines = [
        start,
        title,
        "",
        f"{which}; per character {d['val_per_class']} images are validation, "
        f"{d['test_per_class']} test and the rest training ({d['train_images']} training, "
        f"{d['test_images']} test images; the split depends on the seed). Same model and budget "
        f"for every loss: {s['model']}; {s['budget']}.{learned} Each loss is one `npbml fit` "
        f"run per seed ({s['jobs']} at a time, one thread each). Test error = 1 - test accuracy "
        f"of the final model ({d['test_images']} images per seed); mean +- 95% Student-t "
        f"interval over seeds (t_0.975,{len(s['seeds']) - 1} = "
        f"{T975.get(len(s['seeds']), 1.96)}).",
        "",
        "```bash",
        s["command"],
        "```",
        "",
        *([f"EvoMAL loss: {s['evolved_source']}", ""] if "evolved" in s["results"] else []),
        "| loss | test error (mean +- 95% CI) | per seed ("
        + ", ".join(str(x) for x in s["seeds"])
        + ") | best-val-checkpoint test error | time per run |",
        "|---|---:|---|---:|---:|",
    ]
    for key in ORDER_TABLE:
        r = s["results"].get(key)
        if r is None:
            continue
        per = ", ".join(f"{100 * e:.1f}" for e in r["test_error"])
        lines.append(
            f"| {LOSSES[key][0]} | **{100 * r['mean']:.2f}% +- {100 * r['ci95']:.2f}%** | "
            f"{per} | {100 * r['best_mean']:.2f}% | {r['seconds_mean']:.0f} s |"
        )
    lines += ["", analysis.strip(), "", end]
    return "\n".join(lines) + "\n"


ORDER_TABLE = ["ce", "label_smoothing", "sparse_lsr", "ml3", "adalfl", "evolved"]


def write_section(path: Path, section: str, tag: str = "loss_comparison") -> None:
    """Replace (or append) the section of ``path`` marked by ``tag``; nothing else is touched."""
    start, end = markers(tag)
    text = path.read_text() if path.exists() else "# Results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def diagnose(run: Path) -> dict[str, Any]:
    """Gradient scale of the learned losses of an ``npbml fit`` ML3 / AdaLFL run.

    For each saved loss network (``loss_snapshots/init.pt``, ``step00000000.pt`` = after the
    offline phase, and the last one), on the run's initial model (same seed) and 128 training
    images: the norm ratio and cosine between the learned loss's and cross-entropy's gradients
    w.r.t. the logits, and the slopes ``dg/dp`` of the per-class loss at ``p = 1/C`` for the
    target (y=1) and a non-target (y=0) class (``dg/dp``, also for ``loss.inputs=log_prob``).
    Used for the learned-loss investigation in ``docs/results.md``.
    """
    import torch
    import torch.nn.functional as F

    from npbml.fit import build_fit_data, build_fit_model, fit_config_from_dict
    from npbml.losses import LearnedLoss

    cfg = fit_config_from_dict(json.loads((run / "config.json").read_text()))
    data = build_fit_data(cfg)
    torch.manual_seed(cfg.train.seed)  # the model fit() starts from
    model = build_fit_model(cfg.model, data)
    x, y = data.train
    idx = torch.arange(0, len(x), len(x) // 128)[:128]
    with torch.no_grad():
        z0 = model(x[idx])
    c = data.num_outputs
    snaps = sorted((run / "loss_snapshots").glob("step*.pt"))
    names = ["init", "step00000000"] + ([snaps[-1].stem] if snaps else [])
    out: dict[str, Any] = {"run": str(run)}
    for name in dict.fromkeys(names):
        f = run / "loss_snapshots" / f"{name}.pt"
        if not f.exists():
            continue
        net = LearnedLoss(
            cfg.data.task,
            cfg.loss.hidden,
            cfg.loss.output_activation,
            inputs=cfg.loss.inputs,
        )
        net.load_state_dict(torch.load(f, weights_only=True))
        z = z0.clone().requires_grad_()
        (g_learned,) = torch.autograd.grad(net(z, y[idx]), z)
        z = z0.clone().requires_grad_()
        (g_ce,) = torch.autograd.grad(F.cross_entropy(z, y[idx]), z)
        q = torch.full((2,), 1.0 / c, requires_grad=True)
        first = q.log() if cfg.loss.inputs == "log_prob" else q  # slopes are d g / d p
        (slopes,) = torch.autograd.grad(
            net.g(torch.stack((first, torch.tensor([1.0, 0.0])), -1)).sum(), q
        )
        out[name] = {
            "grad_ratio": (g_learned.norm() / g_ce.norm()).item(),
            "cosine": F.cosine_similarity(g_learned.flatten(), g_ce.flatten(), 0).item(),
            "slope_target": slopes[0].item(),
            "slope_non_target": slopes[1].item(),
        }
    final = final_record(run)
    out["test_acc"] = None if final is None else final.get("test_acc")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--diagnose", nargs="+", default=None, metavar="RUN", help=diagnose.__doc__)
    p.add_argument("--out", default="runs/loss_comparison")
    p.add_argument("--config", default="configs/fit_omniglot.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--losses", nargs="+", default=ORDER_TABLE, choices=ORDER_TABLE)
    p.add_argument("--classes", type=int, default=None, help="keep the first K classes only")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--offline-steps", type=int, default=150, help="ML3 / AdaLFL offline steps")
    p.add_argument("--meta-lr", type=float, default=1e-3, help="ML3 / AdaLFL meta Adam lr")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--evolved", default=None, help="an evolved loss instead of a new search")
    p.add_argument("--evolve-config", default="configs/evomal_glyphs.yaml")
    p.add_argument("--set", action="append", default=[], help="extra override for every run")
    p.add_argument(
        "--learned-set", action="append", default=[], help="extra override for ML3 / AdaLFL runs"
    )
    p.add_argument("--tag", default="loss_comparison", help="name of the results section")
    p.add_argument("--results", default=None, help="Markdown file to write the section into")
    p.add_argument("--analysis", default=None, help="file with the analysis paragraph(s)")
    p.add_argument("--json", default=None, help="also write the summary JSON here")
    args = p.parse_args(argv)
    if args.diagnose:
        for run in args.diagnose:
            print(json.dumps(diagnose(Path(run))), flush=True)
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    evolved = None
    jobs = [(loss, seed) for loss in ORDER if loss in args.losses for seed in args.seeds]
    seconds: dict[tuple[str, int], float] = {}

    def work(job: tuple[str, int]) -> None:
        loss, seed = job
        run = out / loss / f"seed{seed}"
        if final_record(run) is not None:
            return
        run.mkdir(parents=True, exist_ok=True)
        code, secs = run_job(fit_command(args, loss, seed, run, evolved), run / "log.txt")
        seconds[job] = secs
        print(f"{loss} seed {seed}: exit {code}, {secs:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # The EvoMAL search runs alongside the first fit jobs (it takes one worker's place).
        first = [j for j in jobs if j[0] != "evolved"]
        futures = [pool.submit(work, j) for j in first[: max(0, args.jobs - 1)]]
        if "evolved" in args.losses:
            evolved = evolve(args, out)
        futures += [pool.submit(work, j) for j in jobs if j not in first[: args.jobs - 1]]
        for f in futures:
            f.result()

    results: dict[str, Any] = {}
    for loss in ORDER_TABLE:
        if loss not in args.losses:
            continue
        recs = [final_record(out / loss / f"seed{s}") for s in args.seeds]
        if any(r is None for r in recs):
            print(f"{loss}: some runs did not finish; see {out / loss}", file=sys.stderr)
            continue
        err = [1.0 - r["test_acc"] for r in recs]
        best = [1.0 - r.get("best_test_acc", r["test_acc"]) for r in recs]
        mean, ci = mean_ci(err)
        secs = []
        for s in args.seeds:
            m = (out / loss / f"seed{s}" / "metrics.jsonl").read_text().splitlines()
            secs.append(_run_seconds(out / loss / f"seed{s}", m))
        results[loss] = {
            "label": LOSSES[loss][0],
            "test_error": err,
            "mean": mean,
            "ci95": ci,
            "best_test_error": best,
            "best_mean": float(np.mean(best)),
            "seconds": secs,
            "seconds_mean": float(np.mean(secs)),
        }
    evolved_path = Path(args.evolved) if args.evolved else out / "evomal"
    evolved_info = _evolved_info(evolved_path) if "evolved" in args.losses else None
    data_sets = [*args.set] + (
        [f"data.first_classes={args.classes}"] if args.classes is not None else []
    )
    data = describe_data(args.config, data_sets)
    summary = {
        "command": "python scripts/loss_comparison.py " + shlex.join(argv or sys.argv[1:]),
        "config": args.config,
        "seeds": args.seeds,
        "data": data,
        "learned_set": args.learned_set,
        "model": data["model"],
        "budget": f"{args.epochs} epochs x {data['steps_per_epoch']} steps of batch "
        f"{data['batch_size']}; ML3 and AdaLFL additionally {args.offline_steps} offline meta "
        f"steps (meta Adam lr {args.meta_lr})",
        "jobs": args.jobs,
        "evolved": evolved_info,
        "evolved_source": _evolved_source(args, evolved_info),
        "results": results,
        "wall_seconds": time.time() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: (v["mean"], v["ci95"]) for k, v in results.items()}, indent=1))
    if args.results:
        analysis = Path(args.analysis).read_text() if args.analysis else "(analysis pending)"
        write_section(Path(args.results), markdown(summary, analysis, args.tag), args.tag)
        print(f"wrote the loss_comparison section of {args.results}")
    return 0


def _run_seconds(run: Path, lines: list[str]) -> float:
    """Wall time of a run: from config.json's creation to the last metrics record."""
    recs = [json.loads(s) for s in lines]
    times = [r["time"] for r in recs if "time" in r]
    start = (run / "config.json").stat().st_mtime
    end = max(times) if times else (run / "metrics.jsonl").stat().st_mtime
    end = max(end, (run / "metrics.jsonl").stat().st_mtime)
    return float(end - start)


def _evolved_info(path: Path) -> dict[str, Any] | None:
    f = path / "best.json" if path.is_dir() else path
    if not f.exists():
        return None
    d = json.loads(f.read_text())
    return {k: d.get(k) for k in ("expression", "infix", "infix_tuned", "fitness") if k in d}


def _evolved_source(args: argparse.Namespace, info: dict[str, Any] | None) -> str:
    formula = "(missing)"
    if info:
        formula = f"`{info.get('infix')}`"
        if info.get("infix_tuned"):
            formula += f", with its tuned node scalars `{info['infix_tuned']}`"
    if args.evolved:
        return f"the formula in `{args.evolved}`: {formula}."
    return (
        f"the best loss of `npbml evolve --config {args.evolve_config}` (run by this script "
        f"first; `{args.out}/evomal/best.json`): {formula}."
    )


if __name__ == "__main__":
    raise SystemExit(main())
