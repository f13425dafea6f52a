"""npbml's learned loss, warp layers and FiLM layers inside learn2learn's ``algorithms.MAML``.

The meta-gradients that learn2learn produces (``clone()``, ``adapt(loss)`` with
:class:`~npbml.losses.learned.LearnedLoss` as the inner loss, query cross-entropy ``backward()``)
are checked against a hand-written second-order reference (``torch.autograd.grad`` with
``create_graph=True`` on ``functional_call``) and against npbml's own functional MAML engine.
float64 throughout, so the engines agree to rounding."""

from __future__ import annotations

import learn2learn as l2l
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from npbml.algorithms import MAML as NpbmlMAML
from npbml.algorithms.npbml.layers.film import FiLMBlock
from npbml.algorithms.npbml.layers.warp import WarpLayer
from npbml.interop.l2l_maml import maml_adapt, meta_only_names
from npbml.losses.learned import LearnedLoss

WAYS, SHOTS, QUERIES, C = 3, 2, 2, 4
LR, STEPS = 0.3, 2
TOL = {"rtol": 1e-7, "atol": 1e-10}


class WarpFiLMNet(nn.Module):
    """conv block with FiLM -> FiLM-modulated warp -> conv block -> plain warp -> pooled head.

    Adapted (theta): the two convolutions and the head. Meta-only in NPBML: the warps (omega)
    and the FiLM generators (psi)."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = FiLMBlock(nn.Sequential(nn.Conv2d(1, C, 3, padding=1), nn.ReLU()), 1, C, 0.3)
        self.warp1 = WarpLayer(C, film=True, film_init_std=0.3)
        self.block2 = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.ReLU())
        self.warp2 = WarpLayer(C, film=False)
        self.head = nn.Linear(C, WAYS)
        with torch.no_grad():  # away from the identity, so the warps matter
            for warp in (self.warp1, self.warp2):
                warp.conv.weight.add_(0.2 * torch.randn_like(warp.conv.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.warp1(self.block1(x))
        h = self.warp2(self.block2(h))
        return self.head(h.mean(dim=(2, 3)))


ADAPTED = ["block1.block.0.weight", "block1.block.0.bias", "block2.0.*", "head.*"]


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = WarpFiLMNet().double()
    loss_fn = LearnedLoss(hidden=(8,), init_std=0.5).double()
    sx = torch.randn(WAYS * SHOTS, 1, 5, 5, dtype=torch.float64)
    qx = torch.randn(WAYS * QUERIES, 1, 5, 5, dtype=torch.float64)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS)
    qy = torch.arange(WAYS).repeat_interleave(QUERIES)
    return model, loss_fn, sx, sy, qx, qy


def reference_meta_grads(model, loss_fn, sx, sy, qx, qy, meta_only=(), first_order=False):
    """Hand-written MAML (Finn et al. 2017, eq. 1 unrolled STEPS times, then the query loss):
    gradients w.r.t. the model's parameters and the learned loss's parameters."""
    init = dict(model.named_parameters())
    params = dict(init)
    for _ in range(STEPS):
        inner = loss_fn(functional_call(model, params, (sx,)), sy)
        names = [n for n in params if n not in meta_only]
        grads = torch.autograd.grad(inner, [params[n] for n in names], create_graph=not first_order)
        params = {**params, **{n: params[n] - LR * g for n, g in zip(names, grads)}}
    outer = F.cross_entropy(functional_call(model, params, (qx,)), qy)
    wrt = list(init.values()) + list(loss_fn.parameters())
    # First order: the learned loss never reaches the query loss (None, as in learn2learn).
    return torch.autograd.grad(outer, wrt, allow_unused=first_order)


def l2l_meta_grads(maml, loss_fn, sx, sy, qx, qy, meta_only=None):
    """learn2learn's way: clone, adapt STEPS times on the learned loss, query loss backward."""
    maml.zero_grad()
    loss_fn.zero_grad()
    learner = maml.clone()
    for _ in range(STEPS):
        inner = loss_fn(learner(sx), sy)
        if meta_only is None:
            learner.adapt(inner)
        else:
            maml_adapt(learner, inner, meta_only)
    F.cross_entropy(learner(qx), qy).backward()
    return learner, [p.grad for p in list(maml.parameters()) + list(loss_fn.parameters())]


def assert_all_close(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, **TOL)


