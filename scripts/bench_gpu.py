"""NPBML vs MAML at mini-ImageNet size, on a GPU and on the same machine's CPU (issue 13).

The device part of issue 13: the meta-step and test-time adaptation of ``scripts/bench_npbml.py``
at mini-ImageNet size, with the step time and ``torch.cuda.max_memory_allocated``, and which of
NPBML's paths is slower on the GPU than on the CPU (relative to MAML on the same device).

Shapes: synthetic 84x84x3 images (the cost does not depend on the pixels), 5-way 1-shot,
15 queries per class, meta-batch 4 (Finn et al.'s mini-ImageNet setting). Backbones: ``conv4``
(Conv4-48 max-pool, 5x5 final maps) and ``resnet12`` (64-160-320-640, average pooling).

Variants:

- ``maml``: second order, inner lr 0.01, 5 steps (10 at test), every layer adapted.
- ``npbml``: NPBML's defaults (blocks 0-2 frozen, the last block + FiLM + head adapted, warp,
  CE + L_S + L_Q + R, 5 Nesterov steps), the image relation network (Sung et al.'s encoder, width
  64), the meta-batch's inner loops batched (:mod:`npbml.algorithms.npbml.batched`).
- ``npbml-pertask``: the same, one task at a time (``batch_tasks=False``): is the batched path
  (grouped convolutions under ``vmap``) the slower one on this device?
- ``npbml-frel``: the relation module on the backbone's frozen features
  (``RelationNetwork(reads="features")``).

Each variant: the median time of a meta-step (``meta_backward``) and of test-time adaptation per
task (``evaluate`` on ``--test-group`` tasks at once, as ``npbml eval`` hands NPBML 16), with CUDA
synchronised around every call, and on CUDA the peak of ``torch.cuda.max_memory_allocated`` over
the phase's calls (reset before it). NPBML's meta-step is also split into its episode-level
no-grad work (frozen features and relation scores), the forward of the batched inner loop, and
the rest (outer backward). A variant that raises is recorded with its error; the others still run.

Usage (one short call on a lent GPU machine; ``--cpu-steps 0`` skips the CPU rows):
    python scripts/bench_gpu.py --out docs/bench_gpu.json --markdown docs/benchmarks.md
    python scripts/bench_gpu.py --device cpu --image-size 32 --steps 1 --models conv4  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MD_START, MD_END = "<!-- bench_gpu:start -->", "<!-- bench_gpu:end -->"
VARIANTS = ("maml", "npbml", "npbml-pertask", "npbml-frel")
MODELS = ("conv4", "resnet12")
RESNET12 = (64, 160, 320, 640)


def build(
    variant: str,
    model_name: str,
    image_size: int,
    device: Any,
    resnet_channels: tuple[int, ...] = RESNET12,
) -> Any:
    """The learner of one variant on ``device`` (seeded: every run builds the same weights)."""
    import torch

    from npbml.algorithms import MAML, NPBML
    from npbml.algorithms.npbml.layers.relation import RelationNetwork
    from npbml.models import Conv4, ResNet12

    torch.manual_seed(0)
    model: torch.nn.Module
    if model_name == "conv4":
        model = Conv4(3, 5, hidden=48, image_size=image_size, variant="maxpool")
        feature_channels = 48
    else:
        model = ResNet12(3, 5, channels=resnet_channels, image_size=image_size)
        feature_channels = resnet_channels[2]  # the output of blocks 0-2, NPBML's frozen part
    learner: torch.nn.Module
    if variant == "maml":
        learner = MAML(model, inner_lr=0.01, inner_steps=5, eval_inner_steps=10)
    elif variant == "npbml-frel":
        relation = RelationNetwork(channels=feature_channels, reads="features", feature_blocks=3)
        learner = NPBML(model, relation_net=relation, episode_cache=0)
    else:
        relation = RelationNetwork(channels=64, in_channels=3)
        batched = variant == "npbml"
        learner = NPBML(model, relation_net=relation, episode_cache=0, batch_tasks=batched)
    return learner.to(device)


def episodes(count: int, image_size: int, seed: int, device: Any) -> Any:
    """``count`` stacked 5-way 1-shot episodes with 15 queries per class, on ``device``."""
    import torch

    from tasks.episode import Episode

    g = torch.Generator().manual_seed(seed)
    qy = torch.arange(5).repeat_interleave(15)
    shape = (3, image_size, image_size)
    eps = [
        Episode(
            torch.rand((5, *shape), generator=g),
            torch.arange(5),
            torch.rand((len(qy), *shape), generator=g),
            qy,
            torch.arange(5),
        )
        for _ in range(count)
    ]
    return Episode.stack(eps).to(device)


def measure(fn: Callable[[], Any], device: Any, warmup: int, rounds: int) -> dict[str, Any]:
    """Median wall seconds of ``fn`` (CUDA synchronised) and, on CUDA, its peak allocation."""
    import torch

    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    out: dict[str, Any] = {"s": statistics.median(times)}
    if cuda:
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def meta_step(learner: Any, batch: Any) -> Callable[[], None]:
    def run() -> None:
        for p in learner.meta_parameters():
            p.grad = None
        learner.meta_backward(batch, workers=1)

    return run


def npbml_phases(learner: Any, batch: Any) -> dict[str, Callable[[], Any]]:
    """NPBML's meta-step split: episode-level no-grad work, the batched inner loop's forward."""
    import torch

    from npbml.algorithms.npbml.batched import batched_query_logits

    tasks = batch.unstack()

    @torch.no_grad()
    def episode_work() -> None:
        for t in tasks:
            learner.inner_inputs(t.support_x, "second", t.support_y, t.query_x)
            learner.query_features(t.query_x)

    def inner_forward() -> None:
        batched_query_logits(learner, tasks, learner.inner_steps, "second")

    return {"episode_work": episode_work, "inner_forward": inner_forward}


def run_variant(
    variant: str, model_name: str, device: Any, args: argparse.Namespace, rounds: int, warmup: int
) -> dict[str, Any]:
    """Meta-step, test time per task and (NPBML, batched) the meta-step's phases; errors kept."""
    import torch

    try:
        channels = tuple(args.resnet12_channels)
        learner = build(variant, model_name, args.image_size, device, channels)
        train = episodes(args.meta_batch, args.image_size, 0, device)
        test = episodes(args.test_group, args.image_size, 1, device)
        out = {"meta_step": measure(meta_step(learner, train), device, warmup, rounds)}
        test_time = measure(lambda: learner.evaluate(test), device, warmup, rounds)
        test_time["s"] /= args.test_group
        out["test_time"] = test_time
        if variant in ("npbml", "npbml-frel"):
            out["phases"] = {
                k: measure(f, device, warmup, rounds)["s"]
                for k, f in npbml_phases(learner, train).items()
            }
        return out
    except Exception as e:  # a failure of one variant must not lose the others' numbers
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_device(
    device: Any, models: list[str], args: argparse.Namespace, rounds: int, warmup: int
) -> dict[str, Any]:
    """Every model and variant on one device, with the ratios NPBML / MAML."""
    out: dict[str, Any] = {}
    for m in models:
        res = {v: run_variant(v, m, device, args, rounds, warmup) for v in VARIANTS}
        base = res["maml"]
        for v in VARIANTS[1:]:
            if "error" in base or "error" in res[v]:
                continue
            res[v]["ratio"] = {k: res[v][k]["s"] / base[k]["s"] for k in ("meta_step", "test_time")}
        out[m] = res
    return out


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        MD_START,
        "## NPBML vs MAML at mini-ImageNet size, GPU and CPU (issue 13)",
        "",
        f"Command: `{command}` ({result['date']}, torch {result['torch']}, "
        f"{result['gpu'] or 'no GPU'}; CPU rows with {_threads(result['cpu_threads'])}). "
        "84x84x3, 5-way 1-shot, 15 queries, meta-batch "
        f"{result['meta_batch']}; test time per task, {result['test_group']} tasks at once; "
        "peak = `torch.cuda.max_memory_allocated`.",
        "",
        "| device | model | variant | meta-step ms | / MAML | test ms per task | / MAML "
        "| peak MiB (step) | peak MiB (test) | episode work ms | inner forward ms |",
        "|" + "---|" * 11,
    ]
    for dev, models in result["devices"].items():
        for m, res in models.items():
            for v, r in res.items():
                if "error" in r:
                    lines.append(f"| {dev} | {m} | {v} | error: {r['error'][:120]} |")
                    continue
                ratio = r.get("ratio", {})
                ph = r.get("phases", {})
                cells = [
                    dev,
                    m,
                    v,
                    f"{1000 * r['meta_step']['s']:.1f}",
                    f"{ratio['meta_step']:.2f}x" if ratio else "-",
                    f"{1000 * r['test_time']['s']:.1f}",
                    f"{ratio['test_time']:.2f}x" if ratio else "-",
                    _mib(r["meta_step"]),
                    _mib(r["test_time"]),
                    f"{1000 * ph['episode_work']:.1f}" if ph else "-",
                    f"{1000 * ph['inner_forward']:.1f}" if ph else "-",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    lines += ["", MD_END]
    return "\n".join(lines)


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _mib(r: dict[str, Any]) -> str:
    return f"{r['peak_mib']:.0f}" if "peak_mib" in r else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--steps", type=int, default=10, help="timed rounds per variant (device)")
    p.add_argument("--cpu-steps", type=int, default=2, help="timed CPU rounds; 0: no CPU rows")
    p.add_argument("--cpu-threads", type=int, default=8)
    p.add_argument("--cpu-models", nargs="*", choices=MODELS, default=["conv4"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--test-group", type=int, default=16)
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--resnet12-channels", type=int, nargs=4, default=list(RESNET12))
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--markdown", default=None, help="update this file's bench_gpu section")
    args = p.parse_args(argv)
    if min(args.steps, args.meta_batch, args.test_group, args.cpu_threads) < 1:
        p.error("--steps, --meta-batch, --test-group and --cpu-threads must be >= 1")
    if args.warmup < 0 or args.cpu_steps < 0 or args.image_size < 16:
        p.error("--warmup and --cpu-steps must be >= 0, --image-size >= 16")
    sys.path.insert(0, str(REPO))
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.cpu_threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    devices = {str(device): run_device(device, args.models, args, args.steps, args.warmup)}
    if device.type != "cpu" and args.cpu_steps and args.cpu_models:
        cpu = torch.device("cpu")
        devices["cpu"] = run_device(cpu, args.cpu_models, args, args.cpu_steps, 1)
    result = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": args.cpu_threads,
        "meta_batch": args.meta_batch,
        "test_group": args.test_group,
        "image_size": args.image_size,
        "devices": devices,
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.markdown:
        sys.path.insert(0, str(REPO / "scripts"))
        from _markdown import update_section

        command = "python scripts/bench_gpu.py " + " ".join(argv or sys.argv[1:])
        update_section(Path(args.markdown), markdown(result, command.strip()), MD_START, MD_END)
    print(text if not (args.out or args.markdown) else markdown(result, "bench_gpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
