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

Memory method: the process's own peak resident set size (``VmHWM``, :mod:`_memory`; not
``ru_maxrss``, which after ``exec`` still includes the parent's size). ``idle_rss_mib`` is the peak
right after imports (torch itself), ``peak_rss_mib`` the process peak after its steps, and
``above_idle_mib`` their difference (what the variant's model, data and meta-training steps needed).
tracemalloc cannot see torch's allocations, hence RSS. On CUDA devices the script also reports
``torch.cuda.max_memory_allocated``.

Against learn2learn (``--against learn2learn``): learn2learn 0.2.0's ``MAML`` with
``clone()``/``adapt()`` on its ``OmniglotCNN`` (stride-2 convs, BN, mean-pool), per-task
``backward()`` as in learn2learn's own Omniglot example, vs this engine on *the same module
object class, the same initial weights and the same episodes* (the engine accepts any
``nn.Module``), second and first order; plus NPBML's meta-iteration (last block adapted, 5 inner
steps, FiLM, warp, task-adaptive loss with a relation network) as a ratio to MAML's on the
equivalent Conv4-64 (strided). Variant names carry their intra-op thread count (``@1t``,
``@2t``); ``engine-parallel`` runs the tasks on ``--workers`` threads of one intra-op thread each
(:mod:`npbml.algorithms.task_parallel`); a ``-cl`` variant runs the engine channels-last
(``MAML(..., channels_last=True)``, :mod:`npbml.layout`); ``engine-ddp-cl`` splits the
meta-batch over ``--workers`` processes of one thread each (a gloo group, the gradient
all-reduce of ``torchrun ... npbml train``; rank 0 is the timing process, the other ranks wait
on a pipe between steps); ``l2l-cl`` is learn2learn with its conv weights stored channels-last
(information: what the same trick does for learn2learn). Needs a Python with learn2learn (see
``scripts/install_learn2learn.sh``); from any other interpreter the script re-runs itself with
``--l2l-python`` (default: ``$NPBML_L2L_PYTHON``, ``.venv-l2l/bin/python`` or
``~/.cache/npbml/venv-l2l/bin/python``). Each timed step also records this process's minor page
faults. ``--malloc tuned`` runs every child process, learn2learn's included, with glibc's
``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_`` at 256 MiB, so freed activation memory is
reused instead of returned to the kernel. ``default`` (the default) strips ``MALLOC_*`` from the
children's environment. Two memory-only probes (``floor-forward``, ``floor-forward-backward``)
measure, in fresh processes, the peak of work that any MAML implementation does for one task:
the lower bound of the memory comparison. Writes ``docs/bench_l2l.json`` and, with
``--markdown``, its own section of ``docs/benchmarks.md``.

Usage:
    python scripts/bench_step.py                       # all variants, writes docs/bench_step.json
    python scripts/bench_step.py --steps 10 --json     # JSON to stdout
    python scripts/bench_step.py --markdown docs/benchmarks.md   # also update the Markdown table
    python scripts/bench_step.py --against learn2learn --markdown docs/benchmarks.md
    python scripts/bench_step.py --against learn2learn --malloc tuned --out FILE.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
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

from _markdown import update_section  # noqa: E402  (scripts/_markdown.py)
from _memory import peak_rss_kib  # noqa: E402  (scripts/_memory.py)

from npbml.algorithms import MAML  # noqa: E402
from npbml.distributed import all_reduce_gradients  # noqa: E402
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


def _rss_since(idle_kib: int) -> dict[str, float]:
    """This process's peak RSS now, and above ``idle_kib`` (its peak after imports), in MiB."""
    peak = peak_rss_kib()
    return {
        "idle_rss_mib": idle_kib / 1024,
        "peak_rss_mib": peak / 1024,
        "above_idle_mib": (peak - idle_kib) / 1024,
    }


