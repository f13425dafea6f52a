"""Write the GPU-scale NPBML configs (paper Tables 1-2) for every dataset, shot and backbone.

Reference settings (Raymond et al., arXiv 2406.07983, and their code; docs/methods/npbml.md):
supervised pre-training, then Adam 1e-5 with cosine decay to 1e-6 for 30,000 meta-steps,
meta-batch 4 (1-shot) / 2 (5-shot), inner SGD with Nesterov 0.9, weight decay 5e-4, lr 0.01,
5 steps at meta-train and meta-test, the last block (+ FiLM) and the head adapt, validation on
600 tasks every 500 steps keeping the best checkpoint. Backbones as the reference code:
4-CONV-48 without conv biases and with a global-average-pooled 48-d head (not 5x5x48 flattened),
ResNet-12 [64, 128, 256, 512] (AdaResNet) with one FiLM per conv of the adapted block
(NPBMLOptions' default). docs/npbml.md lists the remaining deviations.

    python scripts/make_npbml_configs.py   # writes configs/npbml_<data>_5w<k>s_<backbone>.yaml
"""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# name in tasks.get_tasksets, file stem, image size, root folder, published accuracy (%) of
# NPBML with 4-CONV-48 / ResNet-12 for 1 and 5 shots (paper Tables 1-2).
DATASETS = {
    "mini-imagenet": ("miniimagenet", 84, {"conv4": (57.49, 75.01), "resnet12": (61.59, 78.18)}),
    "tiered-imagenet": (
        "tieredimagenet",
        84,
        {"conv4": (64.24, 79.17), "resnet12": (72.22, 85.41)},
    ),
    "cifar-fs": ("cifarfs", 32, {"conv4": (64.90, 79.24), "resnet12": (69.30, 83.72)}),
    "fc100": ("fc100", 32, {"conv4": (40.56, 53.48), "resnet12": (43.63, 59.85)}),
}
MODELS = {
    "conv4": {
        "name": "conv4",
        "options": {"hidden": 48, "variant": "maxpool", "pool": "avg", "conv_bias": False},
    },
    "resnet12": {"name": "resnet12", "options": {"channels": [64, 128, 256, 512]}},
}


def config(data: str, shots: int, backbone: str) -> tuple[str, str]:
    stem, size, published = DATASETS[data]
    name = f"npbml_{stem}_5w{shots}s_{backbone}"
    run = f"runs/{name}"
    acc = published[backbone][0 if shots == 1 else 1]
    header = (
        f"# NPBML, {data} 5-way {shots}-shot, {backbone} ({size}x{size} images): reference\n"
        "# GPU-scale settings (written by scripts/make_npbml_configs.py, whose docstring\n"
        f"# lists them). Published (paper Tables 1-2): {acc:.2f}%. "
        "Data format: docs/data-formats.md.\n"
        "# Pipeline:\n"
        f"#   npbml pretrain          --config configs/{name}.yaml --out {run}/backbone.pt "
        "--device auto\n"
        f"#   npbml pretrain-relation --config configs/{name}.yaml --out {run}/relation.pt "
        "--device auto\n"
        f"#   npbml train             --config configs/{name}.yaml --out {run}\n"
        "# Ablations (paper Tables 3-4): --set algorithm.options.ablation=init|+optimizer|+loss|\n"
        "# +optimizer+loss|full|loss:ce|loss:+support|loss:+query|loss:+reg|loss:all\n"
    )
    body = {
        "data": {
            "name": data,
            "root": f"data/{data}",
            "ways": 5,
            "shots": shots,
            "queries": 15,
            "test_queries": 15,
        },
        "model": MODELS[backbone],
        "algorithm": {
            "name": "npbml",
            "inner_lr": 0.01,
            "inner_steps": 5,
            "eval_inner_steps": 5,
            "first_order": False,
            "options": {
                "momentum": 0.9,
                "nesterov": True,
                "weight_decay": 5.0e-4,
                "use_film": True,
                "use_warp": True,
                "warp_after": [-1],
                "loss_terms": ["ce", "support", "query", "reg"],
                "head_init": "row",
                "joint_forward": True,
                "backbone_checkpoint": f"{run}/backbone.pt",
                "relation_checkpoint": f"{run}/relation.pt",
            },
        },
        "train": {
            "meta_batch_size": 4 if shots == 1 else 2,
            "meta_steps": 30000,
            "meta_lr": 1.0e-5,
            "optimizer": "adam",
            "lr_schedule": "cosine",
            "min_lr": 1.0e-6,
            "val_every": 500,
            "val_tasks": 600,
            "log_every": 100,
            "checkpoint_every": 500,
            "seed": 0,
            "device": "auto",
        },
        "eval": {"tasks": 600, "split": "test"},
    }
    return name, header + yaml.safe_dump(body, sort_keys=False)


def main() -> None:
    for data in DATASETS:
        for shots in (1, 5):
            for backbone in MODELS:
                name, text = config(data, shots, backbone)
                (CONFIGS / f"{name}.yaml").write_text(text)
                print(f"wrote configs/{name}.yaml")


if __name__ == "__main__":
    main()
