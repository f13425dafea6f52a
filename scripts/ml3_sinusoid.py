"""ML3 sinusoid showcase (Bechtle et al. 2020): learn a regression loss on one sinusoid, then use
it to train fresh models on new sinusoids; compare with MSE and with an untrained loss network.

    python scripts/ml3_sinusoid.py [--steps 500] [--shaped] [--model sine|mlp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from npbml.loss_learning.ml3_sinusoid import evaluate_loss_on_new_tasks, meta_train_sinusoid_loss
from npbml.losses import LearnedLoss


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=500, help="ML3 meta steps")
    ap.add_argument("--num-tasks", type=int, default=1, help="sinusoids used at meta-train time")
    ap.add_argument("--model", choices=["sine", "mlp"], default="sine")
    ap.add_argument("--shaped", action="store_true", help="shaped meta-objective (true amp/phase)")
    ap.add_argument("--inner-lr", type=float, default=0.05)
    ap.add_argument("--meta-lr", type=float, default=3e-3)
    ap.add_argument("--reset-every", type=int, default=20)
    ap.add_argument("--train-steps", type=int, default=20, help="steps to train each fresh model")
    ap.add_argument("--eval-tasks", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    loss_net, history = meta_train_sinusoid_loss(
        steps=args.steps,
        num_tasks=args.num_tasks,
        model=args.model,
        shaped=args.shaped,
        inner_lr=args.inner_lr,
        meta_lr=args.meta_lr,
        reset_every=args.reset_every,
        seed=args.seed,
    )
    meta_time = time.perf_counter() - t0
    ev = dict(
        model=args.model,
        train_steps=args.train_steps,
        lr=args.inner_lr,
        num_tasks=args.eval_tasks,
        seed=args.seed + 1000,
    )
    results = {
        "args": vars(args),
        "meta_train_seconds": round(meta_time, 2),
        "meta_loss_first_20": sum(history[:20]) / min(20, len(history)),
        "meta_loss_last_20": sum(history[-20:]) / min(20, len(history)),
        "learned": evaluate_loss_on_new_tasks(loss_net, **ev),
        "mse": evaluate_loss_on_new_tasks(nn.MSELoss(), **ev),
        "untrained_learned_loss": evaluate_loss_on_new_tasks(LearnedLoss(task="regression"), **ev),
    }
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
