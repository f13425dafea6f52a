"""NPBML's learned inner loss cannot blow up the inner loop (issue 12; docs/npbml.md).

The paper's inputs (raw logits, raw weight norms) and self-FiLM'd loss MLPs form a positive
feedback: loss networks at init std 0.1 gave NaN adapted logits within 5 inner steps on 20-way
episodes. By design, the default NPBML feeds its loss networks bounded inputs and clips every
inner step's gradient norm; these tests check both mechanisms separately and together.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npbml.algorithms import MAML
from npbml.algorithms.npbml import NPBML
from npbml.algorithms.npbml.layers.relation import RelationNetwork
from npbml.models import Conv4
from tasks.episode import Episode

WAYS = 20


def _episode(seed: int, ways: int = WAYS, queries: int = 1, size: int = 16) -> Episode:
    g = torch.Generator().manual_seed(seed)
    # Class-dependent images (a mean pattern per class plus noise), so the tasks are learnable.
    means = torch.rand(ways, 1, size, size, generator=g)
    sx = means + 0.3 * torch.randn(ways, 1, size, size, generator=g)
    qy = torch.arange(ways).repeat(queries)
    qx = means[qy] + 0.3 * torch.randn(len(qy), 1, size, size, generator=g)
    return Episode(sx, torch.arange(ways), qx, qy, torch.arange(ways))


def _npbml(std: float, seed: int = 0, hidden: int = 8, size: int = 16, **kw) -> NPBML:
    torch.manual_seed(seed)
    model = Conv4(hidden=hidden, image_size=size, num_classes=WAYS)
    rel = RelationNetwork(channels=hidden, in_channels=1)
    return NPBML(model, relation_net=rel, loss_init_std=std, film_init_std=std, **kw)


def _adapted_logits(learner: NPBML, ep: Episode) -> torch.Tensor:
    fast = learner.adapt_task(ep, mode="none")
    with torch.no_grad():
        return learner(ep.query_x, fast)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(std=st.floats(0.01, 0.1), seed=st.integers(0, 10_000))
def test_adapted_logits_stay_finite_and_small_for_any_ordinary_loss_net_scale(std, seed):
    # Conv4-32 on 28x28, 20-way: the setting in which the paper's inputs diverge (below).
    learner = _npbml(std, seed=seed % 7, hidden=32, size=28)
    logits = _adapted_logits(learner, _episode(seed, size=28))
    assert torch.isfinite(logits).all()
    assert logits.abs().max() < 100


def test_the_paper_inputs_without_the_safeguard_do_diverge():
    """The property above is not vacuous: the paper's raw inputs, no safeguard, std 0.1."""
    learner = _npbml(0.1, hidden=32, size=28, loss_inputs="logits", reg_normalize=False,
                     reg_joint=False, inner_max_grad_norm=None)
    logits = _adapted_logits(learner, _episode(0, size=28))
    assert not torch.isfinite(logits).all() or logits.abs().max() > 100


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_safeguard_bounds_every_step_even_for_an_exploding_loss(scale):
    """The backstop alone: paper inputs and loss-net weights far beyond the ordinary scale.
    Plain SGD (no momentum) makes the bound exact: ||theta_{j+1} - theta_j|| <= lr * c."""
    c, lr = 2.0, 0.05
    learner = _npbml(0.1, loss_inputs="logits", reg_normalize=False, reg_joint=False,
                     inner_max_grad_norm=c, momentum=0.0, nesterov=False, weight_decay=0.0,
                     inner_lr=lr, inner_steps=4)
    with torch.no_grad():
        for p in learner.inner_loss.parameters():
            p.mul_(scale)
    ep = _episode(1)
    path = [learner.initial_params()]
    for steps in range(1, 5):
        path.append(learner._adapt(ep.support_x, ep.support_y, steps, "none", ep.query_x))
    for a, b in zip(path, path[1:]):
        step = math.sqrt(sum(float((b[n] - a[n].detach()).pow(2).sum()) for n in a))
        assert step <= lr * c * (1 + 1e-5)
    assert all(torch.isfinite(t).all() for t in path[-1].values())


