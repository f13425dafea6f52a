import argparse

import numpy as np
import pytest
import torch
from fixtures_formats import write_split_folders
from torch import nn

from npbml.algorithms.npbml import NPBML, build_npbml
from npbml.algorithms.npbml.layers.relation import RelationNetwork, load_relation, save_relation
from npbml.checkpoint import CheckpointError
from npbml.cli.pretrain import (
    add_backbone_arguments,
    add_relation_arguments,
    run_pretrain,
    run_pretrain_relation,
)
from npbml.models import Conv4
from npbml.pretrain import (
    load_backbone_weights,
    mean_prototype_accuracy,
    pretrain_backbone,
    pretrain_relation,
    prototype_accuracy,
    save_backbone,
)
from tasks import Episode, TaskSampler, TensorClassDataset


def _patterns(num_classes=8, per_class=8, seed=0):
    # Each class: a fixed random 16x16 pattern plus noise (learnable in a few dozen steps).
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(num_classes, 1, 16, 16, generator=g)
    data = protos.repeat_interleave(per_class, 0)
    data = (data + 0.3 * torch.randn(data.shape, generator=g)).clamp(0, 1)
    labels = np.arange(num_classes).repeat(per_class)
    return TensorClassDataset.from_labels((data * 255).to(torch.uint8), labels)


class _Flat(nn.Module):
    def features(self, x):
        return x.flatten(1)


def test_prototype_accuracy_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    ep = Episode(
        torch.randn(6, 1, 2, 2, generator=g),
        torch.tensor([0, 0, 1, 1, 2, 2]),
        torch.randn(9, 1, 2, 2, generator=g),
        torch.tensor([0, 1, 2] * 3),
        torch.arange(3),
    )
    s, q = ep.support_x.flatten(1), ep.query_x.flatten(1)
    protos = torch.stack([s[ep.support_y == c].mean(0) for c in range(3)])
    pred = [int(np.argmin([float(((qi - p) ** 2).sum()) for p in protos])) for qi in q]
    expected = float(np.mean(np.array(pred) == ep.query_y.numpy()))
    assert prototype_accuracy(_Flat(), ep) == pytest.approx(expected)


def test_pretrain_backbone_learns_and_keeps_best_weights(tmp_path):
    train, val = _patterns(8, seed=0), _patterns(5, seed=1)
    val_sampler = TaskSampler(val, ways=5, shots=1, queries=3, seed=0)
    torch.manual_seed(0)
    model = Conv4(hidden=4, image_size=16)
    head = model.head.weight.detach().clone()
    records = []
    res = pretrain_backbone(
        model,
        train,
        steps=20,
        batch_size=16,
        lr=0.05,
        val_source=val_sampler,
        val_episodes=4,
        eval_every=5,
        log=records.append,
    )
    assert len(res.history) == 4 and records == res.history
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.best_accuracy == max(r["val_accuracy"] for r in res.history)
    # the restored weights are the best ones (re-evaluation reproduces the best score)
    assert mean_prototype_accuracy(model, val_sampler, 4) == pytest.approx(res.best_accuracy)
    assert torch.equal(model.head.weight, head)  # the N-way head is untouched

    path = save_backbone(model, tmp_path / "bb.pt", "conv4", {"hidden": 4, "image_size": 16})
    other = Conv4(hidden=4, image_size=16)
    names = load_backbone_weights(other, path)
    assert names and all(n.startswith("blocks.") for n in names)
    for n in names:
        assert torch.equal(other.state_dict()[n], model.state_dict()[n])
    learner = build_npbml(
        Conv4(hidden=4, image_size=16), loss_terms=("ce",), backbone_checkpoint=str(path)
    )
    torch.testing.assert_close(learner.network.blocks[0].conv.weight, model.blocks[0].conv.weight)
    # The learner itself reads no files: naming a checkpoint to it directly is an error.
    with pytest.raises(ValueError, match="build_npbml"):
        NPBML(Conv4(hidden=4, image_size=16), loss_terms=("ce",), backbone_checkpoint=str(path))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_backbone_weights(Conv4(hidden=8, image_size=16), path)


