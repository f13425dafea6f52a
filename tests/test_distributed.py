"""Multi-process meta-training (torchrun, gloo on CPU): the meta-batch split across 2 processes
gives the single-process meta-gradient, rank 0 alone writes the run, and a paused 2-process run
resumes exactly.

Two torchrun launches (``python -m torch.distributed.run --standalone --nproc_per_node=2``, which
picks a free port itself; one torch thread per process): the real entry point ``-m npbml train
--max-steps 1`` (:data:`CLI` runs it as ``-m`` does; train() creates and destroys the process
group), then :data:`WORKER`, which creates one group itself and calls ``train()`` several times in
it (resume, uninterrupted run, bad meta-batch size, a NaN on one rank), saving a process start per
run. Both then list the gloo threads left after the group was destroyed. The reference is an
in-process single-process ``train()`` of the same config: SGD with meta-rate 1, so that after one
step ``theta_1 - theta_0 = -grad`` and comparing parameters compares meta-gradients.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_run import tiny_run

from npbml.checkpoint import load_checkpoint
from npbml.config import ConfigError, config_from_dict
from npbml.distributed import init_distributed, local_batch_size
from npbml.train import (
    TIMING_KEYS,
    build_learner,
    infer_model_kwargs,
    make_tasksets,
    read_metrics,
    seed_everything,
    train,
)
from tasks.episode import Episode

META_STEPS = 4


def _config(**train_overrides):
    """Second-order MAML on a tiny glyph family (16x16, Conv4 with 4 strided filters)."""
    t = {
        "meta_batch_size": 4,
        "meta_steps": META_STEPS,
        "meta_lr": 1.0,
        "optimizer": "sgd",
        "val_every": 2,
        "val_tasks": 5,  # odd: the 2 ranks evaluate 3 and 2 episodes
        "log_every": 1,
        "checkpoint_every": 2,
        "seed": 1,
        "threads": 1,
    }
    t.update(train_overrides)
    return config_from_dict(tiny_run(t))


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (torchrun picks a free port itself)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


# Ends each torchrun script: this rank's threads named after gloo (its transport loop and
# workers), written to ``{leftovers}.{RANK}`` after the group was destroyed ("?": no /proc). A group
# that outlives destroy_process_group() keeps them running into interpreter exit, where tearing
# them down aborted a rank at random (SIGABRT, "terminate called without an active exception";
# issue 16); test_no_gloo_thread_outlives_the_process_group asserts there are none.
LEFTOVER_THREADS = """
import os as _os
_tasks = "/proc/self/task"
if _os.path.isdir(_tasks):
    _names = [open(f"{_tasks}/{t}/comm").read().strip() for t in _os.listdir(_tasks)]
    _left = "\\n".join(n for n in _names if "gloo" in n)
else:
    _left = "?"
with open(f"{leftovers}.{_os.environ['RANK']}", "w") as _f:
    _f.write(_left)