def test_safeguard_matches_a_hand_clipped_sgd_step_and_is_counted():
    """One MAML step with the safeguard equals theta - lr * g * min(1, c / ||g||)."""
    torch.manual_seed(0)
    model = Conv4(hidden=4, image_size=16, num_classes=5)
    ep = _episode(2, ways=5)
    params = dict(model.named_parameters())
    loss = F.cross_entropy(torch.func.functional_call(model, params, (ep.support_x,)), ep.support_y)
    grads = torch.autograd.grad(loss, list(params.values()))
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    for c in (norm / 4, norm * 4):  # acting, and not acting
        learner = MAML(model, inner_lr=0.3, inner_steps=1, inner_max_grad_norm=c)
        fast = learner.adapt(ep.support_x, ep.support_y)
        factor = min(1.0, c / norm)
        for (n, p), g in zip(params.items(), grads):
            torch.testing.assert_close(fast[n], p - 0.3 * g * factor, rtol=1e-5, atol=1e-6)
        metrics = learner.evaluate(ep, inner_steps=1)
        assert metrics["inner_clipped"] == (1.0 if c < norm else 0.0)
    assert "inner_clipped" not in MAML(model).evaluate(ep)


def test_safeguard_turns_a_nonfinite_step_into_no_step():
    learner = _npbml(0.01, weight_decay=0.0)
    with torch.no_grad():
        learner.inner_loss.support_net.layers[0].linear.weight.fill_(float("nan"))
    ep = _episode(3)
    fast = learner.adapt_task(ep, mode="none")
    init = learner.initial_params()
    for n in fast:
        assert torch.isfinite(fast[n]).all()
    # Every step was skipped (zero gradients, no weight decay): nothing moved.
    assert all(torch.equal(fast[n], init[n].detach()) for n in fast)
    assert learner.pop_inner_counts() == (5, 5)


def test_metrics_report_the_clipped_fraction_in_training_and_in_parallel():
    learner = _npbml(0.01, inner_max_grad_norm=1e-3)  # acts at every step
    batch = Episode.stack([_episode(4), _episode(5)])
    _, metrics = learner.outer_loss(batch)
    assert metrics["inner_clipped"] == 1.0
    assert learner.meta_backward(batch, workers=2)["inner_clipped"] == 1.0
    relaxed = _npbml(0.01, inner_max_grad_norm=1e6)
    assert relaxed.meta_backward(batch)["inner_clipped"] == 0.0


def test_reference_adapted_set_and_joint_regulariser():
    learner = _npbml(0.01)
    films = {n for n, _ in learner.network.named_parameters() if n.startswith("films.3.")}
    assert films and set(learner.adapted_names) == {
        "blocks.3.conv.weight", "head.weight", "head.bias", *films
    }
    assert not any("bias" in n and n.startswith("blocks.") for n in learner.adapted_names)
    assert not any(".bn." in n for n in learner.adapted_names)
    with_bn = _npbml(0.01, adapt_bn=True)
    assert {"blocks.3.bn.weight", "blocks.3.bn.bias"} <= set(with_bn.adapted_names)
    # R is one MLP over the 4 statistics of every adapted tensor (paper: R^{4L} -> R).
    reg = learner.inner_loss.reg_net
    assert reg.in_features == 4 * len(learner.adapted_names)
    # The warp block is conv -> BN -> FiLM (reference code).
    assert learner.network.warps["3"].bn is not None


def test_conv4_reference_options_gap_head_and_no_conv_bias():
    torch.manual_seed(0)
    model = Conv4(in_channels=3, hidden=48, image_size=84, pool="avg", conv_bias=False)
    assert model.head.in_features == 48  # reference: global average pool, not 5x5x48 = 1200
    assert all(b.conv.bias is None for b in model.blocks)
    x = torch.randn(2, 3, 84, 84)
    torch.testing.assert_close(model.features(x), model.blocks(x).mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="pool"):
        Conv4(variant="strided", pool="flatten")
    # The conv bias feeds BatchNorm (batch statistics), which removes it: same output without.
    with_bias = Conv4(hidden=4, image_size=16)
    without = Conv4(hidden=4, image_size=16, conv_bias=False)
    without.load_state_dict(
        {k: v for k, v in with_bias.state_dict().items() if not k.endswith("conv.bias")}
    )
    with torch.no_grad():
        for b in with_bias.blocks:
            b.conv.bias.normal_()
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(with_bias(x), without(x), rtol=1e-4, atol=1e-5)