def test_relation_pretraining_roundtrip(tmp_path):
    data = _patterns(6, seed=2)
    sampler = TaskSampler(data, ways=3, shots=2, queries=2, seed=0)
    torch.manual_seed(0)
    rel = RelationNetwork(channels=4, in_channels=1)
    res = pretrain_relation(
        rel, sampler, steps=12, lr=1e-2, val_source=sampler, val_episodes=3, eval_every=4
    )
    assert len(res.history) == 3 and np.isfinite(res.best_accuracy)
    assert not any(p.requires_grad for p in rel.parameters())
    ep = sampler.sample(0)
    scores = rel(ep.support_x, ep.support_y, ep.query_x, 3)
    assert scores.shape == (6, 3) and bool(((scores >= 0) & (scores <= 1)).all())
    path = save_relation(rel, tmp_path / "rel.pt")
    again = load_relation(path)
    torch.testing.assert_close(again(ep.support_x, ep.support_y, ep.query_x, 3), scores)
    learner = build_npbml(
        Conv4(hidden=4, image_size=16, num_classes=3), relation_checkpoint=str(path)
    )
    assert learner.relation_net is not None
    with pytest.raises(CheckpointError, match="not a relation"):
        load_relation(save_backbone(Conv4(hidden=4, image_size=16), tmp_path / "b.pt", "conv4", {}))


def test_cli_functions(tmp_path, capsys):
    write_split_folders(tmp_path / "data")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{name: folder, root: '{tmp_path / 'data'}', ways: 3, shots: 1, queries: 2,\n"
        "       options: {image_size: 16, channels: 1}}\n"
        "model: {name: conv4, options: {hidden: 4}}\n"
    )
    p = argparse.ArgumentParser()
    add_backbone_arguments(p)
    args = p.parse_args(
        [
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "bb.pt"),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--val-episodes",
            "2",
            "--eval-every",
            "1",
        ]
    )
    assert run_pretrain(args) == 0
    assert (tmp_path / "bb.pt").is_file()
    p = argparse.ArgumentParser()
    add_relation_arguments(p)
    args = p.parse_args(
        [
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "rel.pt"),
            "--steps",
            "2",
            "--channels",
            "4",
            "--val-episodes",
            "2",
            "--eval-every",
            "1",
        ]
    )
    assert run_pretrain_relation(args) == 0
    assert load_relation(tmp_path / "rel.pt").channels == 4
    assert "wrote" in capsys.readouterr().out


def test_relation_scores_match_a_plain_nchw_reference():
    """The CPU channels-last switch inside RelationNetwork changes layout, not values: scores
    equal a hand-written pass of the same modules on contiguous NCHW tensors."""
    import torch

    from npbml.algorithms.npbml.layers.relation import RelationNetwork

    torch.manual_seed(0)
    net = RelationNetwork(channels=8, in_channels=1)
    sx, sy, qx = (
        torch.rand(6, 1, 28, 28),
        torch.tensor([0, 1, 2, 0, 1, 2]),
        torch.rand(4, 1, 28, 28),
    )
    with torch.no_grad():
        emb = net.encoder(torch.cat([sx, qx]))  # nn.Sequential called directly: NCHW throughout
        s, q = emb[:6], emb[6:]
        protos = torch.stack([s[sy == c].mean(0) for c in range(3)])
        pairs = torch.cat(
            [q[:, None].expand(4, 3, *q.shape[1:]), protos[None].expand(4, 3, *protos.shape[1:])],
            dim=2,
        ).flatten(0, 1)
        ref = net.score(net.relation(pairs.contiguous()).mean(dim=(2, 3))).view(4, 3)
        got = net(sx, sy, qx, 3)
    assert net.embed(qx).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
