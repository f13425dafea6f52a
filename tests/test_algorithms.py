"""Meta-learners (npbml.algorithms) against independent computations, in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from npbml.algorithms import ANIL, FOMAML, MAML, MetaSGD, available_algorithms, build_algorithm
from npbml.params import named_params
from tasks.episode import Episode

DT = torch.float64


class TinyNet(nn.Module):
    """conv -> BN (batch stats) -> tanh -> linear head; smooth, so finite differences are exact."""

    def __init__(self, ways: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2, track_running_stats=False)
        self.head = nn.Linear(2 * 3 * 3, ways)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.bn(self.conv(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _episode(seed: int, ways: int = 3, shots: int = 2, queries: int = 3) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(ways).repeat_interleave(shots)
    qy = torch.arange(ways).repeat_interleave(queries)
    return Episode(
        support_x=torch.randn(len(sy), 1, 5, 5, generator=g, dtype=DT),
        support_y=sy,
        query_x=torch.randn(len(qy), 1, 5, 5, generator=g, dtype=DT),
        query_y=qy,
        classes=torch.arange(ways),
    )


def _model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet().to(DT)
    with torch.no_grad():  # non-trivial BN affine parameters
        model.bn.weight.add_(0.3 * torch.randn(2, dtype=DT))
        model.bn.bias.add_(0.3 * torch.randn(2, dtype=DT))
    return model


def _meta_grads(learner, episode) -> dict[str, torch.Tensor]:
    learner.zero_grad()
    loss, _ = learner.outer_loss(episode)
    loss.backward()
    return {n: p.grad.clone() for n, p in learner.named_meta_parameters()}


def _fd_grad(learner, episode, param: torch.Tensor, coords=None, eps: float = 1e-6):
    """Central finite differences of the meta-loss (evaluated with no graph) w.r.t. the flat
    coordinates ``coords`` of ``param`` (all by default); returns {coordinate: derivative}."""
    flat = param.data.view(-1)
    out = {}
    for i in range(flat.numel()) if coords is None else coords:
        old = flat[i].item()
        flat[i] = old + eps
        plus = learner.evaluate(episode)["loss"]
        flat[i] = old - eps
        minus = learner.evaluate(episode)["loss"]
        flat[i] = old
        out[i] = (plus - minus) / (2 * eps)
    return out


def _check_fd(grad: torch.Tensor, fd: dict[int, float], rtol=1e-5, atol=1e-7) -> None:
    got = torch.stack([grad.reshape(-1)[i] for i in fd])
    torch.testing.assert_close(got, torch.tensor(list(fd.values()), dtype=DT), rtol=rtol, atol=atol)


def test_maml_second_order_matches_finite_differences():
    model = _model()
    learner = MAML(model, inner_lr=0.3, inner_steps=2)
    episode = Episode.stack([_episode(1), _episode(2)])
    grads = _meta_grads(learner, episode)
    g = torch.Generator().manual_seed(0)
    for name, p in named_params(model).items():  # three random coordinates of every tensor
        coords = torch.randperm(p.numel(), generator=g)[:3].tolist()
        _check_fd(grads["model." + name], _fd_grad(learner, episode, p, coords))


def _softmax_regression_reference(w0, b0, ep, lr, steps):
    """MAML on a linear softmax classifier, inner gradient written out by hand:
    dCE/dW = (softmax(XW^T + b) - Y)^T X / n, dCE/db = mean(softmax - Y)."""
    xs, ys = ep.support_x.flatten(1), F.one_hot(ep.support_y, 3).to(DT)
    w, b = w0, b0
    for _ in range(steps):
        r = torch.softmax(xs @ w.T + b, dim=1) - ys
        w = w - lr * r.T @ xs / len(xs)
        b = b - lr * r.mean(0)
    logits = ep.query_x.flatten(1) @ w.T + b
    return F.cross_entropy(logits, ep.query_y)


def test_maml_matches_hand_written_unroll():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(25, 3)).to(DT)
    learner = MAML(model, inner_lr=0.5, inner_steps=3)
    ep = _episode(4)
    grads = _meta_grads(learner, ep)
    w0 = model[1].weight.detach().clone().requires_grad_()
    b0 = model[1].bias.detach().clone().requires_grad_()
    ref = _softmax_regression_reference(w0, b0, ep, 0.5, 3)
    gw, gb = torch.autograd.grad(ref, [w0, b0])
    torch.testing.assert_close(grads["model.1.weight"], gw)
    torch.testing.assert_close(grads["model.1.bias"], gb)


def test_maml_closed_form_for_quadratic_inner_loss():
    # Linear model f(x) = W x with inner loss 0.5/n ||X W^T - Y||^2: one step gives
    # W1 = W0 - (lr/n) (W0 X^T - Y^T) X, so dW1/dW0 acts as G -> G (I - (lr/n) X^T X) and the
    # meta-gradient is dCE(Q; W1)/dW1 (I - (lr/n) X^T X), with dCE/dW1 = (softmax - Y_q)^T X_q / m.
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(25, 3, bias=False)).to(DT)
    lr = 0.05

    def mse(logits, targets):
        return 0.5 * ((logits - F.one_hot(targets, 3).to(DT)) ** 2).sum() / len(targets)

    learner = MAML(model, inner_lr=lr, inner_steps=1, inner_loss=mse)
    ep = _episode(6)
    grads = _meta_grads(learner, ep)
    w0 = model[1].weight.detach()
    xs, ys = ep.support_x.flatten(1), F.one_hot(ep.support_y, 3).to(DT)
    xq, yq = ep.query_x.flatten(1), F.one_hot(ep.query_y, 3).to(DT)
    n, m = len(xs), len(xq)
    w1 = w0 - lr / n * (w0 @ xs.T - ys.T) @ xs
    g1 = (torch.softmax(xq @ w1.T, dim=1) - yq).T @ xq / m
    expected = g1 @ (torch.eye(25, dtype=DT) - lr / n * xs.T @ xs)
    torch.testing.assert_close(grads["model.1.weight"], expected)


def test_fomaml_is_query_gradient_at_adapted_params():
    model = _model(1)
    ep = _episode(7)
    learner = FOMAML(model, inner_lr=0.3, inner_steps=2)
    grads = _meta_grads(learner, ep)
    # Independent: adapt a copy with torch.optim.SGD, take the query gradient there.
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(ref(ep.support_x), ep.support_y).backward()
        opt.step()
    ref.zero_grad()
    F.cross_entropy(ref(ep.query_x), ep.query_y).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(grads["model." + n], p.grad)
    # Second order differs.
    second = _meta_grads(MAML(model, inner_lr=0.3, inner_steps=2), ep)
    diff = max((second[k] - grads[k]).abs().max().item() for k in grads)
    assert diff > 1e-4
    # first_order is accepted for a uniform signature, but FOMAML stays first order.
    assert FOMAML(model, first_order=False).first_order
    with pytest.raises(ValueError, match="requires_grad=False"):
        MAML(TinyNet().requires_grad_(False))


def test_metasgd_lr_gradient_matches_finite_differences():
    model = _model(2)
    learner = MetaSGD(model, inner_lr=0.2, inner_steps=2)
    ep = _episode(8)
    meta_names = [n for n, _ in learner.named_meta_parameters()]
    assert sum(n.startswith("inner_optimizer.") for n in meta_names) == len(named_params(model))
    with torch.no_grad():  # distinct per-coordinate rates
        for r in learner.lrs.parameters():
            r.mul_(1 + 0.5 * torch.rand_like(r))
    grads = _meta_grads(learner, ep)
    rates = learner.lrs()
    for name in ("bn.weight", "head.bias", "conv.bias"):
        g = grads["inner_optimizer.lr.rates." + name.replace(".", "/")]
        _check_fd(g, _fd_grad(learner, ep, rates[name]), atol=1e-8)
    # The init also gets its (second-order) meta-gradient.
    _check_fd(grads["model.conv.bias"], _fd_grad(learner, ep, model.conv.bias), atol=1e-8)


def test_anil_adapts_head_only_and_computes_features_once():
    model = _model(3)
    learner = ANIL(model, inner_lr=0.3, inner_steps=3)
    ep = _episode(9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    model.bn.register_forward_hook(lambda *a: calls.append(1))
    fast = learner.adapt(ep.support_x, ep.support_y)
    assert set(fast) == {"head.weight", "head.bias"}
    assert len(calls) == 1  # body features once per task, not once per inner step
    assert not torch.allclose(fast["head.weight"], model.head.weight)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n])
    # Same meta-gradient as MAML restricted to the head (which recomputes the body every step),
    # and the body is meta-learned (non-zero meta-gradient).
    grads = _meta_grads(learner, ep)
    ref = _meta_grads(MAML(model, inner_lr=0.3, inner_steps=3, adapt=["head.*"]), ep)
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k])
    assert grads["model.conv.weight"].abs().max() > 0
    with pytest.raises(ValueError, match="only head"):
        ANIL(model, adapt=["*"])


def test_outer_loss_is_mean_over_tasks_and_evaluate():
    model = _model(4)
    learner = build_algorithm("maml", model, inner_lr=0.3, inner_steps=1, eval_inner_steps=2)
    eps = [_episode(10), _episode(11), _episode(12)]
    loss, metrics = learner.outer_loss(Episode.stack(eps))
    singles = [learner.outer_loss(e) for e in eps]
    torch.testing.assert_close(loss, sum(s[0] for s in singles) / 3)
    assert metrics["accuracy"] == pytest.approx(sum(s[1]["accuracy"] for s in singles) / 3)
    assert metrics["loss"] == pytest.approx(loss.item())
    # meta_backward: same gradient with one task graph alive at a time.
    learner.zero_grad()
    loss.backward()
    g_ref = [p.grad.clone() for p in learner.meta_parameters()]
    learner.zero_grad()
    mb = learner.meta_backward(Episode.stack(eps))
    for p, g in zip(learner.meta_parameters(), g_ref):
        torch.testing.assert_close(p.grad, g)
    assert mb["loss"] == pytest.approx(metrics["loss"])

    ev = learner.evaluate(Episode.stack(eps))
    assert len(ev["accuracies"]) == 3 and len(ev["losses"]) == 3
    assert ev["accuracy"] == pytest.approx(sum(ev["accuracies"]) / 3)
    # evaluate uses eval_inner_steps (2), and with 0 steps it is the un-adapted query loss.
    fast2 = learner.adapt(eps[0].support_x, eps[0].support_y, steps=2)
    l2 = F.cross_entropy(learner(eps[0].query_x, fast2), eps[0].query_y).item()
    assert ev["losses"][0] == pytest.approx(l2)
    ev0 = learner.evaluate(eps[0], inner_steps=0)
    assert ev0["loss"] == pytest.approx(
        F.cross_entropy(model(eps[0].query_x), eps[0].query_y).item()
    )
    # No graph, no gradients from evaluate.
    learner.zero_grad()
    learner.evaluate(eps[0])
    assert all(p.grad is None for p in learner.meta_parameters())


def test_adapt_and_freeze_patterns():
    model = _model(5)
    learner = MAML(model, adapt=["*"], freeze=["conv.*"])
    assert not model.conv.weight.requires_grad
    names = {n for n, _ in learner.named_meta_parameters()}
    assert names == {"model.bn.weight", "model.bn.bias", "model.head.weight", "model.head.bias"}
    ep = _episode(13)
    fast = learner.adapt(ep.support_x, ep.support_y)
    assert "conv.weight" not in fast and "bn.weight" in fast
    with pytest.raises(ValueError, match="matches no parameter"):
        MAML(_model(), adapt=["body.*"])


def test_inner_loss_context_and_preconditioner():
    model = _model(6)
    ep = _episode(14)
    seen = {}

    def loss_with_context(logits, targets, **context):
        seen.update(context)
        return F.cross_entropy(logits, targets) + 0.1 * context["params"]["head.bias"].pow(2).sum()

    learner = MAML(model, inner_lr=0.3, inner_steps=2, inner_loss=loss_with_context)
    fast = learner.adapt(ep.support_x, ep.support_y, query_x=ep.query_x)
    assert seen["step"] == 1 and seen["query_x"] is ep.query_x and seen["learner"] is learner
    plain = MAML(model, inner_lr=0.3, inner_steps=2).adapt(ep.support_x, ep.support_y)
    assert not torch.allclose(fast["head.bias"], plain["head.bias"])

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_s = nn.Parameter(torch.zeros((), dtype=DT))

        def forward(self, grads):
            return {k: torch.exp(self.log_s) * g for k, g in grads.items()}

    pre = Scale()
    learner = MAML(model, inner_lr=0.3, inner_steps=2, preconditioner=pre)
    assert any(p is pre.log_s for p in learner.meta_parameters())
    # Scaling gradients by 1 equals plain MAML; the scale receives a meta-gradient.
    torch.testing.assert_close(
        learner.adapt(ep.support_x, ep.support_y)["head.weight"], plain["head.weight"]
    )
    grads = _meta_grads(learner, ep)
    assert grads["inner_optimizer.preconditioner.log_s"].abs() > 0


def test_factory_and_errors():
    assert available_algorithms() == ["anil", "fomaml", "maml", "metasgd", "npbml", "proto"]
    model = _model()
    assert isinstance(build_algorithm("FOMAML", model), FOMAML)
    assert build_algorithm("meta-sgd", model).inner_lr == 0.4
    with pytest.raises(ValueError, match="unknown algorithm"):
        build_algorithm("reptile", model)
    with pytest.raises(TypeError, match="bad arguments"):
        build_algorithm("maml", model, inner_rate=0.1)
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(model, inner_steps=-1)
    with pytest.raises(TypeError, match="Episode"):
        MAML(model).outer_loss((torch.zeros(1), torch.zeros(1)))
    ep = _episode(0)
    with pytest.raises(ValueError, match="one task"):
        MAML(model).adapt(ep.support_x[None], ep.support_y)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _cluster_task(g: torch.Generator, centers: torch.Tensor) -> Episode:
    """2-way 1-shot: two random clusters of ``centers`` in a random label order."""
    idx = torch.randperm(len(centers), generator=g)[:2]
    sy, qy = torch.arange(2), torch.arange(2).repeat_interleave(5)
    c = centers[idx]
    return Episode(
        c[sy] + 0.3 * torch.randn(2, 8, generator=g),
        sy,
        c[qy] + 0.3 * torch.randn(10, 8, generator=g),
        qy,
        idx,
    )


@pytest.mark.parametrize("name", ["maml", "fomaml", "metasgd", "anil"])
def test_meta_training_improves_adaptation(name):
    # Labels are permuted per task, so only adaptation can solve a task; meta-training must
    # make one inner step effective on held-out tasks (deterministic seeds).
    g = torch.Generator().manual_seed(0)
    centers = 2 * torch.randn(6, 8, generator=g)
    test = Episode.stack([_cluster_task(g, centers) for _ in range(30)])
    torch.manual_seed(0)
    learner = build_algorithm(name, _MLP(), inner_lr=0.5, inner_steps=1)
    before = learner.evaluate(test)["accuracy"]
    opt = torch.optim.Adam(learner.meta_parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        loss, _ = learner.outer_loss(Episode.stack([_cluster_task(g, centers) for _ in range(4)]))
        loss.backward()
        opt.step()
    after = learner.evaluate(test)["accuracy"]
    assert after > before + 0.1, (before, after)
