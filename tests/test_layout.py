"""Channels-last execution (npbml.layout): the layout really changes, the math does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from npbml.algorithms import ANIL, MAML
from npbml.algorithms.npbml import NPBML
from npbml.algorithms.npbml.layers.relation import RelationNetwork
from npbml.layout import channels_last_params, is_channels_last
from npbml.models import Conv4
from npbml.params import functional_forward
from tasks.episode import Episode

WAYS = 3


def _batch(tasks: int = 2, size: int = 16, dtype: torch.dtype = torch.float64) -> Episode:
    g = torch.Generator().manual_seed(0)
    eps = [
        Episode(
            torch.rand(WAYS, 1, size, size, generator=g, dtype=torch.float64).to(dtype),
            torch.arange(WAYS),
            torch.rand(2 * WAYS, 1, size, size, generator=g, dtype=torch.float64).to(dtype),
            torch.arange(WAYS).repeat(2),
            torch.arange(WAYS),
        )
        for _ in range(tasks)
    ]
    return Episode.stack(eps)


class _OmniglotLike(nn.Module):
    """learn2learn's OmniglotCNN layout: input reshaped by ``view``, a conv body registered
    under two names, BatchNorm tracking running statistics, spatial mean, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Sequential(
            nn.Conv2d(1, 4, 3, stride=2, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
        )
        self.features = nn.Sequential(self.base)
        self.head = nn.Linear(4, WAYS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 16, 16)
        return self.head(self.features(x).mean(dim=(2, 3)))


class _ViewFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 16 * 16, WAYS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.head(h.view(h.shape[0], -1))  # NCHW-only


def _conv4(variant: str = "maxpool") -> Conv4:
    torch.manual_seed(0)
    return Conv4(hidden=4, image_size=16, num_classes=WAYS, variant=variant)


def _grads(learner: nn.Module, batch: Episode, channels_last: bool) -> list[torch.Tensor]:
    learner.channels_last = channels_last
    learner.zero_grad(set_to_none=True)
    learner.meta_backward(batch)
    return [p.grad.clone() for p in learner.meta_parameters()]


def test_channels_last_params_converts_every_conv_weight_differentiably():
    model = _conv4().double()
    own = dict(model.named_parameters())
    name = next(n for n, p in own.items() if p.dim() == 4)
    fast = own[name] * 2.0  # an adapted (non-leaf) weight wins over the module's own
    bias_name = next(n for n, p in own.items() if p.dim() == 1)
    given = {name: fast, bias_name: own[bias_name]}
    out = channels_last_params(model, given)
    four_d = [n for n, p in own.items() if p.dim() == 4]
    assert set(four_d) <= set(out)
    for n in four_d:
        assert is_channels_last(out[n]), n
        ref = fast if n == name else own[n]
        assert torch.equal(out[n], ref)
    assert out[bias_name] is own[bias_name]  # non-4-D entries are passed through untouched
    # 1-channel weights: the NCHW tensor also passes is_contiguous(channels_last); the copy differs.
    first = own["blocks.0.conv.weight"]
    assert first.shape[1] == 1 and not is_channels_last(first)
    assert out["blocks.0.conv.weight"].stride(1) == 1
    # Differentiable: the gradient reaches the fast weight (d sum(2 * w_cl) / d fast = 2).
    (g,) = torch.autograd.grad((2 * out[name]).sum(), fast)
    torch.testing.assert_close(g, torch.full_like(fast, 2.0))


def test_learner_forward_really_runs_channels_last():
    model = _OmniglotLike().double()
    layouts: list[bool] = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: layouts.append(is_channels_last(out)))
    learner = MAML(model, inner_lr=0.2)
    x = _batch(1).query_x[0]
    ref = learner(x)
    assert layouts == [False, False]
    layouts.clear()
    learner.channels_last = True
    out = learner(x)
    assert layouts == [True, True]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: MAML(_conv4(), inner_lr=0.3, inner_steps=2), id="maml-maxpool"),
        pytest.param(
            lambda: MAML(_conv4("strided"), inner_lr=0.3, first_order=True), id="fomaml-strided"
        ),
        pytest.param(lambda: MAML(_OmniglotLike(), inner_lr=0.3), id="maml-shared-module"),
        pytest.param(lambda: ANIL(_conv4(), inner_lr=0.3, inner_steps=2), id="anil"),
        pytest.param(
            lambda: NPBML(
                _conv4(),
                inner_lr=0.1,
                inner_steps=2,
                relation_net=RelationNetwork(channels=4, in_channels=1),
            ),
            id="npbml",
        ),
    ],
)
def test_meta_gradient_equals_nchw_in_float64(make):
    """Same math: in float64 the channels-last meta-gradient equals the NCHW one to rounding."""
    learner = make().double()
    batch = _batch()
    nchw = _grads(learner, batch, channels_last=False)
    nhwc = _grads(learner, batch, channels_last=True)
    assert any(float(g.abs().max()) > 0 for g in nchw)
    for a, b in zip(nhwc, nchw):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    learner.channels_last = True
    ev_cl = learner.evaluate(batch)
    learner.channels_last = False
    ev = learner.evaluate(batch)
    assert ev_cl["accuracies"] == ev["accuracies"]


