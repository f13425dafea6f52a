"""The relation network on NPBML's frozen backbone features (``RelationNetwork(reads="features")``,
issue 13): it scores exactly the features of the first ``feature_blocks`` blocks, NPBML feeds it
the features it computes anyway, and a mismatch between the two is refused."""

import argparse

import numpy as np
import pytest
import torch
from fixtures_formats import write_split_folders

from npbml.algorithms.npbml import NPBML, build_npbml
from npbml.algorithms.npbml.layers.relation import RelationNetwork, load_relation, save_relation
from npbml.cli.pretrain import (
    add_backbone_arguments,
    add_relation_arguments,
    run_pretrain,
    run_pretrain_relation,
)
from npbml.models import Conv4
from npbml.pretrain import backbone_features, pretrain_relation
from tasks import TaskSampler, TensorClassDataset


def _episode(ways=3, shots=2, queries=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(ways * shots, 1, size, size, generator=g)
    sy = torch.arange(ways).repeat(shots)
    qx = torch.rand(ways * queries, 1, size, size, generator=g)
    return sx, sy, qx


def _model(ways=3, hidden=6, seed=0):
    torch.manual_seed(seed)
    return Conv4(1, ways, hidden=hidden, image_size=16)


def _by_hand(model, relation, sx, sy, qx, blocks):
    """The scores from an independent pass: the plain model's leading blocks on the contiguous
    NCHW batch [S; Q], then the relation network on the two halves."""
    with torch.no_grad():
        h = torch.cat([sx, qx])
        for b in model.blocks[:blocks]:
            h = b(h)
        return relation(h[: len(sx)], sy, h[len(sx) :], int(sy.max()) + 1)


def test_feature_relation_needs_its_block_count_and_a_known_input():
    with pytest.raises(ValueError, match="feature_blocks >= 1"):
        RelationNetwork(channels=4, reads="features")
    with pytest.raises(ValueError, match="'images' or 'features'"):
        RelationNetwork(channels=4, reads="pixels")


def test_npbml_scores_its_own_frozen_features_with_a_feature_relation():
    model = _model()
    torch.manual_seed(1)
    relation = RelationNetwork(channels=6, reads="features", feature_blocks=3)
    learner = NPBML(model, relation_net=relation)
    assert learner.frozen_prefix == 3 and learner.relation_reads_features
    sx, sy, qx = _episode()
    expected = _by_hand(model, relation, sx, sy, qx, 3)
    torch.testing.assert_close(learner.relation_scores(sx, sy, qx), expected)
    # the inner loop's per-episode inputs carry the same scores (from the shared features)
    _, scores, _, joint = learner.inner_inputs(sx, "second", sy, qx)
    assert joint
    torch.testing.assert_close(scores, expected)
    # and an image relation network is not handed features
    image_rel = RelationNetwork(channels=4, in_channels=1)
    image_learner = NPBML(_model(), relation_net=image_rel)
    torch.testing.assert_close(image_learner.relation_scores(sx, sy, qx), image_rel(sx, sy, qx, 3))


def test_npbml_refuses_features_of_other_blocks():
    relation = RelationNetwork(channels=6, reads="features", feature_blocks=2)
    with pytest.raises(ValueError, match="--feature-blocks 3"):
        NPBML(_model(), relation_net=relation)


def test_feature_relation_pretraining_keeps_the_backbone_and_roundtrips(tmp_path):
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(6, 1, 16, 16, generator=g).repeat_interleave(6, 0)
    data = ((protos + 0.2 * torch.randn(protos.shape, generator=g)).clamp(0, 1) * 255).to(
        torch.uint8
    )
    dataset = TensorClassDataset.from_labels(data, np.arange(6).repeat(6))
    sampler = TaskSampler(dataset, ways=3, shots=2, queries=2, seed=0)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features, width = backbone_features(model, 3)
    assert width == 6
    torch.manual_seed(0)
    relation = RelationNetwork(channels=width, reads="features", feature_blocks=3)
    start = {k: v.clone() for k, v in relation.state_dict().items()}
    res = pretrain_relation(
        relation,
        sampler,
        steps=6,
        lr=1e-2,
        val_source=sampler,
        val_episodes=2,
        eval_every=3,
        features=features,
    )
    assert np.isfinite(res.best_accuracy)
    for k, v in model.state_dict().items():  # the backbone is only read
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, start[k]) for k, v in relation.state_dict().items())
    again = load_relation(save_relation(relation, tmp_path / "rel.pt"))
    assert (again.reads, again.feature_blocks) == ("features", 3)
    ep = sampler.sample(0)
    torch.testing.assert_close(
        _by_hand(model, again, ep.support_x, ep.support_y, ep.query_x, 3),
        _by_hand(model, relation, ep.support_x, ep.support_y, ep.query_x, 3),
    )
    with pytest.raises(ValueError, match="1..4 leading blocks"):
        backbone_features(model, 5)


