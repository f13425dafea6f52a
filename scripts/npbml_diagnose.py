"""What does each learned part of a meta-trained NPBML contribute? (issue 12)

For a trained run directory (``npbml train`` output) and fixed test episodes, reports:

* **gradient share** of each learned loss term at the start of the inner loop: the norm of the
  term's gradient w.r.t. the adapted weights divided by the norm of the CE gradient (a term at
  1% moves the inner loop by ~1% of what CE does);
* **test-time ablation**: the accuracy with each learned loss term switched off, with all of them
  off (M = CE), and with the warp replaced by the identity; each as a paired per-episode
  difference against the trained model (95% interval);
* the **safeguard**: the share of inner steps it clipped (first 50 episodes), the largest
  adapted logit, and the same learner evaluated with the safeguard switched off.

    python scripts/npbml_diagnose.py RUN [RUN ...] --tasks 200 [--ways 20 --within-alphabet]

Prints one JSON object per run (``--json``) or a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TERMS = {"L_S": "support_net", "L_Q": "query_net", "R": "reg_net"}


def gradient_shares(learner: Any, episodes: list[Any]) -> dict[str, float]:
    """Mean over episodes of ||grad term|| / ||grad CE|| at the initial adapted weights."""
    loss = learner.task_loss_fn
    shares: dict[str, list[float]] = {t: [] for t, net in TERMS.items() if getattr(loss, net)}
    for ep in episodes:
        inputs = learner.inner_inputs(ep.support_x, "none", ep.support_y, ep.query_x)
        h0, scores, n_s, joint = inputs
        params = {n: p.detach().requires_grad_(True) for n, p in learner.initial_params().items()}
        logits = learner.forward_from(h0, params, learner.frozen_prefix)
        values = {"CE": torch.nn.functional.cross_entropy(logits[:n_s], ep.support_y)}
        if loss.support_net is not None:
            values["L_S"] = loss.support_term(logits[:n_s], ep.support_y)
        if loss.query_net is not None and joint:
            values["L_Q"] = loss.query_term(logits[n_s:], scores)
        if loss.reg_net is not None:
            values["R"] = loss.reg_term(params)
        norms = {}
        for k, v in values.items():
            g = torch.autograd.grad(v, list(params.values()), allow_unused=True, retain_graph=True)
            norms[k] = float(torch.sqrt(sum((x**2).sum() for x in g if x is not None)))
        for t in shares:
            if t in norms:
                shares[t].append(norms[t] / max(norms["CE"], 1e-12))
    return {t: float(np.mean(v)) for t, v in shares.items() if v}


def variants(learner: Any) -> dict[str, Any]:
    """The trained learner and copies with learned parts switched off at test time."""
    out = {"trained": learner}
    loss = learner.task_loss_fn
    if loss is not None:
        for term, net in TERMS.items():
            if getattr(loss, net) is not None:
                v = copy.deepcopy(learner)
                setattr(v.inner_loss, net, None)
                out[f"-{term}"] = v
        v = copy.deepcopy(learner)
        for net in TERMS.values():
            setattr(v.inner_loss, net, None)
        out["M=CE"] = v
    if len(learner.network.warps):
        v = copy.deepcopy(learner)
        with torch.no_grad():
            for w in v.network.warps.values():
                torch.nn.init.dirac_(w.conv.weight)
        out["warp=I"] = v
    return out


def diagnose(run: Path, learner: Any, sampler: Any, tasks: int) -> dict[str, Any]:
    """The report of one trained learner on episodes ``0 .. tasks-1`` of ``sampler``."""
    from npbml.evaluate import evaluate, paired_difference

    episodes = [sampler.sample(i) for i in range(min(tasks, 50))]
    report: dict[str, Any] = {"run": str(run)}
    if learner.task_loss_fn is not None:
        report["gradient_share"] = gradient_shares(learner, episodes)
    results = {k: evaluate(v, sampler, tasks, per_task=True) for k, v in variants(learner).items()}
    base = np.asarray(results["trained"]["accuracies"])
    report["trained"] = {k: results["trained"][k] for k in ("accuracy", "ci95", "diverged")}
    report["trained"]["max_abs_logit"] = results["trained"]["max_abs_logit"]
    report["switched_off"] = {
        k: {"accuracy": r["accuracy"], **paired_difference(np.asarray(r["accuracies"]), base)}
        for k, r in results.items()
        if k != "trained"
    }
    if learner.inner_max_grad_norm is not None:
        shares = [learner.evaluate(ep).get("inner_clipped", 0.0) for ep in episodes]
        report["inner_clipped"] = float(np.mean(shares))
        # The same learner without the safeguard: does the learned loss need it?
        free = copy.deepcopy(learner)
        free.inner_max_grad_norm = None
        res = evaluate(free, sampler, tasks, per_task=True)
        report["without_safeguard"] = {
            "accuracy": res["accuracy"],
            "diverged": res["diverged"],
            "max_abs_logit": res["max_abs_logit"],
            **paired_difference(np.asarray(res["accuracies"]), base),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    from npbml.train import load_learner, make_tasksets

    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--test-seed", type=int, default=0)
    p.add_argument("--test-queries", type=int, default=None)
    p.add_argument("--within-alphabet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for run in args.runs:
        learner, config, _ = load_learner(run, "cpu")
        config.train.seed = args.test_seed
        if args.test_queries is not None:
            config.data.test_queries = args.test_queries
        if args.within_alphabet:
            config.data.options["within_alphabet"] = "test"
        sampler = make_tasksets(config).test
        print(json.dumps(diagnose(run, learner, sampler, args.tasks)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