def test_float32_channels_last_stays_close_to_float64():
    """float32 rounding differs (CPU BatchNorm sums NHWC in another order), but stays small."""
    torch.manual_seed(0)
    model = Conv4(hidden=8, image_size=16, num_classes=WAYS)
    learner = MAML(model, inner_lr=0.3)
    ref = _grads(learner.double(), _batch(), channels_last=False)
    learner.float()
    got = _grads(learner, _batch(dtype=torch.float32), channels_last=True)
    # Per tensor, relative to its norm; conv biases before BatchNorm have a zero meta-gradient,
    # so their float32 rounding is compared with the gradient's overall scale instead.
    scale = max(float(b.norm()) for b in ref)
    for a, b in zip(got, ref):
        assert float((a.double() - b).norm()) <= 1e-4 * max(float(b.norm()), 1e-2 * scale)


def test_hand_written_reference_with_channels_last():
    """One second-order MAML step written out with functional_forward on NCHW tensors."""
    model = _OmniglotLike().double()
    learner = MAML(model, inner_lr=0.25, channels_last=True)
    batch = _batch(1)
    ep = batch.unstack()[0]
    got = _grads(learner, batch, channels_last=True)
    params = dict(model.named_parameters())
    loss = F.cross_entropy(functional_forward(model, params, ep.support_x), ep.support_y)
    gs = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
    fast = {n: p - 0.25 * g for (n, p), g in zip(params.items(), gs)}
    q = F.cross_entropy(functional_forward(model, fast, ep.query_x), ep.query_y)
    ref = torch.autograd.grad(q, tuple(params.values()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_view_on_nhwc_activation_gets_an_error_naming_the_fix():
    learner = MAML(_ViewFlatten(), inner_lr=0.1, channels_last=True)
    with pytest.raises(RuntimeError, match="reshape"):
        learner(torch.rand(2, 1, 16, 16))
    learner.channels_last = False
    assert learner(torch.rand(2, 1, 16, 16)).shape == (2, WAYS)


def test_config_key_turns_it_on():
    from tiny_run import tiny_run

    from npbml.config import config_from_dict
    from npbml.train import build_learner, infer_model_kwargs, make_tasksets

    cfg = config_from_dict(tiny_run({"channels_last": True, "meta_steps": 1}))
    learner = build_learner(cfg, infer_model_kwargs(cfg, make_tasksets(cfg)))
    assert learner.channels_last is True
    cfg = config_from_dict(tiny_run({"meta_steps": 1}))
    assert build_learner(cfg, infer_model_kwargs(cfg, make_tasksets(cfg))).channels_last is False
