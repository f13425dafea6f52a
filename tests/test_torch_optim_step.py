"""npbml.inner.TorchOptimStep against the torch.optim optimizers it looks ahead of."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from npbml.inner.torch_optim import TorchOptimStep

OPTIMIZERS = [
    (torch.optim.SGD, {"lr": 0.1}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "maximize": True}),
    (torch.optim.Adam, {"lr": 1e-2}),
    (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-2, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.1}),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS)
def test_look_ahead_is_the_step_torch_optim_then_takes(cls, kwargs):
    """Over six steps with fresh gradients, the look-ahead equals the optimizer's real step, and
    applying the real step after the look-ahead leaves its state exactly as a plain step would."""
    model, twin = _model(), _model()
    opt, twin_opt = cls(model.parameters(), **kwargs), cls(twin.parameters(), **kwargs)
    look = TorchOptimStep(opt, model)
    for _ in range(6):
        grads = {k: torch.randn_like(p) for k, p in model.named_parameters()}
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        ahead = look.step(params, grads)
        for (k, p), q in zip(model.named_parameters(), twin.parameters()):
            p.grad, q.grad = grads[k].clone(), grads[k].clone()
        opt.step()
        twin_opt.step()
        for (k, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(ahead[k], p.detach(), rtol=1e-12, atol=1e-12)
            assert torch.equal(p, q)
            for key, value in twin_opt.state[q].items():
                assert torch.equal(opt.state[p][key], value)


def test_sgd_look_ahead_is_differentiable_in_the_gradient():
    """Heavy-ball SGD with dampening after one step: d theta' / d g = -lr (1 - tau), by finite
    differences through gradcheck (the step is linear in g)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.2)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    look = TorchOptimStep(opt, model)
    params = {k: p.detach() for k, p in model.named_parameters()}
    g = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    torch.autograd.gradcheck(lambda g: look.step(params, {"0.weight": g})["0.weight"], (g,))
    (jac,) = torch.autograd.grad(look.step(params, {"0.weight": g})["0.weight"].sum(), g)
    torch.testing.assert_close(jac, torch.full_like(g, -0.1 * 0.8))


def test_adam_look_ahead_derivative_holds_the_denominator():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    look = TorchOptimStep(opt, model)
    params = {k: p.detach() for k, p in model.named_parameters()}
    g = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    new = look.step(params, {"0.weight": g})["0.weight"]
    (jac,) = torch.autograd.grad(new.sum(), g)
    denom = g.detach().abs() + 1e-8  # sqrt(v_hat) at t = 1 is |g|
    torch.testing.assert_close(jac, -1e-2 * (1 - 0.9) / (1 - 0.9) / denom)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_horizon_is_where_the_optimizer_coasts_to(nesterov):
    """With no further gradient, SGD's real steps converge to the horizon look-ahead."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    grads = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    ahead = TorchOptimStep(opt, model, horizon="momentum").step(params, grads)
    for k, p in model.named_parameters():
        p.grad = grads[k].clone()
    opt.step()
    for _ in range(600):  # 0.9^600 ~ 1e-28: the momentum has run out
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(ahead[k], p.detach(), rtol=1e-10, atol=1e-10)


def test_adam_momentum_horizon_adds_the_decaying_first_moment():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.999))
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    grads = {k: torch.randn_like(p) for k, p in model.named_parameters()}
    one = TorchOptimStep(opt, model).step(params, grads)
    far = TorchOptimStep(opt, model, horizon="momentum").step(params, grads)
    for k in params:  # step 1: m = 0.1 g, m_hat = g, sqrt(v_hat) = |g|; the tail adds 9 m
        g = grads[k]
        torch.testing.assert_close(one[k], params[k] - 1e-2 * g / (g.abs() + 1e-8))
        torch.testing.assert_close(far[k], one[k] - 1e-2 * 9 * 0.1 * g / (g.abs() + 1e-8))


def test_errors_name_the_problem():
    model = _model()
    with pytest.raises(TypeError, match=r"RMSprop: use one of torch\.optim\.SGD"):
        TorchOptimStep(torch.optim.RMSprop(model.parameters()), model)
    with pytest.raises(ValueError, match="horizon must be one of"):
        TorchOptimStep(torch.optim.SGD(model.parameters(), lr=0.1), model, horizon="far")  # type: ignore[arg-type]
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        TorchOptimStep(torch.optim.SGD(other.parameters(), lr=0.1), model)


def test_reads_the_groups_a_state_load_puts_in_place():
    """``Optimizer.load_state_dict`` replaces ``param_groups``: the look-ahead follows."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    look = TorchOptimStep(opt, model)
    saved = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9).state_dict()
    opt.load_state_dict(saved)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}
    grads = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    ahead = look.step(params, grads)
    assert look.learning_rates() == [0.02]
    torch.testing.assert_close(ahead["0.bias"], params["0.bias"] - 0.02)