def test_cli_pretrains_a_feature_relation_that_npbml_loads(tmp_path):
    write_split_folders(tmp_path / "data")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data: {{name: folder, root: '{tmp_path / 'data'}', ways: 3, shots: 1, queries: 2,\n"
        "       options: {image_size: 16, channels: 1}}\n"
        "model: {name: conv4, options: {hidden: 4}}\n"
    )
    common = ["--config", str(cfg), "--val-episodes", "2", "--eval-every", "1", "--steps", "2"]
    p = argparse.ArgumentParser()
    add_backbone_arguments(p)
    assert run_pretrain(p.parse_args([*common, "--out", str(tmp_path / "bb.pt")])) == 0
    p = argparse.ArgumentParser()
    add_relation_arguments(p)
    with pytest.raises(ValueError, match="pass backbone="):
        run_pretrain_relation(
            p.parse_args([*common, "--out", str(tmp_path / "x.pt"), "--encoder-blocks", "1"])
        )
    args = p.parse_args(
        [*common, "--out", str(tmp_path / "r.pt"), "--backbone", str(tmp_path / "bb.pt")]
        + ["--encoder-blocks", "1"]
    )
    assert run_pretrain_relation(args) == 0
    rel = load_relation(tmp_path / "r.pt")
    assert (rel.reads, rel.feature_blocks, rel.channels) == ("features", 3, 4)
    assert rel.config["encoder_blocks"] == 1
    learner = build_npbml(
        Conv4(1, 3, hidden=4, image_size=16),
        backbone_checkpoint=str(tmp_path / "bb.pt"),
        relation_checkpoint=str(tmp_path / "r.pt"),
    )
    assert learner.relation_reads_features


def test_own_encoder_blocks_are_a_plain_conv_block_before_the_relation_module(tmp_path):
    """``encoder_blocks=1``: a conv3x3-BN-ReLU block (batch statistics over the whole episode)
    on the frozen features, then the same relation module as without it; written by hand."""
    model = _model()
    torch.manual_seed(2)
    relation = RelationNetwork(channels=6, reads="features", feature_blocks=3, encoder_blocks=1)
    plain = RelationNetwork(channels=6, reads="features", feature_blocks=3)
    plain.load_state_dict(
        {k: v for k, v in relation.state_dict().items() if not k.startswith("encoder.")}
    )
    sx, sy, qx = _episode()
    with torch.no_grad():
        h = torch.cat([sx, qx])
        for b in model.blocks[:3]:
            h = b(h)
        conv = relation.encoder[0]
        e = torch.nn.functional.conv2d(h, conv.weight, conv.bias, padding=1)
        mean = e.mean(dim=(0, 2, 3), keepdim=True)
        var = e.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        bn = relation.encoder[1]
        e = (e - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1)
        e = (e + bn.bias.view(1, -1, 1, 1)).relu()
        expected = plain(e[: len(sx)], sy, e[len(sx) :], 3)
    learner = NPBML(model, relation_net=relation)
    torch.testing.assert_close(learner.relation_scores(sx, sy, qx), expected)
    again = load_relation(save_relation(relation, tmp_path / "rel.pt"))
    assert again.config["encoder_blocks"] == 1
    torch.testing.assert_close(
        NPBML(_model(), relation_net=again).relation_scores(sx, sy, qx), expected
    )


def test_own_encoder_blocks_need_features():
    with pytest.raises(ValueError, match="needs reads='features'"):
        RelationNetwork(channels=4, encoder_blocks=1)
    with pytest.raises(ValueError, match="must be >= 0"):
        RelationNetwork(channels=4, reads="features", feature_blocks=3, encoder_blocks=-1)