"""

# ``python -m npbml ARGS`` run as the interpreter runs it (runpy), then LEFTOVER_THREADS.
CLI = """
import runpy
import sys
leftovers = sys.argv.pop(1)
sys.argv[0] = "npbml"
try:
    runpy.run_module("npbml", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
LEFTOVER_THREADS
sys.exit(code)
""".replace("LEFTOVER_THREADS", LEFTOVER_THREADS)

# Runs in each of 2 torchrun processes: one process group (created here, so train() uses it as
# it is) for several train() calls, which saves a process start per run.
WORKER = """
import sys
import warnings
import torch
import torch.distributed as dist
from npbml.config import ConfigError, load_config
from npbml.train import make_tasksets, train

from npbml.distributed import init_distributed, shutdown

config_file, resume_dir, full_dir, nan_dir, errors, leftovers = sys.argv[1:]
ctx = init_distributed(torch.device("cpu"))
rank = ctx.rank
config = load_config(config_file)
train(config, resume_dir, progress=False)  # resumes the run paused by the CLI
train(config, full_dir, progress=False)  # uninterrupted
try:
    train(load_config(config_file, ["train.meta_batch_size=3"]), full_dir + "_bad")
except ConfigError as e:
    with open(f"{errors}.{rank}", "w") as f:
        f.write(str(e))


class Poisoned:  # a NaN in rank 1's share of the step-2 meta-batch (global task 2 of 4)
    def __init__(self, sampler):
        self.sampler, self.calls = sampler, 0

    def sample_batch_shard(self, batch_size, rank, world_size):
        self.calls += 1
        batch = self.sampler.sample_batch_shard(batch_size, rank, world_size)
        if self.calls == 2 and rank == 1:
            batch.support_x[0, 0, 0, 0, 0] = float("nan")
        return batch

    def __getattr__(self, name):
        return getattr(self.sampler, name)


nan_config = load_config(config_file, NAN_OVERRIDES)
ts = make_tasksets(nan_config)
ts.train = Poisoned(ts.train)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = train(nan_config, nan_dir, tasksets=ts, progress=False)
torch.save(res.learner.state_dict(), f"{nan_dir}/params.{rank}.pt")
shutdown(ctx)
LEFTOVER_THREADS
"""
NAN_TRAIN = {"meta_steps": 3, "val_every": 100, "checkpoint_every": 100}
WORKER = WORKER.replace("NAN_OVERRIDES", repr([f"train.{k}={v}" for k, v in NAN_TRAIN.items()]))
WORKER = WORKER.replace("LEFTOVER_THREADS", LEFTOVER_THREADS)


def _strip_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2-process runs (paused after 1 step by the CLI, then resumed; uninterrupted) and the
    single-process reference (paused after 1 step, then resumed)."""
    root = tmp_path_factory.mktemp("dist")
    config_file = root / "tiny.yaml"
    _config().save(config_file)
    resumed_dir = root / "two_resumed"
    cli = root / "cli.py"
    cli.write_text(CLI)
    paused = _torchrun(
        str(cli), str(root / "left_cli"),
        "train", "--config", str(config_file), "--out", str(resumed_dir), "--quiet",
        "--max-steps", "1",
    )  # fmt: skip
    step1 = load_checkpoint(resumed_dir / "last.pt")
    shutil.copytree(resumed_dir, root / "two_step1")  # for a 1-process resume
    worker = root / "worker.py"
    worker.write_text(WORKER)
    full_dir, nan_dir, errors = root / "two_full", root / "two_nan", root / "err"
    left = root / "left_worker"
    _torchrun(str(worker), *map(str, (config_file, resumed_dir, full_dir, nan_dir, errors, left)))
    train(_config(), root / "one", max_steps=1, progress=False)
    single1 = load_checkpoint(root / "one" / "last.pt")
    train(_config(), root / "one", progress=False)
    return {"root": root, "paused_stdout": paused.stdout, "two_step1": step1, "one_step1": single1}


def test_one_distributed_step_equals_the_single_process_step(runs):
    two, one = runs["two_step1"], runs["one_step1"]
    assert two["step"] == one["step"] == 1
    # SGD with rate 1: theta_1 = theta_0 - g, so the parameters differ by the gradient difference.
    assert _max_diff(two["learner"], one["learner"]) < 1e-6
    # ... and the step is large enough that a wrong weighting (sum instead of mean over ranks,
    # or one rank's half of the meta-batch only) would be far outside that tolerance.
    cfg = _config()
    seed_everything(cfg.train.seed)
    theta0 = build_learner(cfg, infer_model_kwargs(cfg, make_tasksets(cfg)))
    step = _max_diff(one["learner"], {k: v.detach() for k, v in theta0.state_dict().items()})
    assert step > 1e-2
    # Both consumed the same 4 tasks of the same stream.
    assert two["samplers"] == one["samplers"]
    assert two["samplers"]["train"]["index"] == 4
    m2 = read_metrics(runs["root"] / "two_full" / "metrics.jsonl")[0]
    m1 = read_metrics(runs["root"] / "one" / "metrics.jsonl")[0]
    assert m2["step"] == m1["step"] == 1
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-6)
    assert m2["accuracy"] == pytest.approx(m1["accuracy"], abs=1e-9)