def test_resnet12_film_per_conv_matches_a_hand_written_block_forward():
    from npbml.models import ResNet12

    torch.manual_seed(0)
    model = ResNet12(in_channels=1, channels=(2, 3, 4, 5), image_size=16, num_classes=WAYS)
    learner = NPBML(model, loss_terms=("ce",), film_init_std=0.3, inner_steps=1)
    gen, block = learner.network.films["3"], learner.network.blocks[3]
    assert gen.num_features == 3 * 5  # one gamma/beta pair per conv of the adapted block
    one = NPBML(model, loss_terms=("ce",), film_per_conv=False)
    assert one.network.films["3"].num_features == 5
    x = torch.randn(4, 4, 2, 2)
    gamma, beta = gen(x.mean(dim=(2, 3)))
    g = [(1 + gamma[:, 5 * k : 5 * (k + 1), None, None], beta[:, 5 * k : 5 * (k + 1), None, None])
         for k in range(3)]
    h = block.act(g[0][0] * block.bn1(block.conv1(x)) + g[0][1])
    h = block.act(g[1][0] * block.bn2(block.conv2(h)) + g[1][1])
    h = g[2][0] * block.bn3(block.conv3(h)) + g[2][1]
    expected = block.dropout(block.pool(block.act(h + block.shortcut(x))))
    warp = learner.network.warps["3"]
    torch.testing.assert_close(learner.network.block_forward(3, x), warp(expected))


def test_proto_head_init_is_the_nearest_prototype_classifier_of_the_support_set():
    torch.manual_seed(0)
    model = Conv4(hidden=8, image_size=16, num_classes=5)
    # float64: the learner's frozen blocks run channels-last, the reference below NCHW; in float32
    # the two roundings differ by ~5e-6 relative on some CPUs, more than assert_close allows.
    learner = NPBML(model, loss_terms=("ce",), head_init="proto", film_init_std=0.1).double()
    ep = _episode(6, ways=5, queries=2)
    ep = dataclasses.replace(ep, support_x=ep.support_x.double(), query_x=ep.query_x.double())
    fast = learner.adapt(ep.support_x, ep.support_y, steps=0, query_x=ep.query_x)
    # Independently: features of the joint [S; Q] forward, class means over the support rows.
    with torch.no_grad():
        net = learner.network
        feats = net.reduce(net.run_blocks(torch.cat([ep.support_x, ep.query_x])))[:5]
        protos = torch.stack([feats[ep.support_y == c].mean(0) for c in range(5)])
    torch.testing.assert_close(fast["head.weight"].detach(), 2 * protos)
    torch.testing.assert_close(fast["head.bias"].detach(), -(protos**2).sum(1))
    # Its logits rank classes as the negative squared distances do.
    with torch.no_grad():
        q = net.reduce(net.run_blocks(ep.query_x))
        logits = learner(ep.query_x, fast)
    torch.testing.assert_close(
        logits - logits.mean(1, keepdim=True),
        -torch.cdist(q, protos).pow(2) + torch.cdist(q, protos).pow(2).mean(1, keepdim=True),
        rtol=1e-4, atol=1e-4,
    )
    # The head has no meta-learned init of its own; the body gets a meta-gradient through it.
    names = [n for n, _ in learner.named_meta_parameters()]
    assert not any(n.startswith("model.head.") for n in names)
    learner.outer_loss(ep)[0].backward()
    assert learner.network.blocks[3].conv.weight.grad.abs().sum() > 0


def test_a_meta_trained_npbml_never_diverges_on_within_alphabet_episodes(omniglot_root):
    """Meta-train the full method briefly with an aggressive meta-learning rate (the loss
    networks' weights grow fast), then adapt on 20-way within-alphabet test episodes of small2's
    new alphabets: no episode's adapted logits leave the bound."""
    import tasks
    from npbml.evaluate import evaluate

    ts = tasks.get_tasksets(
        "omniglot-minimal", str(omniglot_root), ways=WAYS, shots=1, queries=1,
        within_alphabet="test", image_size=28,
    )
    torch.manual_seed(0)
    learner = _npbml(0.05, hidden=16, size=28)
    opt = torch.optim.Adam(learner.meta_parameters(), lr=3e-2)
    loss_params = list(learner.inner_loss.parameters())
    before = torch.cat([p.detach().flatten() for p in loss_params]).norm()
    for _ in range(6):
        opt.zero_grad()
        learner.meta_backward(ts.train.sample_batch(2))
        opt.step()
    after = torch.cat([p.detach().flatten() for p in loss_params]).norm()
    assert after > 1.25 * before  # the loss networks really moved away from their init
    res = evaluate(learner, ts.test, 8)
    assert res["diverged"] == 0 and res["max_abs_logit"] < 100
