"""Differentiable inner optimizers, learned rates and the inner-loss protocol (npbml.inner)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from npbml.inner import InnerSGD, PerParameterLR, accepts_context, call_inner_loss


@pytest.fixture(autouse=True)
def _float64():
    """Every test here runs in float64 (restored afterwards, so other test files are unaffected)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """A smooth non-quadratic objective coupling the tensors."""
    a, b = params["a"], params["b"]
    return ((a @ b - 1.0) ** 2).sum() + 0.1 * (a**4).sum() + torch.sin(b).sum()


def _init() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "b": torch.randn(4, 2, generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True),
        dict(momentum=0.9, nesterov=True, weight_decay=5e-4),
        dict(weight_decay=0.1),
        dict(momentum=0.5, dampening=0.3, weight_decay=0.01),
    ],
)
def test_matches_torch_sgd_trajectory(kw):
    lr, steps = 0.01, 6
    ref = {k: nn.Parameter(v.clone()) for k, v in _init().items()}
    torch_opt = torch.optim.SGD(list(ref.values()), lr=lr, **kw)
    opt = InnerSGD(lr=lr, **kw)
    params = _init()
    state = opt.init(params)
    for _ in range(steps):
        torch_opt.zero_grad()
        _loss(ref).backward()
        torch_opt.step()
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        grads = dict(zip(p, torch.autograd.grad(_loss(p), list(p.values()))))
        params, state = opt.step(params, grads, state)
        for k in params:
            torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-12, atol=1e-12)


def _unrolled_quadratic(lr, h, theta0, steps, momentum=0.0, nesterov=False):
    """theta_J of SGD on L(theta) = 0.5 * sum(h * theta^2), differentiable w.r.t. lr."""
    opt = InnerSGD(lr=lr, momentum=momentum, nesterov=nesterov)
    params = {"t": theta0}
    state = opt.init(params)
    for _ in range(steps):
        loss = 0.5 * (h * params["t"] ** 2).sum()
        (g,) = torch.autograd.grad(loss, [params["t"]], create_graph=True)
        params, state = opt.step(params, {"t": g}, state)
    return params["t"]


def test_gradient_through_unroll_matches_closed_form():
    # theta_J = (1 - lr h)^J theta_0, so L(theta_J) = 0.5 h (1 - lr h)^{2J} theta_0^2 and
    # dL/dlr = -J h^2 (1 - lr h)^{2J-1} theta_0^2 (summed over coordinates).
    h = torch.tensor([0.5, 1.0, 2.0])
    theta0 = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    lr0, steps = 0.1, 4
    lr = torch.tensor(lr0, requires_grad=True)
    t = _unrolled_quadratic(lr, h, theta0, steps)
    meta = 0.5 * (h * t**2).sum()
    d_lr, d_theta = torch.autograd.grad(meta, [lr, theta0])
    expected = (-steps * h**2 * (1 - lr0 * h) ** (2 * steps - 1) * theta0.detach() ** 2).sum()
    torch.testing.assert_close(d_lr, expected)
    torch.testing.assert_close(d_theta, h * (1 - lr0 * h) ** (2 * steps) * theta0.detach())


@pytest.mark.parametrize("nesterov", [False, True])
def test_gradient_through_momentum_unroll_matches_finite_differences(nesterov):
    h = torch.tensor([0.5, 1.0, 2.0])
    theta0 = torch.tensor([1.0, -2.0, 0.5])

    def meta(lr: torch.Tensor) -> torch.Tensor:
        t = _unrolled_quadratic(lr, h, theta0.clone().requires_grad_(), 5, 0.9, nesterov)
        return 0.5 * (h * t**2).sum()

    lr = torch.tensor(0.05, requires_grad=True)
    (d_lr,) = torch.autograd.grad(meta(lr), [lr])
    eps = 1e-6
    fd = (meta(torch.tensor(0.05 + eps)) - meta(torch.tensor(0.05 - eps))) / (2 * eps)
    torch.testing.assert_close(d_lr, fd.detach(), rtol=1e-6, atol=1e-8)