def test_two_process_resume_is_exact(runs):
    root = runs["root"]
    resumed = load_checkpoint(root / "two_resumed" / "last.pt")
    full = load_checkpoint(root / "two_full" / "last.pt")
    assert resumed["step"] == full["step"] == META_STEPS
    for k in full["learner"]:
        assert torch.equal(resumed["learner"][k], full["learner"][k]), k
    assert resumed["samplers"] == full["samplers"]
    assert resumed["log_accumulator"] == full["log_accumulator"]
    for r in (0, 1):  # every rank's RNG state travels through the checkpoint
        assert torch.equal(resumed["rng_ranks"][r]["torch"], full["rng_ranks"][r]["torch"])
        assert resumed["rng_ranks"][r]["python"] == full["rng_ranks"][r]["python"]
    got = _strip_timing(read_metrics(root / "two_resumed" / "metrics.jsonl"))
    assert got == _strip_timing(read_metrics(root / "two_full" / "metrics.jsonl"))
    best_a = load_checkpoint(root / "two_resumed" / "best.pt")["learner"]
    best_b = load_checkpoint(root / "two_full" / "best.pt")["learner"]
    assert _max_diff(best_a, best_b) == 0.0
    assert runs["paused_stdout"].count("paused at step 1/4") == 1  # rank 0 alone reports


def test_two_process_run_matches_the_single_process_run(runs):
    root = runs["root"]
    two = load_checkpoint(root / "two_full" / "last.pt")
    one = load_checkpoint(root / "one" / "last.pt")
    # Four SGD steps at rate 1 amplify float rounding (summation order) a little.
    assert _max_diff(two["learner"], one["learner"]) < 1e-4
    assert two["samplers"] == one["samplers"]
    r2 = read_metrics(root / "two_full" / "metrics.jsonl")
    r1 = read_metrics(root / "one" / "metrics.jsonl")
    # Rank 0 alone writes: one line per step and split, as in a single process.
    assert [(r["step"], r["split"]) for r in r2] == [(r["step"], r["split"]) for r in r1]
    for a, b in zip(r2, r1, strict=True):
        if a["split"] == "train":
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        else:  # validation split across ranks, gathered back in episode order
            assert (a["accuracy"], a["ci95"], a["tasks"]) == (b["accuracy"], b["ci95"], b["tasks"])
    # Every rank's RNG states are saved; rank 0's are the single-process stream's.
    assert two["world_size"] == 2 and len(two["rng_ranks"]) == 2
    assert torch.equal(two["rng_ranks"][0]["torch"], two["rng"]["torch"])
    assert torch.equal(two["rng"]["torch"], one["rng"]["torch"])
    assert not torch.equal(two["rng_ranks"][1]["torch"], two["rng"]["torch"])


def test_a_two_process_checkpoint_resumes_in_one_process(runs):
    root = runs["root"]
    res = train(_config(), root / "two_step1", progress=False)
    assert res.finished and res.step == META_STEPS and res.world_size == 1
    full = load_checkpoint(root / "two_full" / "last.pt")["learner"]
    got = {k: v.detach() for k, v in res.learner.state_dict().items()}
    assert _max_diff(got, full) < 1e-4


