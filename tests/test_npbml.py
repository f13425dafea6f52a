import pytest
import torch

from npbml.algorithms import MAML, build_algorithm
from npbml.algorithms.npbml import ABLATIONS, NPBML
from npbml.algorithms.npbml.layers.relation import RelationNetwork
from npbml.models import Conv4
from tasks.episode import Episode

WAYS = 5


def _episode(seed=0, queries=2):
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.rand(WAYS, 1, 16, 16, generator=g),
        torch.arange(WAYS),
        torch.rand(WAYS * queries, 1, 16, 16, generator=g),
        torch.arange(WAYS).repeat(queries),
        torch.arange(WAYS),
    )


def _model(seed=0):
    torch.manual_seed(seed)
    return Conv4(hidden=4, image_size=16, num_classes=WAYS)


def _full(model, **kw):
    torch.manual_seed(1)
    rel = RelationNetwork(channels=4, in_channels=1)
    kw = {"inner_steps": 2, "inner_lr": 0.1, "relation_net": rel, **kw}
    return NPBML(model, **kw)


def test_meta_gradient_reaches_every_group():
    learner = _full(_model(), loss_init_std=0.1, film_init_std=0.1)
    loss, metrics = learner.outer_loss(_episode())
    assert metrics["finite"]
    loss.backward()
    groups = learner.meta_parameter_groups()
    assert all(groups[k] for k in ("init", "head_row", "warp", "film", "loss"))
    for name, p in learner.named_meta_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    # every group and every loss term receives a nonzero meta-gradient
    for k, ps in groups.items():
        assert sum(float(p.grad.abs().sum()) for p in ps) > 0, k
    for term in ("support_net", "query_net", "reg_net"):
        sub = getattr(learner.inner_loss, term)
        assert sum(float(p.grad.abs().sum()) for p in sub.parameters()) > 0, term
    # frozen blocks are neither adapted nor meta-learned; the relation network is frozen
    assert learner.frozen_prefix == 3
    assert learner.network.blocks[0].conv.weight.grad is None
    assert all(p.grad is None for p in learner.relation_net.parameters())
    assert learner.nonfinite_meta_gradients() == []


