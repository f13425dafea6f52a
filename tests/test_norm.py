"""npbml.algorithms.npbml.layers.norm.batch_norm against PyTorch's BatchNorm and finite differences
(float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from npbml.algorithms.npbml.layers.norm import batch_norm, spatial_mean


def _bn(c: int, dims: int = 2, affine: bool = True) -> nn.Module:
    cls = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    torch.manual_seed(0)
    bn = cls(c, track_running_stats=False, affine=affine).double()
    if affine:
        with torch.no_grad():
            bn.weight.normal_()
            bn.bias.normal_()
    return bn


def _channels_inner(z: torch.Tensor) -> torch.Tensor:
    """``z`` with the channels innermost in memory (the layout batch_norm computes itself)."""
    return z.movedim(1, -1).contiguous().movedim(-1, 1) if z.dim() > 2 else z


def _reference(bn: nn.Module, z: torch.Tensor) -> torch.Tensor:
    # the textbook formula (Ioffe & Szegedy, Algorithm 1), independent of both implementations
    dims = [0, *range(2, z.dim())]
    mean = z.mean(dims, keepdim=True)
    var = ((z - mean) ** 2).mean(dims, keepdim=True)
    y = (z - mean) / torch.sqrt(var + bn.eps)
    if bn.weight is None:
        return y
    shape = (1, -1) + (1,) * (z.dim() - 2)
    return y * bn.weight.view(shape) + bn.bias.view(shape)


@pytest.mark.parametrize(
    "shape,dims,affine",
    [
        ((6, 4, 3, 3), 2, True),
        ((5, 3, 1, 1), 2, True),
        ((7, 5), 1, True),
        ((4, 3, 2), 1, True),
        ((3, 2, 2, 3, 2), 3, True),
        ((6, 4, 2, 2), 2, False),
    ],
)
@pytest.mark.parametrize("channels_inner", [True, False])
def test_values_and_gradients_match_pytorch(shape, dims, affine, channels_inner, monkeypatch):
    bn = _bn(shape[1], dims, affine)
    z = torch.randn(*shape, dtype=torch.float64)
    z = (_channels_inner(z) if channels_inner else z).requires_grad_()
    theirs = bn(z)
    if z.dim() == 2 or z.stride(1) == 1:  # computed by batch_norm itself, not PyTorch's forward
        monkeypatch.setattr(bn, "forward", None)
    ours = batch_norm(bn, z)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, _reference(bn, z), rtol=0, atol=1e-12)
    w = torch.randn_like(ours)
    args = [z, *bn.parameters()]
    g1 = torch.autograd.grad((ours * w).sum(), args)
    g2 = torch.autograd.grad((theirs * w).sum(), args)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_first_and_second_derivatives_by_finite_differences():
    bn = _bn(3)
    z = _channels_inner(torch.randn(4, 3, 2, 2, dtype=torch.float64)).requires_grad_()

    def f(z, w, b):
        return functional_call(bn, {"weight": w, "bias": b}, (z,))

    def g(z, w, b):
        return batch_norm(_Swapped(bn, w, b), z)

    assert torch.autograd.gradcheck(g, (z, bn.weight, bn.bias))
    assert torch.autograd.gradgradcheck(g, (z, bn.weight, bn.bias))
    torch.testing.assert_close(g(z, bn.weight, bn.bias), f(z, bn.weight, bn.bias))


class _Swapped(nn.BatchNorm2d):
    """A BatchNorm2d whose affine parameters are given tensors (as functional_call does)."""

    def __init__(self, like: nn.Module, w: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__(like.num_features, eps=like.eps, track_running_stats=False)
        del self.weight, self.bias
        self.weight, self.bias = w, b


def test_under_vmap_keeps_each_task_apart():
    # per task: the statistics of that task's batch only; the vmapped meta-gradient (grad of a
    # per-task gradient) equals the task-by-task one
    bn = _bn(4)
    zs = torch.randn(3, 5, 2, 2, 4, dtype=torch.float64).permute(0, 1, 4, 2, 3)  # channels inner
    ws = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def loss(w, z, fn):
        y = fn(_Swapped(bn, w, bn.bias), z)
        return (y.sin() * y).sum()

    def inner(w, z, fn):
        return grad(loss)(w, z, fn).pow(2).sum()

    batched = vmap(lambda w, z: inner(w, z, batch_norm))(ws, zs)
    looped = torch.stack([inner(w, z, lambda m, x: m(x)) for w, z in zip(ws, zs)])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-10)
    g1 = torch.autograd.grad(batched.sum(), ws)[0]
    g2 = torch.autograd.grad(looped.sum(), ws)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-10)


def test_running_statistics_and_errors_go_to_pytorch():
    tracked = nn.BatchNorm2d(3).double()
    z = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    batch_norm(tracked, z)
    assert tracked.num_batches_tracked.item() == 1  # PyTorch's forward ran
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(_bn(3), torch.randn(1, 3, 1, 1, dtype=torch.float64))
    with pytest.raises((ValueError, RuntimeError)):
        batch_norm(_bn(3), torch.randn(4, 5, 2, 2, dtype=torch.float64))
    ln = nn.LayerNorm(3).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(batch_norm(ln, x), F.layer_norm(x, (3,), ln.weight, ln.bias))


@pytest.mark.parametrize("channels_inner", [False, True])
def test_spatial_mean_values_and_gradient_layout(channels_inner):
    # the mean over space as x.mean((2, 3)); for a channels-innermost x the gradient comes back
    # channels-innermost too (the point of spatial_mean), for an NCHW x it stays NCHW
    x = torch.randn(3, 2, 2, 5, dtype=torch.float64).permute(0, 3, 1, 2)
    if not channels_inner:
        x = x.contiguous()
    x.requires_grad_(True)
    out = spatial_mean(x)
    torch.testing.assert_close(out, x.mean(dim=(2, 3)), rtol=0, atol=1e-15)
    (g,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), x)
    assert g.permute(0, 2, 3, 1).is_contiguous() == channels_inner
    assert g.is_contiguous() == (not channels_inner)
    flat = torch.randn(4, 5)
    assert spatial_mean(flat) is flat
    assert spatial_mean(torch.randn(2, 3, 4)).shape == (2, 3)