def round_robin(runners: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then ``args.steps`` steps of every runner interleaved round-robin (rotating the
    order each round), so that load from other jobs on a shared machine hits every variant
    alike; timing statistics per variant."""
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
    times: dict[str, list[float]] = {v: [] for v in runners}
    order = list(runners)
    for i in range(args.steps):
        for v in order[i % len(order) :] + order[: i % len(order)]:
            times[v].append(runners[v].step())
    return {v: _timing_stats(t) for v, t in times.items()}


def run_timing(args: argparse.Namespace) -> dict[str, Any]:
    """All variants in one process (:func:`round_robin`)."""
    torch.set_num_threads(args.threads)
    batch = make_batch(args, torch.device(args.device))
    return round_robin({v: Runner(v, args, batch) for v in args.variants}, args)


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    """One variant alone in this (fresh) process: peak RSS, then the gradient check."""
    idle_rss = peak_rss_kib()  # after imports, before work
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runner = Runner(args.variant, args, make_batch(args, device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [runner.step() for _ in range(args.mem_steps)]
    rss = _rss_since(idle_rss)
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    out: dict[str, Any] = {
        "isolated_step_times_s": times,
        **rss,
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
            "Peak RSS = `VmHWM` (high-water resident memory) of the variant's own process "
            "after its steps; peak above idle = that minus `VmHWM` right after "
            "`import torch` etc., i.e. the memory the model, data and meta-training steps needed. "
            "`engine` keeps all 16 task graphs until `backward()` (the `outer_loss` interface); "
            "`engine-per-task` is `learner.meta_backward(batch)`; `naive-deepcopy` deep-copies "
            "the model per task and writes `theta - alpha * grad` into the copy. All three give "
            "the same meta-gradient (last column, float32).",
            MD_END,
        ]
    )


def update_markdown(path: Path, section: str) -> None:
    update_section(path, section, MD_START, MD_END)


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


# ----------------------------------------------------------------------------- vs learn2learn
L2L_MD_START, L2L_MD_END = "<!-- bench_l2l:start -->", "<!-- bench_l2l:end -->"
L2L_VARIANTS = (
    "l2l@1t",
    "l2l@2t",
    "l2l-cl@1t",
    "engine@1t",
    "engine@2t",
    "engine-cl@1t",
    "engine-parallel",
    "engine-parallel-cl",
    "engine-ddp-cl",
    "l2l-fo@1t",
    "l2l-fo@2t",
    "l2l-cl-fo@1t",
    "engine-fo@1t",
    "engine-fo@2t",
    "engine-cl-fo@1t",
    "engine-parallel-fo",
    "engine-parallel-cl-fo",
    "engine-ddp-cl-fo",
    "maml-conv4",
    "npbml-conv4",
    "npbml-f-conv4",
)


def _l2l_python_candidates() -> list[str]:
    env = os.environ.get("NPBML_L2L_PYTHON")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    paths = [REPO / ".venv-l2l" / "bin" / "python", cache / "npbml" / "venv-l2l" / "bin" / "python"]
    return ([env] if env else []) + [str(p) for p in paths]


_NPBML_KINDS = ("npbml-conv4", "npbml-f-conv4")
_THREADED = ("engine-parallel", "engine-parallel-cl", "maml-conv4", *_NPBML_KINDS)
FLOOR_PROBES = ("floor-forward", "floor-forward-backward")
MALLOC_TUNED = {"MALLOC_TRIM_THRESHOLD_": "268435456", "MALLOC_MMAP_THRESHOLD_": "268435456"}


def _parse_variant(name: str, workers: int) -> dict[str, Any]:
    """``"l2l-fo@2t"`` -> kind l2l, first order, 2 intra-op threads, 1 worker, 1 process;
    ``"engine-ddp-cl"`` -> ``workers`` processes of one thread each; a ``-cl`` kind (and the
    Conv4 pair) runs channels-last (:mod:`npbml.layout`)."""
    base, _, threads = name.partition("@")
    first = base.endswith("-fo")
    kind = base[: -len("-fo")] if first else base
    return {
        "kind": kind,
        "first_order": first,
        "threads": int(threads.rstrip("t")) if threads else 1,
        "workers": workers if kind in _THREADED else 1,
        "procs": workers if kind == "engine-ddp-cl" else 1,
        # NPBML keeps its own layout: channels-last frozen blocks, batched inner loops.
        "channels_last": kind.endswith("-cl") or kind == "maml-conv4",
    }


class L2LRunner:
    """One variant of the learn2learn comparison: model, meta-learner, Adam and one step."""

    def __init__(self, name: str, args: argparse.Namespace, batch: Episode) -> None:
        import learn2learn as l2l
        from learn2learn.vision.models import OmniglotCNN

        self.name, self.batch, self.tasks = name, batch, batch.unstack()
        self.spec = _parse_variant(name, args.workers)
        self.faults: list[int] = []
        kind, fo = self.spec["kind"], self.spec["first_order"]
        torch.manual_seed(0)  # identical initial weights for every variant of one network
        if kind in ("maml-conv4", *_NPBML_KINDS):
            self.model: nn.Module = Conv4(1, args.ways, hidden=64, image_size=28, variant="strided")
        else:
            self.model = OmniglotCNN(output_size=args.ways)
        if kind == "l2l-cl":
            # The same trick for learn2learn (information only): weights stored NHWC, which
            # clone() preserves, so its convolutions run channels-last too.
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.dim() == 4:
                        p.data = p.data.clone(memory_format=torch.channels_last)
        if kind.startswith("l2l"):
            self.learner: nn.Module = l2l.algorithms.MAML(self.model, lr=0.4, first_order=fo)
        elif kind in _NPBML_KINDS:
            from npbml.algorithms import NPBML
            from npbml.algorithms.npbml.layers.relation import RelationNetwork

            relation = (
                RelationNetwork(in_channels=1)
                if kind == "npbml-conv4"
                else RelationNetwork(reads="features", feature_blocks=3)
            )
            # Defaults: its batched inner loop (each task worker runs a chunk); no episode
            # cache, as the timed steps repeat one batch.
            self.learner = NPBML(self.model, relation_net=relation, episode_cache=0)
        else:
            self.learner = MAML(
                self.model,
                inner_lr=0.4,
                inner_steps=1,
                first_order=fo,
                channels_last=self.spec["channels_last"],
            )
        if self.spec["procs"] > 1:
            # Rank 0 of a group whose other ranks are helper processes (DDPGroup); this rank
            # keeps its contiguous share of the meta-batch, as npbml.distributed does.
            self.group = DDPGroup.get(args, self.spec["procs"])
            share = len(self.tasks) // self.spec["procs"]
            self.batch = Episode.stack(self.tasks[:share])
        params = (
            self.learner.parameters() if kind.startswith("l2l") else self.learner.meta_parameters()
        )
        self.params = list(params)
        self.opt = torch.optim.Adam(self.params, lr=1e-3)

    def meta_gradient(self, command: str = "grad") -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.spec["kind"].startswith("l2l"):
            # learn2learn's examples/vision/maml_omniglot.py: clone, adapt, backward per task.
            for t in self.tasks:
                learner = self.learner.clone()
                learner.adapt(F.cross_entropy(learner(t.support_x), t.support_y))
                (F.cross_entropy(learner(t.query_x), t.query_y) / len(self.tasks)).backward()
        elif self.spec["procs"] > 1:
            self.group.command(command, self.name)
            self.learner.meta_backward(self.batch)
            all_reduce_gradients(self.params, self.group.ctx)
        else:
            self.learner.meta_backward(self.batch, workers=self.spec["workers"])

    def step(self) -> float:
        torch.set_num_threads(self.spec["threads"])
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        self.meta_gradient("step")  # DDP: the other ranks' Adam steps follow their all-reduce
        self.opt.step()
        elapsed = time.perf_counter() - t0
        # This process's minor page faults (all its threads; not the DDP helper's).
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        return elapsed

    def grads(self) -> list[torch.Tensor]:
        self.meta_gradient()
        return [p.grad.clone() for p in self.model.parameters()]

    def close(self) -> dict[str, Any]:
        """Stop the helper ranks (DDP variant); their peak RSS above idle, per rank."""
        return self.group.close() if self.spec["procs"] > 1 else {}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DDPGroup:
    """Helper ranks 1..P-1 of a gloo group whose rank 0 is this process (``engine-ddp-cl*``).

    One group per process (torch allows one default group), shared by the DDP variants of a
    timing run. Each helper builds, per variant, the same runner (same seed, same episodes) on its
    contiguous share of the meta-batch and waits on a pipe (blocked, no CPU) between commands, so
    the interleaved timing of the other variants runs on an otherwise idle machine.
    ``("step", variant)``: meta-gradient of its share, all-reduce
    (:func:`npbml.distributed.all_reduce_gradients`, the torchrun path of ``npbml train``),
    Adam; ``("grad", variant)``: the same without the Adam step.
    """

    _shared: DDPGroup | None = None

    @classmethod
    def get(cls, args: argparse.Namespace, procs: int) -> DDPGroup:
        if cls._shared is None:
            cls._shared = cls(args, procs)
        cls._shared.users += 1
        return cls._shared

    def __init__(self, args: argparse.Namespace, procs: int) -> None:
        import torch.multiprocessing as mp

        port = _free_port()
        ctx = mp.get_context("spawn")
        self.users = 0
        self.pipes: list[Any] = []
        self.procs: list[Any] = []
        for rank in range(1, procs):
            here, there = ctx.Pipe()
            proc = ctx.Process(
                target=_ddp_helper, args=(rank, procs, port, vars(args), there), daemon=True
            )
            proc.start()
            self.pipes.append(here)
            self.procs.append(proc)
        self.ctx = _join_group(0, procs, port)

    def command(self, what: str, variant: str) -> None:
        for pipe in self.pipes:
            pipe.send((what, variant))

    def close(self) -> dict[str, Any]:
        """Release one user; the last one stops the helpers (their peak RSS above idle)."""
        import torch.distributed as dist

        self.users -= 1
        if self.users > 0:
            return {}
        self.command("stop", "")
        peaks = [pipe.recv() for pipe in self.pipes]
        for proc in self.procs:
            proc.join(timeout=30)
        dist.destroy_process_group()
        DDPGroup._shared = None
        return {"helper_above_idle_mib": peaks}


def _join_group(rank: int, procs: int, port: int) -> Any:
    """Join the benchmark's gloo group (a helper that fails to start makes rank 0 raise after
    the timeout instead of hanging)."""
    import torch.distributed as dist

    from npbml.distributed import DistContext, import_world_default_modules

    import_world_default_modules()  # else the group outlives destroy (npbml.distributed)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=procs,
        timeout=datetime.timedelta(seconds=120),
    )
    return DistContext(rank, procs, 0, torch.device("cpu"), "gloo", owns_group=True)


def _ddp_helper(rank: int, procs: int, port: int, argd: dict[str, Any], pipe: Any) -> None:
    import learn2learn  # noqa: F401  (as in run_l2l_memory: its import belongs to "idle")
    import torch.distributed as dist

    idle = peak_rss_kib()
    torch.set_num_threads(1)
    args = argparse.Namespace(**argd)
    ctx = _join_group(rank, procs, port)
    tasks = make_batch(args, torch.device("cpu")).unstack()
    share = len(tasks) // procs
    batch = Episode.stack(tasks[rank * share : (rank + 1) * share])
    runners: dict[str, L2LRunner] = {}
    while True:
        what, variant = pipe.recv()
        if what == "stop":
            pipe.send((peak_rss_kib() - idle) / 1024)
            dist.destroy_process_group()
            return
        if variant not in runners:
            # This rank's share runs as the one-process channels-last variant (same seed, model,
            # learner and Adam as rank 0's), e.g. engine-ddp-cl-fo -> engine-cl-fo@1t.
            twin = variant.replace("engine-ddp-cl", "engine-cl") + "@1t"
            runners[variant] = L2LRunner(twin, args, batch)
        runner = runners[variant]
        runner.meta_gradient()
        all_reduce_gradients(runner.params, ctx)
        if what == "step":
            runner.opt.step()


def run_l2l_timing(args: argparse.Namespace) -> dict[str, Any]:
    batch = make_batch(args, torch.device("cpu"))
    runners = {v: L2LRunner(v, args, batch) for v in args.variants}
    result = round_robin(runners, args)
    for v, r in runners.items():
        r.close()
        timed = r.faults[args.warmup :]
        result[v]["minor_faults_per_step_median"] = statistics.median(timed) if timed else None
    return result


def run_l2l_memory(args: argparse.Namespace) -> dict[str, Any]:
    import learn2learn  # noqa: F401  (its import cost belongs to "idle", not to a variant)

    idle_rss = peak_rss_kib()
    batch = make_batch(args, torch.device("cpu"))
    if args.variant in FLOOR_PROBES:
        return _floor_probe(args.variant, args, batch, idle_rss)
    runner = L2LRunner(args.variant, args, batch)
    times = [runner.step() for _ in range(args.mem_steps)]
    out: dict[str, Any] = {"isolated_step_times_s": times, **_rss_since(idle_rss)}
    spec = runner.spec
    if spec["kind"].startswith("engine"):
        # Same weights (this runner's, after its steps), same episodes: the meta-gradient must
        # equal learn2learn's (exactly for NCHW on one process; up to float rounding for a
        # channels-last or multi-process sum).
        ref = L2LRunner("l2l-fo@1t" if spec["first_order"] else "l2l@1t", args, batch)
        ref.model.load_state_dict(runner.model.state_dict())
        ref_grads = ref.grads()
        diffs = [float((a - b).abs().max()) for a, b in zip(runner.grads(), ref_grads)]
        out["max_abs_grad_diff_vs_l2l"] = max(diffs)
        out["max_abs_grad_l2l"] = max(float(g.abs().max()) for g in ref_grads)
    helpers = runner.close()
    if helpers:
        # Every rank is a process of its own: the variant's memory is their sum.
        out.update(helpers)
        out["rank0_above_idle_mib"] = out["above_idle_mib"]
        out["above_idle_mib"] += sum(helpers["helper_above_idle_mib"])
    return out


def _floor_probe(
    probe: str, args: argparse.Namespace, batch: Episode, idle_rss: int
) -> dict[str, Any]:
    """Peak RSS above idle of work that *any* MAML implementation does for one task on the same
    ``OmniglotCNN`` at one thread: its query forward without a graph (``floor-forward``), or one
    plain cross-entropy forward+backward of the query set (``floor-forward-backward``, no inner
    loop). A meta-step cannot need less than the latter, which bounds the memory ratio any
    implementation can reach against learn2learn on this runtime."""
    from learn2learn.vision.models import OmniglotCNN

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = OmniglotCNN(output_size=args.ways)
    task = batch.unstack()[0]
    for _ in range(args.mem_steps):
        if probe == "floor-forward":
            with torch.no_grad():
                model(task.query_x)
        else:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(task.query_x), task.query_y).backward()
    return _rss_since(idle_rss)


def _malloc_env(mode: str) -> dict[str, str]:
    """The child processes' environment: ``default`` removes glibc's ``MALLOC_*`` tunables
    (whatever this shell set), ``tuned`` sets :data:`MALLOC_TUNED` (no trimming, no mmap for
    blocks up to 256 MiB: freed activation memory is reused instead of returned to the kernel
    and faulted in again)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    return env | (MALLOC_TUNED if mode == "tuned" else {})