def test_all_components_off_equals_maml():
    ep = _episode()
    model = _model()
    off = dict(
        use_film=False,
        use_warp=False,
        loss_terms=("ce",),
        head_init="model",
        joint_forward=False,
        adapt="*",
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        inner_lr=0.3,
        inner_steps=2,
    )
    npbml = NPBML(model, **off)
    maml = MAML(model, inner_lr=0.3, inner_steps=2)
    params = list(model.parameters())
    g1 = torch.autograd.grad(npbml.outer_loss(ep)[0], params)
    g2 = torch.autograd.grad(maml.outer_loss(ep)[0], params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert any(float(a.abs().sum()) > 0 for a in g1)


def test_query_labels_never_influence_adaptation():
    learner = _full(_model(), loss_init_std=0.1)
    ep = _episode()
    other = Episode(ep.support_x, ep.support_y, ep.query_x, ep.query_y.flip(0), ep.classes)
    a = learner.adapt_task(ep, mode="none")
    b = learner.adapt_task(other, mode="none")
    for n in a:
        assert torch.equal(a[n], b[n]), n
    # ... while the query inputs do (transductive term and joint BatchNorm statistics)
    moved = Episode(ep.support_x, ep.support_y, ep.query_x.flip(0) * 0.5, ep.query_y, ep.classes)
    c = learner.adapt_task(moved, mode="none")
    assert not torch.allclose(a["head.weight"], c["head.weight"])


def test_head_row_meta_gradient_is_sum_of_row_gradients():
    ep = _episode()
    model = _model()
    kw = dict(
        use_film=False,
        use_warp=False,
        loss_terms=("ce", "support"),
        loss_init_std=0.3,
        inner_steps=2,
        inner_lr=0.5,
    )
    torch.manual_seed(3)
    row_learner = NPBML(model, head_init="row", **kw)
    with torch.no_grad():
        row_learner.network.head_row.weight.normal_()
        row_learner.network.head_row.bias.fill_(0.2)
    row_learner.outer_loss(ep)[0].backward()
    g_row = row_learner.network.head_row.weight.grad.clone()
    g_bias = row_learner.network.head_row.bias.grad.clone()
    assert g_row.abs().sum() > 0
    # Independent computation: the same init written into an ordinary [N, F] head.
    plain = NPBML(model, head_init="model", **kw)
    plain.inner_loss.load_state_dict(row_learner.inner_loss.state_dict())
    w, b = row_learner.network.head_row.expand()
    with torch.no_grad():
        model.head.weight.copy_(w)
        model.head.bias.copy_(b)
    gw, gb = torch.autograd.grad(plain.outer_loss(ep)[0], [model.head.weight, model.head.bias])
    torch.testing.assert_close(g_row, gw.sum(0))
    torch.testing.assert_close(g_bias, gb.sum())


def test_frozen_prefix_features_match_full_forward():
    learner = _full(_model())
    ep = _episode()
    fast = learner.adapt_task(ep, mode="none")
    full = learner(ep.query_x, fast)
    cached = learner.forward_from(learner.frozen_features(ep.query_x), fast, 3)
    torch.testing.assert_close(full, cached)


def test_ablation_presets_build_and_evaluate():
    ep = _episode()
    for name, preset in ABLATIONS.items():
        kw = dict(preset, inner_steps=1)
        if "query" in preset["loss_terms"]:
            kw["relation_net"] = RelationNetwork(channels=4)
        learner = NPBML(_model(), **kw)
        m = learner.evaluate(ep)
        assert 0.0 <= m["accuracy"] <= 1.0, name
        assert bool(learner.network.warps) == preset["use_warp"], name
        assert (learner.task_loss_fn is None) == (preset["loss_terms"] == ("ce",)), name


def test_build_algorithm_and_errors():
    learner = build_algorithm("npbml", _model(), loss_terms=("ce", "reg"))
    assert isinstance(learner, NPBML)
    with pytest.raises(ValueError, match="relation_net"):
        NPBML(_model(), loss_terms=("ce", "query"))
    with pytest.raises(ValueError, match="loss_terms"):
        NPBML(_model(), loss_terms=("ce", "typo"))
    with pytest.raises(ValueError, match="query_x"):
        _full(_model()).adapt(_episode().support_x, _episode().support_y)


def test_nonfinite_meta_loss_is_flagged():
    learner = _full(_model(), inner_max_grad_norm=None)  # the safeguard would skip the NaN step
    with torch.no_grad():
        learner.inner_loss.support_net.layers[0].linear.weight.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        loss, metrics = learner.outer_loss(_episode())
    assert metrics["finite"] is False
    loss.backward()
    assert learner.nonfinite_meta_gradients()


def test_head_row_gets_no_meta_gradient_from_shift_invariant_ce():
    # Adding one vector to every head row shifts all logits equally, which softmax-CE (and SGD
    # with weight decay, which scales that shared part uniformly) cannot see: with CE as the only
    # inner loss the shared row's meta-gradient is exactly zero. It learns through L_S / R.
    learner = NPBML(_model(), use_film=False, use_warp=False, loss_terms=("ce",), inner_steps=2)
    with torch.no_grad():
        learner.network.head_row.weight.normal_()
    learner.outer_loss(_episode())[0].backward()
    assert learner.network.head_row.weight.grad.abs().max() < 1e-6
    assert learner.network.blocks[3].conv.weight.grad.abs().max() > 1e-6


def test_resnet12_backbone():
    from npbml.models import ResNet12

    torch.manual_seed(0)
    model = ResNet12(in_channels=1, channels=(2, 3, 4, 5), image_size=16, num_classes=WAYS)
    learner = NPBML(model, loss_terms=("ce", "support", "reg"), inner_steps=1)
    assert set(learner.network.films) == {"3"} and set(learner.network.warps) == {"3"}
    loss, metrics = learner.outer_loss(_episode())
    loss.backward()
    assert metrics["finite"] and learner.nonfinite_meta_gradients() == []
    assert learner.network.warps["3"].conv.weight.grad.abs().sum() > 0


def test_meta_backward_matches_outer_loss_and_head_row_from_linear():
    ep = Episode.stack([_episode(0), _episode(1)])
    learner = _full(_model(), loss_init_std=0.1)
    learner.outer_loss(ep)[0].backward()
    expected = [p.grad.clone() for p in learner.meta_parameters()]
    learner.zero_grad()
    metrics = learner.meta_backward(ep)
    assert metrics["finite"]
    for g, p in zip(expected, learner.meta_parameters()):
        torch.testing.assert_close(p.grad, g)
    row = learner.network.head_row.from_linear(learner.network.head)
    torch.testing.assert_close(row.weight, learner.network.head.weight.mean(0))
