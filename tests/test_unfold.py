"""The convolution from once-unfolded patches (npbml.algorithms.npbml.layers.unfold, issue 13)
against F.conv2d, and NPBML with it against NPBML without it, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from npbml.algorithms.npbml import NPBML
from npbml.algorithms.npbml.layers.film import (
    FiLMGenerator,
    film_block_forward,
    unfoldable_conv,
    unfolded_block_forward,
)
from npbml.algorithms.npbml.layers.relation import RelationNetwork
from npbml.algorithms.npbml.layers.unfold import (
    Unfolded,
    can_unfold,
    patch_weight,
    unfold_input,
    unfolded_conv,
)
from npbml.models import Conv4, ConvBlock, ResidualBlock
from tasks.episode import Episode

TOL = 1e-10
WAYS = 5

GEOMETRIES = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), bias=False),
    dict(kernel_size=3, stride=1, padding=2, dilation=2),
    dict(kernel_size=2, stride=3, padding=0),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_unfolded_conv_equals_conv2d(geom):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **geom).double()
    x = torch.randn(5, 3, 6, 7, dtype=torch.float64)
    out = unfolded_conv(conv, unfold_input(conv, x))
    ref = conv(x)
    assert out.shape == ref.shape
    assert float((out - ref).detach().abs().max()) <= TOL


def test_unfolded_conv_gradients_and_per_task_weights_equal_conv2d():
    """Under vmap with per-task weights (the batched inner loop), the weight gradient and the
    weight's second derivative through it equal F.conv2d's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False).double()
    xs = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64)
    ws = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    inp = vmap(lambda x: unfold_input(conv, x))(xs)

    def via_patches(w: torch.Tensor, u: Unfolded) -> torch.Tensor:
        out = F.linear(u.patches, patch_weight(w)).view(u.x.shape[0], 2, 2, -1).permute(0, 3, 1, 2)
        return out.tanh().sum()

    def via_conv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, stride=2, padding=1).tanh().sum()

    g_p = vmap(grad(via_patches))(ws, inp)
    g_c = vmap(grad(via_conv))(ws, xs)
    assert float((g_p - g_c).abs().max()) <= TOL
    (h_p,) = torch.autograd.grad(g_p.square().sum(), ws)
    (h_c,) = torch.autograd.grad(g_c.square().sum(), ws)
    assert float((h_p - h_c).abs().max()) <= TOL


def test_what_cannot_be_unfolded_is_refused():
    assert not can_unfold(nn.Conv2d(2, 2, 3, groups=2))
    assert not can_unfold(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    assert not can_unfold(nn.Conv2d(2, 2, 3, padding="same"))
    assert not can_unfold(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="groups=1 and zero padding"):
        unfold_input(nn.Conv2d(2, 2, 3, groups=2), torch.zeros(1, 2, 4, 4))  # type: ignore[arg-type]
    assert unfoldable_conv(ResidualBlock(2, 3)) is None
    with pytest.raises(TypeError, match="cannot run from an Unfolded input"):
        unfolded_block_forward(ResidualBlock(2, 3), Unfolded(*torch.zeros(3, 1)))


@pytest.mark.parametrize("with_film", [False, True])
def test_conv_block_from_patches_equals_the_block(with_film):
    torch.manual_seed(0)
    block = ConvBlock(3, 4, stride=2, pool=False).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    conv = unfoldable_conv(block)
    assert conv is block.conv
    inp = unfold_input(conv, x)
    if with_film:
        gen = FiLMGenerator(3, 4, init_std=0.5).double()
        out, ref = film_block_forward(block, gen, inp), film_block_forward(block, gen, x)
    else:
        out, ref = unfolded_block_forward(block, inp), block(x)
    assert float((out - ref).detach().abs().max()) <= TOL


def _task(seed: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    sy, qy = torch.arange(WAYS), torch.arange(WAYS).repeat(3)
    return Episode(
        torch.rand(WAYS, 1, 16, 16, generator=g, dtype=torch.float64),
        sy,
        torch.rand(len(qy), 1, 16, 16, generator=g, dtype=torch.float64),
        qy,
        torch.arange(WAYS),
    )


def _learner(unfold: bool, **kw) -> NPBML:
    torch.manual_seed(0)
    model = Conv4(hidden=4, image_size=16, num_classes=WAYS, variant="strided")
    torch.manual_seed(1)
    rel = RelationNetwork(channels=4, in_channels=1)
    learner = NPBML(
        model, inner_steps=3, inner_lr=0.1, relation_net=rel, loss_init_std=0.1,
        film_init_std=0.1, episode_cache=0, **kw,
    ).double()  # fmt: skip
    if not unfold:
        learner.unfold_max_growth = 0.0
    return learner


@pytest.mark.parametrize(
    "kw", [{}, {"batch_tasks": False}, {"head_init": "proto"}, {"ablation": "init"}]
)
def test_npbml_with_unfolded_input_equals_npbml_without(kw):
    """Meta-gradients and test predictions of Conv4 strided (a 3x3 stride-2 adapted conv: the
    input is unfolded) equal those of the same learner running the convolution, to 1e-10."""
    on, off = _learner(True, **kw), _learner(False, **kw)
    task = _task(0)
    assert isinstance(
        on.inner_inputs(task.support_x, "second", task.support_y, task.query_x)[0], Unfolded
    )
    assert isinstance(
        off.inner_inputs(task.support_x, "second", task.support_y, task.query_x)[0], torch.Tensor
    )
    batch = Episode.stack([_task(i) for i in range(3)])
    grads = []
    for learner in (on, off):
        learner.zero_grad(set_to_none=True)
        learner.meta_backward(batch, workers=1)
        grads.append([p.grad for p in learner.meta_parameters()])
    reached = 0
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert float((a - b).abs().max()) <= TOL
            reached += bool(a.abs().sum() > 0)
    assert reached >= 3
    m_on, m_off = on.evaluate(batch), off.evaluate(batch)
    assert max(abs(a - b) for a, b in zip(m_on["losses"], m_off["losses"])) <= TOL
    assert m_on["accuracies"] == m_off["accuracies"]


def test_unfolding_is_skipped_where_it_does_not_pay():
    """Stride 1 (the patches 9x the activation, slower in docs/benchmarks.md), channels-last."""
    task = _task(0)
    pooled = NPBML(Conv4(hidden=4, image_size=16, num_classes=WAYS), loss_terms=("ce",))
    assert isinstance(pooled.inner_inputs(task.support_x.float(), "none")[0], torch.Tensor)
    strided = Conv4(hidden=4, image_size=16, num_classes=WAYS, variant="strided")
    cl = NPBML(strided, loss_terms=("ce",))
    cl.channels_last = True
    assert isinstance(cl.inner_inputs(task.support_x.float(), "none")[0], torch.Tensor)
