import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from npbml.algorithms.npbml.layers.film import (
    FiLMBlock,
    FiLMGenerator,
    FiLMLinear,
    block_channels,
    film,
    global_context,
)
from npbml.models import ConvBlock, ResidualBlock


def _set_generator(gen: FiLMGenerator, weight: torch.Tensor, bias: torch.Tensor) -> None:
    with torch.no_grad():
        gen.linear.weight.copy_(weight)
        gen.linear.bias.copy_(bias)


def test_film_broadcasts_per_sample_over_space():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 4, 5)
    gamma, beta = torch.randn(2, 3), torch.randn(2, 3)
    out = film(h, gamma, beta)
    for b in range(2):
        for c in range(3):
            torch.testing.assert_close(out[b, c], (1 + gamma[b, c]) * h[b, c] + beta[b, c])
    with pytest.raises(ValueError, match="do not fit"):
        film(h, torch.randn(2, 4), torch.randn(2, 4))


def test_generator_identity_at_zero_init_and_near_identity_by_default():
    torch.manual_seed(0)
    h, ctx = torch.randn(4, 6, 3, 3), torch.randn(4, 5)
    assert torch.equal(FiLMGenerator(5, 6, init_std=0.0).modulate(h, ctx), h)
    gen = FiLMGenerator(5, 6)
    assert gen.linear.weight.std().item() == pytest.approx(0.01, rel=0.5)
    assert (gen.modulate(h, ctx) - h).abs().max() < 0.2
    with pytest.raises(ValueError, match="expects a context with 5"):
        gen(torch.randn(4, 3))


def test_filmblock_on_convblock_acts_after_bn_before_relu():
    torch.manual_seed(0)
    block = ConvBlock(2, 3)
    fb = FiLMBlock(block)
    assert (fb.generator.in_features, fb.generator.num_features) == (2, 3)
    # Nonzero weights so the result depends on the pooled input; a large negative beta would be
    # clipped by the ReLU only if FiLM acted before it.
    w = torch.randn(6, 2)
    b = torch.tensor([0.5, -0.2, 0.1, -3.0, 1.0, 0.3])
    _set_generator(fb.generator, w, b)
    x = torch.randn(4, 2, 8, 8)
    ctx = x.mean(dim=(2, 3))
    gb = ctx @ w.T + b
    gamma, beta = gb[:, :3], gb[:, 3:]
    h = block.bn(block.conv(x))
    expected = F.max_pool2d(torch.relu((1 + gamma[..., None, None]) * h + beta[..., None, None]), 2)
    torch.testing.assert_close(fb(x), expected)


def test_filmblock_on_sequential_and_residual_block():
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2)
    )
    fb = FiLMBlock(seq)
    _set_generator(fb.generator, torch.zeros(6, 2), torch.tensor([0.0, 0.0, 0.0, -5.0, -5.0, -5.0]))
    # beta = -5 before the ReLU kills every activation (BN output is ~N(0, 1)).
    assert torch.equal(fb(torch.randn(3, 2, 6, 6)), torch.zeros(3, 3, 3, 3))
    res = ResidualBlock(2, 3)
    assert block_channels(res) == (2, 3)
    fr = FiLMBlock(res, init_std=0.0)
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(fr(x), res(x))


def test_filmblock_functional_call_reaches_block_and_generator():
    torch.manual_seed(0)
    fb = FiLMBlock(ConvBlock(1, 2))
    params = {n: p.detach().clone() for n, p in fb.named_parameters()}
    params["block.conv.weight"] = params["block.conv.weight"] * 2
    params["generator.linear.bias"] = torch.ones(4)
    x = torch.randn(3, 1, 6, 6)
    out = functional_call(fb, params, (x,))
    h = fb.block.bn(F.conv2d(x, 2 * fb.block.conv.weight, fb.block.conv.bias, padding=1))
    ctx = global_context(x)
    gb = ctx @ fb.generator.linear.weight.T + 1.0
    h = (1 + gb[:, :2, None, None]) * h + gb[:, 2:, None, None]
    torch.testing.assert_close(out, F.max_pool2d(torch.relu(h), 2))


def test_filmlinear_is_self_modulated():
    torch.manual_seed(0)
    layer = FiLMLinear(3, 2, init_std=0.5)
    x = torch.randn(5, 3)
    gb = x @ layer.generator.linear.weight.T + layer.generator.linear.bias
    h = x @ layer.linear.weight.T + layer.linear.bias
    torch.testing.assert_close(layer(x), (1 + gb[:, :2]) * h + gb[:, 2:])
    plain = FiLMLinear(3, 2, film=False)
    assert plain.generator is None
    torch.testing.assert_close(plain(x), plain.linear(x))