def test_per_parameter_lr():
    params = _init()
    lrs = PerParameterLR(params, init=0.3)
    rates = lrs()
    assert list(rates) == ["a", "b"]
    assert all(rates[k].shape == params[k].shape for k in params)
    assert all(torch.all(r == 0.3) for r in rates.values())
    assert len(list(lrs.parameters())) == 2
    opt = InnerSGD(lr=lrs)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in lrs.parameters()}
    with torch.no_grad():
        lrs.rates["a"].mul_(torch.rand_like(lrs.rates["a"]))
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    new, _ = opt.step(params, grads)
    for k in params:
        torch.testing.assert_close(new[k], params[k] - lrs()[k] * grads[k])
    # Dotted names (module parameter names) are supported.
    dotted = PerParameterLR({"blocks.0.conv.weight": torch.zeros(2, 3)})
    assert list(dotted()) == ["blocks.0.conv.weight"]


def test_mapping_and_tensor_lr():
    params, grads = _init(), {k: torch.ones_like(v) for k, v in _init().items()}
    new, _ = InnerSGD(lr={"a": torch.tensor(0.5), "b": torch.tensor(2.0)}).step(params, grads)
    torch.testing.assert_close(new["a"], params["a"] - 0.5)
    torch.testing.assert_close(new["b"], params["b"] - 2.0)
    learned = nn.Parameter(torch.tensor(0.1))
    opt = InnerSGD(lr=learned)
    assert list(opt.parameters()) == [learned]
    new, _ = opt.step(params, grads)
    new["a"].sum().backward()
    torch.testing.assert_close(learned.grad, torch.tensor(-12.0))


def test_preconditioner_hook_applied_before_update():
    params = _init()
    grads = {k: torch.randn_like(v) for k, v in params.items()}

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.tensor(3.0))

        def forward(self, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: self.s * v for k, v in g.items()}

    pre = Scale()
    opt = InnerSGD(lr=0.1, weight_decay=0.5, preconditioner=pre)
    assert list(opt.parameters()) == [pre.s]  # a module preconditioner's params are meta-params
    new, _ = opt.step(params, grads)
    for k in params:  # P acts on the loss gradient; weight decay is added after it
        torch.testing.assert_close(new[k], params[k] - 0.1 * (3.0 * grads[k] + 0.5 * params[k]))
    sum(v.sum() for v in new.values()).backward()
    assert pre.s.grad is not None and pre.s.grad.abs() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="Nesterov"):
        InnerSGD(nesterov=True)
    with pytest.raises(ValueError, match=">= 0"):
        InnerSGD(lr=-1.0)
    with pytest.raises(TypeError, match="lr must be"):
        InnerSGD(lr="fast")
    with pytest.raises(KeyError, match="same names"):
        InnerSGD().step({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match="at least one"):
        PerParameterLR({})


def test_inner_loss_protocol():
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    ctx = {"params": {}, "step": 2, "support_x": None, "query_x": torch.ones(1), "learner": None}

    def plain(logits, targets):
        return F.cross_entropy(logits, targets)

    def with_kwargs(logits, targets, **context):
        return F.cross_entropy(logits, targets) + context["step"]

    def named(logits, targets, *, query_x=None):
        return F.cross_entropy(logits, targets) + query_x.sum()

    assert accepts_context(plain) == ()
    assert accepts_context(F.cross_entropy) == ()  # its keyword parameters are not context keys
    assert accepts_context(with_kwargs) is True
    assert accepts_context(named) == ("query_x",)
    base = F.cross_entropy(logits, y)
    for fn, extra in ((plain, 0.0), (with_kwargs, 2.0), (named, 1.0)):
        out = call_inner_loss(fn, logits, y, ctx, accepts_context(fn))
        torch.testing.assert_close(out, base + extra)
    with pytest.raises(ValueError, match="scalar"):
        call_inner_loss(lambda a, b: F.cross_entropy(a, b, reduction="none"), logits, y, ctx, ())
