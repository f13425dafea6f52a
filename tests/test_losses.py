"""Common loss interface, registry, CrossEntropy wrapper and the learned loss network."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from npbml.activations import smooth_leaky_relu
from npbml.losses import (
    CrossEntropy,
    LabelSmoothingCE,
    LearnedLoss,
    LossFn,
    SparseLSR,
    all_finite,
    build_loss,
    restore_parameters,
    snapshot_parameters,
)


def test_registry_builds_every_loss_and_rejects_unknown():
    assert isinstance(build_loss("ce"), CrossEntropy)
    assert isinstance(build_loss("label_smoothing", smoothing=0.2), LabelSmoothingCE)
    assert isinstance(build_loss("sparse_lsr", smoothing=0.2), SparseLSR)
    assert isinstance(build_loss("learned", output_activation="none"), LearnedLoss)
    z, t = torch.randn(4, 3), torch.randint(0, 3, (4,))
    for name in ("ce", "label_smoothing", "sparse_lsr", "learned"):
        loss = build_loss(name)
        assert isinstance(loss, LossFn)
        assert loss(z, t).shape == ()
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        build_loss("mse")
    with pytest.raises(TypeError, match="bad arguments for loss 'ce'"):
        build_loss("ce", smoothing=0.1)


def test_cross_entropy_wrapper():
    z, t = torch.randn(6, 4), torch.randint(0, 4, (6,))
    torch.testing.assert_close(CrossEntropy()(z, t), F.cross_entropy(z, t))
    torch.testing.assert_close(CrossEntropy("none")(z, t), F.cross_entropy(z, t, reduction="none"))
    with pytest.raises(ValueError, match="does not match"):
        CrossEntropy()(z, t[:3])


def _per_class_loop(net: LearnedLoss, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Independent evaluation: one class at a time, weights applied by hand."""
    ws = [layer.weight for layer in net.layers]
    total = torch.zeros(p.shape[0], dtype=p.dtype)
    for c in range(p.shape[1]):
        h = torch.stack((p[:, c], y[:, c]), -1)
        for i, w in enumerate(ws):
            h = h @ w.T
            if i < len(ws) - 1:
                h = smooth_leaky_relu(h)
        if net.output_activation == "softplus":
            h = F.softplus(h)
        total = total + h[:, 0]
    return total.mean()


@pytest.mark.parametrize("out", ["softplus", "none"])
def test_learned_loss_matches_per_class_loop(out):
    torch.manual_seed(0)
    net = LearnedLoss(output_activation=out).double()
    z, t = torch.randn(5, 7, dtype=torch.float64), torch.randint(0, 7, (5,))
    expected = _per_class_loop(net, torch.softmax(z, -1), F.one_hot(t, 7).double())
    torch.testing.assert_close(net(z, t), expected)
    # Probability targets give the same result as the equivalent class indices.
    torch.testing.assert_close(net(z, F.one_hot(t, 7).double()), expected)


def test_learned_loss_structure_and_nonnegativity():
    net = LearnedLoss()
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(50, 2), (50, 50), (1, 50)]  # 2 -> 50 -> 50 -> 1, no biases
    z = torch.randn(32, 10) * 10
    assert bool((net.per_class(z, torch.randint(0, 10, (32,))) >= 0).all())