def test_l2l_maml_adapts_everything_and_matches_reference(setup) -> None:
    model, loss_fn, sx, sy, qx, qy = setup
    maml = l2l.algorithms.MAML(model, lr=LR, first_order=False)
    learner, grads = l2l_meta_grads(maml, loss_fn, sx, sy, qx, qy)
    assert_all_close(grads, reference_meta_grads(model, loss_fn, sx, sy, qx, qy))
    # Plain adapt() steps every parameter, the warps and FiLM generators included.
    before = dict(model.named_parameters())
    for name, p in learner.module.named_parameters():
        assert not torch.allclose(p, before[name]), name
    # The learned loss is meta-learned through the inner steps: non-zero meta-gradient.
    assert all(g.abs().sum() > 0 for g in grads[-len(list(loss_fn.parameters())) :])


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_only_warps_and_film_match_reference(setup, first_order) -> None:
    model, loss_fn, sx, sy, qx, qy = setup
    meta_only = meta_only_names(model)
    assert meta_only == [
        "block1.generator.linear.weight",
        "block1.generator.linear.bias",
        "warp1.conv.weight",
        "warp1.film.linear.weight",
        "warp1.film.linear.bias",
        "warp2.conv.weight",
    ]
    maml = l2l.algorithms.MAML(model, lr=LR, first_order=first_order)
    learner, grads = l2l_meta_grads(maml, loss_fn, sx, sy, qx, qy, meta_only)
    want = reference_meta_grads(model, loss_fn, sx, sy, qx, qy, meta_only, first_order)
    assert_all_close(grads, want)
    before = dict(model.named_parameters())
    for name, p in learner.module.named_parameters():
        assert torch.equal(p, before[name]) == (name in meta_only), name
    by_name = dict(zip([n for n, _ in model.named_parameters()], grads))
    for name in meta_only:  # meta-only, yet meta-learned
        assert by_name[name].abs().sum() > 0, name
    # The learned loss reaches the query loss only through the (second-order) inner gradients.
    loss_grads = grads[len(by_name) :]
    if first_order:
        assert all(g is None for g in loss_grads)
    else:
        assert all(g.abs().sum() > 0 for g in loss_grads)


def test_meta_only_matches_npbml_functional_engine(setup) -> None:
    """The same meta-learning problem through npbml's MAML (functional, adapt= patterns)."""
    model, loss_fn, sx, sy, qx, qy = setup
    maml = l2l.algorithms.MAML(model, lr=LR)
    _, grads = l2l_meta_grads(maml, loss_fn, sx, sy, qx, qy, meta_only_names(model))
    engine = NpbmlMAML(model, inner_lr=LR, inner_steps=STEPS, adapt=ADAPTED, inner_loss=loss_fn)
    assert sorted(
        set(n for n, _ in model.named_parameters()) - set(engine.adapted_names)
    ) == sorted(meta_only_names(model))
    model.zero_grad()
    loss_fn.zero_grad()
    fast = engine.adapt(sx, sy)
    F.cross_entropy(engine(qx, fast), qy).backward()
    want = [p.grad for p in list(model.parameters()) + list(loss_fn.parameters())]
    assert_all_close(grads, want)


def test_allow_nograd_freezes_instead(setup) -> None:
    """learn2learn's own switch (allow_nograd + requires_grad=False) keeps warps out of the inner
    step but also out of the meta-gradient: frozen, not meta-learned."""
    model, loss_fn, sx, sy, qx, qy = setup
    for name, p in model.named_parameters():
        if name.startswith("warp"):
            p.requires_grad_(False)
    maml = l2l.algorithms.MAML(model, lr=LR, allow_nograd=True)
    learner, _ = l2l_meta_grads(maml, loss_fn, sx, sy, qx, qy)
    before = dict(model.named_parameters())
    for name, p in learner.module.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("warp"), name
        assert (before[name].grad is None) == name.startswith("warp"), name


def test_maml_adapt_errors(setup) -> None:
    model, loss_fn, sx, sy, *_ = setup
    learner = l2l.algorithms.MAML(model, lr=LR).clone()
    with pytest.raises(KeyError, match="not parameters of the wrapped model"):
        maml_adapt(learner, loss_fn(learner(sx), sy), ["module.warp1.conv.weight"])
    with pytest.raises(ValueError, match="nothing left to adapt"):
        names = [n for n, _ in model.named_parameters()]
        maml_adapt(learner, loss_fn(learner(sx), sy), names)
    with pytest.raises(TypeError, match="learn2learn MAML learner"):
        maml_adapt(model, loss_fn(model(sx), sy))
    meta_sgd = l2l.algorithms.MetaSGD(model, lr=LR).clone()
    with pytest.raises(TypeError, match="got MetaSGD"):
        maml_adapt(meta_sgd, loss_fn(meta_sgd(sx), sy), meta_only_names(model))