def _l2l_child(args: argparse.Namespace, python: str, mode: list[str]) -> dict[str, Any]:
    cmd = [python, str(Path(__file__).resolve()), "--against", "learn2learn", *mode]
    for flag in ("steps", "warmup", "mem_steps", "meta_batch", "ways", "shots", "queries",
                 "workers"):  # fmt: skip
        cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    cmd += ["--variants", *args.variants]
    env = _malloc_env(args.malloc)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"benchmark child {mode} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def find_l2l_python(explicit: str | None) -> str:
    """An interpreter that imports learn2learn and torch (clear error naming the fix if none)."""
    candidates = [explicit] if explicit else _l2l_python_candidates()
    for c in candidates:
        if c and Path(c).exists():
            ok = subprocess.run(
                [c, "-c", "import learn2learn, torch"], capture_output=True, check=False
            )
            if ok.returncode == 0:
                return c
    raise SystemExit(
        "--against learn2learn needs a Python with learn2learn 0.2.0; tried "
        + ", ".join(str(c) for c in candidates)
        + ". Build one with `bash scripts/install_learn2learn.sh` (or pass --l2l-python)."
    )


def l2l_markdown(result: dict[str, Any]) -> str:
    s, m = result["setting"], result["machine"]
    by = {r["variant"]: r for r in result["variants"]}
    rows = [
        "| variant | order | layout | intra-op threads x task workers x processes "
        "| median step (s) | min step (s) | minor page faults per step "
        "| peak RSS above idle (MiB) | max abs grad diff vs learn2learn (of max abs grad) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["variants"]:
        sp = _parse_variant(r["variant"], s["workers"])
        diff = r.get("max_abs_grad_diff_vs_l2l")
        diff_text = "-" if diff is None else f"{diff:.1e} (of {r['max_abs_grad_l2l']:.2f})"
        rows.append(
            f"| {r['variant']} | {'first' if sp['first_order'] else 'second'} | "
            f"{'NHWC' if sp['channels_last'] else 'NCHW'} | "
            f"{sp['threads']} x {sp['workers']} x {sp['procs']} | {r['step_s_median']:.3f} | "
            f"{r['step_s_min']:.3f} | {_faults_text(r)} | {r['above_idle_mib']:.0f} | "
            f"{diff_text} |"
        )
    lines = []

    def best(prefix: str, key: str = "step_s_median") -> dict[str, Any] | None:
        """The ``prefix@Nt`` variant with the lowest ``key`` (fastest, or leanest)."""
        cands = [r for v, r in by.items() if v.startswith(prefix + "@")]
        return min(cands, key=lambda r: r[key]) if cands else None

    for order, suffix in (("second", ""), ("first", "-fo")):
        ref = best("l2l" + suffix)
        if ref is None:
            continue
        candidates = [
            (kind + suffix, by.get(kind + suffix))
            for kind in ("engine-ddp-cl", "engine-parallel-cl", "engine-parallel")
        ] + [
            (f"best engine-cl{suffix}@Nt", best("engine-cl" + suffix)),
            (f"best engine{suffix}@Nt", best("engine" + suffix)),
            (f"best l2l-cl{suffix}@Nt (information)", best("l2l-cl" + suffix)),
        ]
        for label, r in candidates:
            if r is None:
                continue
            lines.append(
                f"- {order} order, {label} vs the faster learn2learn setting "
                f"({ref['variant']}): speed-up {ref['step_s_median'] / r['step_s_median']:.2f}x "
                f"(median), {ref['step_s_min'] / r['step_s_min']:.2f}x (min); peak memory above "
                f"idle {r['above_idle_mib']:.0f} vs {ref['above_idle_mib']:.0f} MiB "
                f"({r['above_idle_mib'] / ref['above_idle_mib']:.2f}x)."
            )
        l2l_mem = best("l2l" + suffix, "above_idle_mib")
        assert l2l_mem is not None  # ref exists
        lean = [
            r
            for v, r in by.items()
            if v.startswith(("engine" + suffix + "@", "engine-cl" + suffix + "@"))
        ]
        if lean:
            low = min(lean, key=lambda r: r["above_idle_mib"])
            lines.append(
                f"- {order} order, lowest engine peak ({low['variant']}) vs lowest learn2learn "
                f"peak ({l2l_mem['variant']}): {low['above_idle_mib']:.0f} vs "
                f"{l2l_mem['above_idle_mib']:.0f} MiB "
                f"({low['above_idle_mib'] / l2l_mem['above_idle_mib']:.2f}x)."
            )
    floor = result.get("floor")
    low = best("l2l", "above_idle_mib")
    if floor and low:
        fwd, fb = floor["floor-forward"], floor["floor-forward-backward"]
        lines.append(
            f"- memory floor (`OmniglotCNN`, one task, fresh process, same idle): the query "
            f"forward without a graph {fwd['above_idle_mib']:.0f} MiB, one plain cross-entropy "
            f"forward+backward of the query set {fb['above_idle_mib']:.0f} MiB = "
            f"{fb['above_idle_mib'] / low['above_idle_mib']:.2f}x learn2learn's lowest "
            f"second-order peak ({low['variant']}, {low['above_idle_mib']:.0f} MiB); a MAML "
            "meta-step does that and more, whatever the library."
        )
    for kind in _NPBML_KINDS:
        if "maml-conv4" not in by or kind not in by:
            continue
        a, b = by["maml-conv4"], by[kind]
        lines.append(
            f"- {kind} meta-iteration / MAML meta-iteration on Conv4-64 (strided), both with 2 "
            f"task workers: {b['step_s_median'] / a['step_s_median']:.2f}x time "
            f"({b['step_s_median']:.3f} vs {a['step_s_median']:.3f} s), "
            f"{b['above_idle_mib']:.0f} vs {a['above_idle_mib']:.0f} MiB above idle."
        )
    load = ", ".join(f"{x:.1f}" for x in m["load_average_at_start"])
    return "\n".join(
        [
            L2L_MD_START,
            "## Meta-iteration vs learn2learn 0.2.0 (MAML, Omniglot 5-way 1-shot)",
            "",
            f"Setting: learn2learn's `OmniglotCNN` (4 x [conv3x3 stride 2, BN, ReLU], 64 filters, "
            f"mean-pool, linear head), 28x28x1, {s['ways']}-way {s['shots']}-shot, "
            f"{s['queries']} queries/class, meta-batch {s['meta_batch']}, 1 inner step "
            "(lr 0.4), Adam outer step, synthetic episodes. learn2learn: `MAML(model, lr=0.4, "
            "first_order=...)`, per task `clone()`, `adapt(loss)`, query loss `backward()` "
            "(its `maml_omniglot.py` loop). Engine: `MAML(model, channels_last=...)"
            ".meta_backward(batch, workers=...)` on a model built with the same seed (same "
            "weights); `engine-ddp-cl`: 2 processes with half the meta-batch each and a gloo "
            "all-reduce (the `torchrun` path); `l2l-cl`: learn2learn with NHWC conv weights "
            "(information). Timing: "
            f"{s['steps']} steps per variant after {s['warmup']} warm-up, all variants in one "
            "process, interleaved round-robin; memory: each variant alone in a fresh process "
            f"({s['mem_steps']} steps; `VmHWM`, the process's own peak RSS, above its peak "
            "after imports).",
            "",
            f"Command: `{result['command']}`",
            "",
            f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, learn2learn "
            f"{result.get('learn2learn', '?')}; load average at start {load}. "
            f"Allocator: {_malloc_text(s)}.",
            "",
            *rows,
            "",
            *lines,
            "",
            "NPBML rows: `npbml-conv4` is NPBML (FiLM, warp after the last block, CE + L_S + "
            "L_Q + R with an untrained relation network of the same cost, inner SGD Nesterov, 5 "
            "steps, blocks 0-2 frozen, its batched inner loop) and `npbml-f-conv4` the same with "
            "the relation network on the frozen features (`RelationNetwork(reads=\"features\")`"
            "); `maml-conv4` is MAML (all layers, 1 step, channels-last) on our Conv4-64 "
            "strided, the counterpart of `OmniglotCNN`.",
            L2L_MD_END,
        ]
    )


def _faults_text(r: dict[str, Any]) -> str:
    faults = r.get("minor_faults_per_step_median")
    return "-" if faults is None else f"{faults:.0f}"


def _malloc_text(setting: dict[str, Any]) -> str:
    env = setting.get("malloc_env") or {}
    if not env:
        return "glibc defaults in every process (`MALLOC_*` unset)"
    return (
        "tuned in every process, learn2learn's included ("
        + ", ".join(f"`{k}={v}`" for k, v in env.items())
        + ")"
    )


def main_against_l2l(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.timing_child:
        print(json.dumps(run_l2l_timing(args)))
        return 0
    if args.variant is not None:
        print(json.dumps(run_l2l_memory(args)))
        return 0
    python = find_l2l_python(args.l2l_python)
    command = "python scripts/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    version = (
        subprocess.run(
            [python, "-c", "import learn2learn; print(learn2learn.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        .stdout.strip()
        .splitlines()
    )
    args.threads = 0  # per variant
    result: dict[str, Any] = {
        "command": command.strip(),
        "learn2learn": version[-1] if version else "?",
        "setting": {
            k: getattr(args, k)
            for k in ("ways", "shots", "queries", "meta_batch", "steps", "warmup", "mem_steps")
        }
        | {
            "workers": args.workers,
            "model": "learn2learn OmniglotCNN",
            "inner_steps": 1,
            "malloc": args.malloc,
            "malloc_env": MALLOC_TUNED if args.malloc == "tuned" else {},
        },
        "machine": machine_info(args),
        "variants": [],
    }
    timing = _l2l_child(args, python, ["--timing-child"])
    for variant in args.variants:
        mem = _l2l_child(args, python, ["--variant", variant])
        r = {"variant": variant, **timing[variant], **mem}
        result["variants"].append(r)
        print(
            f"{variant:20s} median {r['step_s_median']:.3f}s  above idle "
            f"{r['above_idle_mib']:.0f} MiB  grad diff {r.get('max_abs_grad_diff_vs_l2l', '-')}",
            file=sys.stderr,
        )
    result["floor"] = {
        probe: _l2l_child(args, python, ["--variant", probe]) for probe in FLOOR_PROBES
    }
    print(json.dumps(result))
    out = Path(args.out if args.out_given else REPO / "docs" / "bench_l2l.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        update_section(Path(args.markdown), l2l_markdown(result), L2L_MD_START, L2L_MD_END)
    return 0


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
    p.add_argument("--variants", nargs="+", default=None, help=f"default {VARIANTS}")
    p.add_argument("--against", choices=["learn2learn"], default=None)
    p.add_argument("--l2l-python", default=None, help="interpreter with learn2learn")
    p.add_argument("--workers", type=int, default=2, help="task threads of engine-parallel")
    p.add_argument(
        "--malloc",
        choices=["default", "tuned"],
        default="default",
        help="glibc allocator settings of the --against learn2learn child processes "
        "(tuned: MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ 256 MiB, for every variant)",
    )
    p.add_argument("--json", action="store_true", help="print the JSON result to stdout")
    p.add_argument("--out", default=None, help="result JSON (default docs/bench_step.json)")
    p.add_argument("--markdown", default=None, help="update this Markdown file's section")
    p.add_argument(
        "--from-json", default=None, help="only re-render --markdown from a saved result JSON"
    )
    # Child-process modes (internal).
    p.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.steps, args.meta_batch, args.mem_steps, args.workers) < 1 or args.warmup < 0:
        p.error("--steps, --mem-steps, --meta-batch, --workers must be >= 1, --warmup >= 0")
    args.out_given = args.out is not None
    allowed = L2L_VARIANTS if args.against else VARIANTS
    if args.variants is None:
        args.variants = list(allowed)
    bad = [v for v in args.variants if v not in allowed]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(allowed)}")
    if args.from_json:
        if not args.markdown:
            p.error("--from-json needs --markdown")
        result = json.loads(Path(args.from_json).read_text())
        if args.against:
            update_section(Path(args.markdown), l2l_markdown(result), L2L_MD_START, L2L_MD_END)
        else:
            update_markdown(Path(args.markdown), to_markdown(result))
        return 0
    if args.against:
        return main_against_l2l(args, argv)
    if not args.out_given:
        args.out = str(REPO / "docs" / "bench_step.json")

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