def test_learned_loss_regression_form():
    torch.manual_seed(1)
    net = LearnedLoss(task="regression", hidden=(8,)).double()
    yh, y = torch.randn(6, 1, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    expected = _per_class_loop(net, yh, y)
    torch.testing.assert_close(net(yh, y), expected)
    torch.testing.assert_close(net(yh[:, 0], y[:, 0]), expected)  # [N] vectors accepted
    with pytest.raises(ValueError, match="same number of elements"):
        net(yh, y[:3])


def test_learned_loss_functional_call_with_meta_parameters():
    torch.manual_seed(2)
    net = LearnedLoss(init_std=0.1)
    phi = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    scaled = {k: 2.0 * v for k, v in phi.items()}  # non-leaf tensors, as in meta-learning
    z = torch.randn(4, 3, requires_grad=True)
    t = torch.randint(0, 3, (4,))
    loss = functional_call(net, scaled, (z, t))
    (gz,) = torch.autograd.grad(loss, z, create_graph=True)
    grads = torch.autograd.grad(gz.square().sum(), list(phi.values()))
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(scaled[k])
    torch.testing.assert_close(net(z, t), loss)


def test_learned_loss_kaiming_init():
    torch.manual_seed(5)
    net = LearnedLoss(init="kaiming")
    for layer, fan_in in zip(net.layers, (2, 50, 50)):
        std = layer.weight.std().item()
        assert std == pytest.approx((2 / fan_in) ** 0.5, rel=0.3), fan_in  # N(0, 2 / fan_in)
    default = LearnedLoss()  # PyTorch's nn.Linear init: std 1 / sqrt(3 fan_in)
    assert default.layers[1].weight.std().item() == pytest.approx((1 / 150) ** 0.5, rel=0.3)


@pytest.mark.parametrize("classes", [10, 242])
def test_learned_loss_logit_gradient_closed_form(classes):
    # d/dz_k sum_c g(p_c, y_c) = p_k (g'_k - sum_c p_c g'_c), g' the derivative in p: the chain
    # rule through the softmax, computed independently of the module's forward. At uniform
    # logits it is O(1/C), the reason why a learned loss trains slowly with many classes.
    torch.manual_seed(6)
    net = LearnedLoss(init="kaiming").double()
    n = 4
    z = (0.1 * torch.randn(n, classes, dtype=torch.float64)).requires_grad_()
    t = torch.randint(0, classes, (n,))
    (gz,) = torch.autograd.grad(net(z, t), z)
    p = torch.softmax(z.detach(), -1).requires_grad_()
    y = F.one_hot(t, classes).double()
    (gp,) = torch.autograd.grad(net.g(torch.stack((p, y), -1)).sum(), p)
    expected = p.detach() * (gp - (p.detach() * gp).sum(-1, keepdim=True)) / n
    torch.testing.assert_close(gz, expected)
    # Target logit at uniform p: (1/C)(1 - 1/C)(g'(1/C, 1) - g'(1/C, 0)) / n.
    u = torch.zeros(1, classes, dtype=torch.float64, requires_grad=True)
    (gu,) = torch.autograd.grad(net(u, torch.tensor([0])), u)
    q = torch.full((2,), 1.0 / classes, dtype=torch.float64, requires_grad=True)
    (slopes,) = torch.autograd.grad(
        net.g(torch.stack((q, torch.tensor([1.0, 0.0], dtype=torch.float64)), -1)).sum(), q
    )
    c = classes
    torch.testing.assert_close(gu[0, 0], (1 / c) * (1 - 1 / c) * (slopes[0] - slopes[1]))


def test_learned_loss_log_prob_inputs_gradient_is_order_one():
    # inputs="log_prob": the MLP reads log_softmax(z); d/dz_k sum_c g(l_c, y_c) =
    # g'_k - p_k sum_c g'_c (chain rule through log_softmax, computed here independently), so at
    # uniform logits the target component is about g'(l, 1) - g'(l, 0) whatever C is.
    torch.manual_seed(7)
    for classes in (10, 242):
        net = LearnedLoss(inputs="log_prob").double()
        z = (0.1 * torch.randn(3, classes, dtype=torch.float64)).requires_grad_()
        t = torch.randint(0, classes, (3,))
        pairs = net.pairs(z.detach(), t)
        torch.testing.assert_close(pairs[..., 0], torch.log_softmax(z.detach(), -1))
        (gz,) = torch.autograd.grad(net(z, t), z)
        lp = torch.log_softmax(z.detach(), -1).requires_grad_()
        y = F.one_hot(t, classes).double()
        (gl,) = torch.autograd.grad(net.g(torch.stack((lp, y), -1)).sum(), lp)
        p = lp.detach().exp()
        torch.testing.assert_close(gz, (gl - p * gl.sum(-1, keepdim=True)) / 3)
        u = torch.zeros(1, classes, dtype=torch.float64, requires_grad=True)
        (gu,) = torch.autograd.grad(net(u, torch.tensor([0])), u)
        q = torch.full((2,), -float(torch.log(torch.tensor(classes))), dtype=torch.float64)
        q.requires_grad_()
        (slopes,) = torch.autograd.grad(
            net.g(torch.stack((q, torch.tensor([1.0, 0.0], dtype=torch.float64)), -1)).sum(), q
        )
        expected = slopes[0] - (slopes[0] + (classes - 1) * slopes[1]) / classes
        torch.testing.assert_close(gu[0, 0], expected)
        assert abs(expected) > 0.1 * abs(slopes[0] - slopes[1])  # no 1/C factor


def test_learned_loss_repr_names_its_inputs():
    assert "inputs='log_prob'" in repr(LearnedLoss(inputs="log_prob"))
    assert "inputs" not in repr(LearnedLoss("regression"))


def test_learned_loss_bad_arguments():
    with pytest.raises(ValueError, match="inputs must be"):
        LearnedLoss(inputs="logits")
    with pytest.raises(ValueError, match="init must be"):
        LearnedLoss(init="xavier")
    with pytest.raises(ValueError, match="output_activation"):
        LearnedLoss(output_activation="relu")
    with pytest.raises(ValueError, match="task"):
        LearnedLoss(task="ranking")
    with pytest.raises(ValueError, match="target distribution"):
        LearnedLoss()(torch.randn(4, 3), torch.randn(4, 2))


def test_guard_helpers_roll_back_parameters():
    net = LearnedLoss(hidden=(3,))
    snap = snapshot_parameters(net)
    with torch.no_grad():
        net.layers[0].weight.fill_(float("nan"))
    assert not all_finite(*net.parameters())
    restore_parameters(net, snap)
    assert all_finite(*net.parameters(), None)
    torch.testing.assert_close(net.layers[0].weight, snap["layers.0.weight"])