class _PoisonTask:
    """Single-process train sampler whose ``call``-th meta-batch has a NaN in task ``task``."""

    def __init__(self, sampler, call, task):
        self.sampler, self.call, self.task, self.calls = sampler, call, task, 0

    def sample_batch(self, batch_size):
        self.calls += 1
        batch = self.sampler.sample_batch(batch_size)
        if self.calls == self.call:
            batch.support_x[self.task, 0, 0, 0, 0] = float("nan")
        return batch

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def test_a_nonfinite_step_on_one_rank_is_skipped_on_all_ranks(runs, tmp_path):
    nan_dir = runs["root"] / "two_nan"
    p0 = torch.load(nan_dir / "params.0.pt", weights_only=True)
    p1 = torch.load(nan_dir / "params.1.pt", weights_only=True)
    assert _max_diff(p0, p1) == 0.0  # the ranks took the same decisions: still in step
    assert all(torch.isfinite(v).all() for v in p0.values() if v.is_floating_point())
    records = read_metrics(nan_dir / "metrics.jsonl")
    skipped = [r for r in records if r.get("skipped")]
    assert [r["step"] for r in skipped] == [2] and skipped[0]["meta_loss"] == "nan"
    # The same as one process whose step-2 meta-batch has the NaN in its task 2.
    cfg = _config(**NAN_TRAIN)
    ts = make_tasksets(cfg)
    ts.train = _PoisonTask(ts.train, call=2, task=2)
    with pytest.warns(RuntimeWarning, match="step 2: non-finite"):
        one = train(cfg, tmp_path, tasksets=ts, progress=False)
    got = {k: v.detach() for k, v in one.learner.state_dict().items()}
    assert _max_diff(got, p0) < 1e-5
    # Rank 0 alone wrote, the same lines as the single process.
    ref = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"], r.get("skipped")) for r in records] == [
        (r["step"], r["split"], r.get("skipped")) for r in ref
    ]


def test_no_gloo_thread_outlives_the_process_group(runs):
    # Both launches: the CLI (train() creates and destroys the group) and the worker (it creates
    # the group with init_distributed and destroys it with shutdown). Before the fix the first
    # optimizer imported torch.distributed.nn while the group existed, which pinned the group
    # (module WORLD_DEFAULT_MODULES of npbml.distributed): 3 gloo threads per rank were left.
    for launch in ("cli", "worker"):
        for rank in (0, 1):
            left = (runs["root"] / f"left_{launch}.{rank}").read_text()
            if left == "?":
                pytest.skip("no /proc/self/task: cannot list a process's threads here")
            assert left == "", (
                f"{launch} rank {rank}: threads {left.split()} still run after "
                "destroy_process_group(); the group was not freed"
            )


def test_shards_partition_the_single_process_meta_batch():
    ts = make_tasksets(_config())
    ref = [ts.train.sample_batch(4), ts.train.sample_batch(4)]
    for world in (1, 2, 4):
        # One sampler per rank, as in a run: all start equal and advance by the whole batch.
        samplers = [make_tasksets(_config()).train for _ in range(world)]
        for i, batch in enumerate(ref):
            shards = [s.sample_batch_shard(4, r, world) for r, s in enumerate(samplers)]
            assert [s.index for s in samplers] == [4 * (i + 1)] * world
            assert all(len(s) == 4 // world for s in shards)
            whole = Episode.stack([e for s in shards for e in s.unstack()])
            assert torch.equal(whole.support_x, batch.support_x)
            assert torch.equal(whole.query_y, batch.query_y)
            assert torch.equal(whole.classes, batch.classes)
    with pytest.raises(ValueError, match="multiple of world_size 3"):
        ts.train.sample_batch_shard(4, 0, 3)
    with pytest.raises(ValueError, match="rank 2 of 2"):
        ts.train.sample_batch_shard(4, 2, 2)


def test_meta_batch_not_divisible_by_the_processes_is_a_clear_error(runs):
    # Raised on both ranks of the 2-process group (so neither waits for the other).
    for rank in (0, 1):
        msg = (runs["root"] / f"err.{rank}").read_text()
        assert "meta_batch_size=3 is not divisible by the number of processes" in msg
        assert "WORLD_SIZE=2" in msg and "train.meta_batch_size=2 or 4" in msg
    assert local_batch_size(8, 4) == 2
    with pytest.raises(ConfigError, match=r"meta_batch_size=6 .*WORLD_SIZE=4.*=4 or 8"):
        local_batch_size(6, 4)
    with pytest.raises(ConfigError, match=r"meta_batch_size=1 .*WORLD_SIZE=2.*=2"):
        local_batch_size(1, 2)


def test_without_torchrun_nothing_is_initialised(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed(torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (0, 1, False, True)
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT are not set; launch with"):
        init_distributed(torch.device("cpu"))
