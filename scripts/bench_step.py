"""Meta-training step time and peak memory: this engine vs a naive per-task deepcopy loop.

Setting (MAML, Finn et al. 2017, Omniglot 5-way 1-shot): Conv4 with 64 filters on 28x28x1 inputs,
meta-batch 16, 15 queries per class, one second-order inner step (alpha = 0.4), Adam outer step.
Inputs are synthetic (fixed seed): the step cost does not depend on pixel values.

Variants:

- ``engine``: ``loss, _ = MAML(...).outer_loss(batch); loss.backward()`` (all task graphs alive
  until backward, as the public interface returns one loss).
- ``engine-per-task``: ``learner.meta_backward(batch)`` (back-propagates each task at once).
- ``naive-deepcopy``: the textbook loop: per task ``copy.deepcopy(model)``, then its parameters
  are replaced by the differentiable tensors ``theta - alpha * grad`` (create_graph=True) so the
  same second-order meta-gradient reaches ``model``.

Timing: all variants in one child process, their steps interleaved round-robin (the order
rotated every round) after ``--warmup`` steps each, so that load from other jobs on a shared
machine hits every variant alike. Memory: each variant alone in a fresh child process
(``--mem-steps`` steps), which then checks that its meta-gradient equals the engine's at the same
parameters (``max_abs_grad_diff``).

Memory method: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set size of the
process, KiB on Linux). ``idle_rss_mib`` is the peak right after imports (torch itself),
``peak_rss_mib`` the process peak after its steps, and ``above_idle_mib`` their difference (what
the variant's model, data and meta-training steps needed).
tracemalloc cannot see torch's allocations, hence RSS. On CUDA devices the script also reports
``torch.cuda.max_memory_allocated``.

Usage:
    python scripts/bench_step.py                       # all variants, writes docs/bench_step.json
    python scripts/bench_step.py --steps 10 --json     # JSON to stdout
    python scripts/bench_step.py --markdown docs/benchmarks.md   # also update the Markdown table
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from npbml.algorithms import MAML  # noqa: E402
from npbml.models import Conv4  # noqa: E402
from tasks.episode import Episode  # noqa: E402

VARIANTS = ("engine", "engine-per-task", "naive-deepcopy")
MD_START, MD_END = "<!-- bench_step:start -->", "<!-- bench_step:end -->"


def make_batch(args: argparse.Namespace, device: torch.device) -> Episode:
    g = torch.Generator().manual_seed(0)
    eps = []
    for _ in range(args.meta_batch):
        sy = torch.arange(args.ways).repeat_interleave(args.shots)
        qy = torch.arange(args.ways).repeat_interleave(args.queries)
        eps.append(
            Episode(
                torch.rand(len(sy), 1, 28, 28, generator=g),
                sy,
                torch.rand(len(qy), 1, 28, 28, generator=g),
                qy,
                torch.arange(args.ways),
            )
        )
    return Episode.stack(eps).to(device)


def naive_meta_backward(model: nn.Module, batch: Episode, lr: float) -> None:
    """Per task: deepcopy the model, write theta - lr * grad into the copy, query loss, backward."""
    tasks = batch.unstack()
    total = 0.0
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    for task in tasks:
        loss = F.cross_entropy(model(task.support_x), task.support_y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        clone = copy.deepcopy(model)
        for name, p, g in zip(names, params, grads):
            *path, leaf = name.split(".")
            owner = clone
            for part in path:
                owner = getattr(owner, part)
            owner._parameters[leaf] = p - lr * g  # non-leaf tensor: the graph reaches `model`
        total = total + F.cross_entropy(clone(task.query_x), task.query_y)
    (total / len(tasks)).backward()


class Runner:
    """One variant's model (same seed for all), learner, Adam optimizer and meta-training step."""

    def __init__(self, variant: str, args: argparse.Namespace, batch: Episode) -> None:
        self.variant, self.batch = variant, batch
        self.device = batch.query_x.device
        torch.manual_seed(0)
        self.model = Conv4(in_channels=1, num_classes=args.ways, hidden=64, image_size=28)
        self.model.to(self.device)
        self.learner = MAML(self.model, inner_lr=0.4, inner_steps=1, first_order=False)
        self.opt = torch.optim.Adam(self.learner.meta_parameters(), lr=1e-3)

    def meta_gradient(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.variant == "engine":
            loss, _ = self.learner.outer_loss(self.batch)
            loss.backward()
        elif self.variant == "engine-per-task":
            self.learner.meta_backward(self.batch)
        else:
            naive_meta_backward(self.model, self.batch, 0.4)

    def step(self) -> float:
        """One timed meta-training step (meta-gradient and Adam update), in seconds."""
        t0 = time.perf_counter()
        self.meta_gradient()
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def grad_diff_vs_engine(self) -> float:
        """Max abs difference between this variant's meta-gradient and the engine's."""
        self.opt.zero_grad(set_to_none=True)
        loss, _ = self.learner.outer_loss(self.batch)
        loss.backward()
        ref = [p.grad.clone() for p in self.model.parameters()]
        self.meta_gradient()
        return max(float((p.grad - r).abs().max()) for p, r in zip(self.model.parameters(), ref))


def _timing_stats(times: list[float]) -> dict[str, Any]:
    return {
        "step_s_median": statistics.median(times),
        "step_s_mean": statistics.fmean(times),
        "step_s_min": min(times),
        "step_times_s": times,
    }


def run_timing(args: argparse.Namespace) -> dict[str, Any]:
    """All variants in one process, steps interleaved round-robin (rotating the order each
    round), so that load from other jobs on a shared machine hits every variant alike."""
    torch.set_num_threads(args.threads)
    batch = make_batch(args, torch.device(args.device))
    runners = {v: Runner(v, args, batch) for v in args.variants}
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
    times: dict[str, list[float]] = {v: [] for v in runners}
    order = list(runners)
    for i in range(args.steps):
        for v in order[i % len(order) :] + order[: i % len(order)]:
            times[v].append(runners[v].step())
    return {v: _timing_stats(t) for v, t in times.items()}


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    """One variant alone in this (fresh) process: peak RSS, then the gradient check."""
    idle_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after imports, before work
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runner = Runner(args.variant, args, make_batch(args, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [runner.step() for _ in range(args.mem_steps)]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    out: dict[str, Any] = {
        "isolated_step_times_s": times,
        "idle_rss_mib": idle_rss / 1024,
        "peak_rss_mib": peak_rss / 1024,
        "above_idle_mib": (peak_rss - idle_rss) / 1024,
        # After the peak was read, so the check's own memory does not count.
        "max_abs_grad_diff": runner.grad_diff_vs_engine(),
    }
    if cuda_peak is not None:
        out["cuda_max_allocated_mib"] = cuda_peak
    return out


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "load_average_at_start": os.getloadavg(),
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def to_markdown(result: dict[str, Any]) -> str:
    s, m = result["setting"], result["machine"]
    rows = [
        "| variant | median step (s) | mean step (s) | min step (s) | peak RSS (MiB) "
        "| peak above idle process (MiB) | max abs grad diff vs engine |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["variants"]:
        rows.append(
            f"| {r['variant']} | {r['step_s_median']:.3f} | {r['step_s_mean']:.3f} | "
            f"{r['step_s_min']:.3f} | {r['peak_rss_mib']:.0f} | {r['above_idle_mib']:.0f} | "
            f"{r['max_abs_grad_diff']:.1e} |"
        )
    load = ", ".join(f"{x:.1f}" for x in m["load_average_at_start"])
    by = {r["variant"]: r for r in result["variants"]}
    summary = []
    if "engine" in by and "naive-deepcopy" in by:
        e, n = by["engine"], by["naive-deepcopy"]
        summary.append(
            f"Engine vs naive deepcopy: median step time ratio "
            f"{e['step_s_median'] / n['step_s_median']:.2f} (min-time ratio "
            f"{e['step_s_min'] / n['step_s_min']:.2f}), peak memory above idle "
            f"{e['above_idle_mib']:.0f} vs {n['above_idle_mib']:.0f} MiB. Both do the same "
            "arithmetic (one support forward/backward with create_graph and one query forward "
            "per task, then one backward), so equal cost is expected; the engine's gain is "
            "that it needs no module copies and no parameter patching."
        )
    if "engine" in by and "engine-per-task" in by:
        e, t = by["engine"], by["engine-per-task"]
        summary.append(
            f"`meta_backward` (per-task backward) needs {t['above_idle_mib']:.0f} MiB above "
            f"idle vs {e['above_idle_mib']:.0f} MiB for `outer_loss(...).backward()` "
            f"({t['above_idle_mib'] / e['above_idle_mib']:.0%}): one task graph alive instead "
            f"of {result['setting']['meta_batch']}."
        )
    if len(by) > 1:
        spread = max(r["step_s_median"] / r["step_s_min"] for r in by.values())
        summary.append(
            f"Timing noise: a variant's median step is up to {spread:.1f}x its fastest step in "
            "this run, so time differences smaller than that are not significant."
        )
    return "\n".join(
        [
            MD_START,
            "## Meta-training step (MAML, second order)",
            "",
            f"Setting: Conv4 (64 filters), 28x28x1, {s['ways']}-way {s['shots']}-shot, "
            f"{s['queries']} queries/class, meta-batch {s['meta_batch']}, 1 inner step "
            "(alpha 0.4), second order, Adam outer step; synthetic inputs. "
            f"Times: {s['steps']} steps per variant after {s['warmup']} warm-up step(s), all "
            "variants in one process with their steps interleaved round-robin (same load for "
            f"all). Memory: each variant alone in a fresh process ({s['mem_steps']} steps).",
            "",
            f"Command: `{result['command']}`",
            "",
            f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} "
            f"({m['torch_threads']} intra-op thread(s)), device {m['device']}; load average at "
            f"start {load} (the machine was shared with other jobs: absolute times are noisy, "
            "compare variants within this run only).",
            "",
            *rows,
            "",
            *(line for item in summary for line in (item, "")),
            "Peak RSS = `ru_maxrss` (high-water resident memory) of the variant's own process "
            "after its steps; peak above idle = that minus `ru_maxrss` right after "
            "`import torch` etc., i.e. the memory the model, data and meta-training steps needed. "
            "`engine` keeps all 16 task graphs until `backward()` (the `outer_loss` interface); "
            "`engine-per-task` is `learner.meta_backward(batch)`; `naive-deepcopy` deep-copies "
            "the model per task and writes `theta - alpha * grad` into the copy. All three give "
            "the same meta-gradient (last column, float32).",
            MD_END,
        ]
    )


def update_markdown(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MD_START in text and MD_END in text:
        before, rest = text.split(MD_START, 1)
        after = rest.split(MD_END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def _child(args: argparse.Namespace, mode: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *mode]
    for flag in ("steps", "warmup", "mem_steps", "meta_batch", "ways", "shots", "queries",
                 "threads", "device"):  # fmt: skip
        cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    cmd += ["--variants", *args.variants]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark child {mode} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--steps", type=int, default=5, help="timed meta-training steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-steps", type=int, default=2, help="steps of each memory process")
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--json", action="store_true", help="print the JSON result to stdout")
    p.add_argument("--out", default=str(REPO / "docs" / "bench_step.json"))
    p.add_argument("--markdown", default=None, help="update this Markdown file's section")
    p.add_argument(
        "--from-json", default=None, help="only re-render --markdown from a saved result JSON"
    )
    # Child-process modes (internal).
    p.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.steps, args.meta_batch, args.mem_steps) < 1 or args.warmup < 0:
        p.error("--steps, --mem-steps and --meta-batch must be >= 1, --warmup >= 0")

    if args.from_json:
        if not args.markdown:
            p.error("--from-json needs --markdown")
        result = json.loads(Path(args.from_json).read_text())
        update_markdown(Path(args.markdown), to_markdown(result))
        return 0
    if args.timing_child:
        print(json.dumps(run_timing(args)))
        return 0
    if args.variant is not None:
        print(json.dumps(run_memory(args)))
        return 0

    command = "python scripts/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "command": command.strip(),
        "setting": {
            k: getattr(args, k)
            for k in ("ways", "shots", "queries", "meta_batch", "steps", "warmup", "mem_steps")
        }
        | {"model": "conv4-64", "image": "28x28x1", "inner_steps": 1, "second_order": True},
        "machine": machine_info(args),
        "variants": [],
    }
    timing = _child(args, ["--timing-child"])
    for variant in args.variants:
        r = {"variant": variant, **timing[variant], **_child(args, ["--variant", variant])}
        result["variants"].append(r)
        print(
            f"{variant:16s} median {r['step_s_median']:.3f}s  peak RSS {r['peak_rss_mib']:.0f} MiB"
            f"  grad diff {r['max_abs_grad_diff']:.1e}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        update_markdown(Path(args.markdown), to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
