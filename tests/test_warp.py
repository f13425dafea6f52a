import pytest
import torch
import torch.nn.functional as F

from npbml.algorithms.npbml import NPBML
from npbml.algorithms.npbml.layers.warp import WarpLayer, dense_conv_matrix, warp_conv
from npbml.models import Conv4


def test_dirac_init_is_identity():
    torch.manual_seed(0)
    h = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(WarpLayer(4, film=False)(h), h, rtol=0, atol=1e-6)
    torch.testing.assert_close(WarpLayer(4, film_init_std=0.0)(h), h, rtol=0, atol=1e-6)
    assert WarpLayer(4).conv.bias is None
    with pytest.raises(ValueError, match=r"expects activations \[B, 4"):
        WarpLayer(4)(torch.randn(3, 5, 2, 2))


def test_warp_preconditions_the_layer_before_by_omega_omega_t():
    # Task layer h = W x (1x1 conv on a 1x1 map), warp z = Omega h (3x3 conv: on a 1x1 map only
    # the centre tap acts), loss L(z) = <c, z>. One SGD step on W must move z by
    # -alpha * Omega Omega^T dL/dz * |x|^2 (module docstring of npbml.algorithms.npbml.layers.warp).
    torch.manual_seed(0)
    cin, c, alpha = 3, 4, 0.1
    warp = WarpLayer(c, film=False)
    with torch.no_grad():
        warp.conv.weight.add_(0.3 * torch.randn_like(warp.conv.weight))
    omega = warp.conv.weight[:, :, 1, 1].detach()
    x = torch.randn(1, cin, 1, 1)
    w = torch.randn(c, cin, 1, 1, requires_grad=True)
    cvec = torch.randn(c)

    def z_of(weight):
        return warp(F.conv2d(x, weight)).reshape(c)

    (g,) = torch.autograd.grad((cvec * z_of(w)).sum(), w)
    with torch.no_grad():
        dz = z_of(w - alpha * g) - z_of(w)
    expected = -alpha * (omega @ omega.T @ cvec) * x.pow(2).sum()
    torch.testing.assert_close(dz, expected, rtol=1e-4, atol=1e-5)


def _episode(seed=0):
    g = torch.Generator().manual_seed(seed)
    from tasks.episode import Episode

    return Episode(
        torch.rand(5, 1, 16, 16, generator=g),
        torch.arange(5),
        torch.rand(10, 1, 16, 16, generator=g),
        torch.arange(5).repeat(2),
        torch.arange(5),
    )


@pytest.mark.parametrize("film", [False, True])
def test_npbml_with_dirac_warp_equals_sgd_without_warp(film):
    ep = _episode()
    torch.manual_seed(0)
    model = Conv4(hidden=4, image_size=16)
    common = dict(
        loss_terms=("ce",), use_film=film, film_init_std=0.0, inner_steps=3, inner_lr=0.5,
        warp_bn=False,  # the reference's conv -> BN -> FiLM warp is not an identity at init
    )
    with_warp = NPBML(model, use_warp=True, **common)
    without = NPBML(model, use_warp=False, **common)
    assert any(n.startswith("warps.") for n, _ in with_warp.network.named_parameters())
    assert not any(n.startswith("warps.") for n in with_warp.adapted_names)
    a = with_warp.adapt_task(ep)
    b = without.adapt_task(ep)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)


def test_perturbed_warp_changes_the_update():
    # Guards the test above against a warp that is silently not in the forward pass.
    ep = _episode()
    torch.manual_seed(0)
    model = Conv4(hidden=4, image_size=16)
    common = dict(loss_terms=("ce",), use_film=False, inner_steps=2, inner_lr=0.5, warp_bn=False)
    with_warp = NPBML(model, use_warp=True, **common)
    without = NPBML(model, use_warp=False, **common)
    with torch.no_grad():
        with_warp.network.warps["3"].conv.weight.mul_(2.0)
    a, b = with_warp.adapt_task(ep), without.adapt_task(ep)
    assert not torch.allclose(a["blocks.3.conv.weight"], b["blocks.3.conv.weight"])


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (2, 1), (3, 3), (4, 5)])
def test_warp_conv_equals_conv2d_with_gradients(size):
    """The dense-matrix path on maps smaller than the kernel (and the plain path above it) against
    F.conv2d: values, the input and weight gradients, and the weight's second derivative."""
    torch.manual_seed(0)
    h = torch.randn(3, 4, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    out, ref = warp_conv(h, w), F.conv2d(h, w, padding=1)
    assert out.shape == ref.shape
    assert float((out - ref).detach().abs().max()) <= 1e-12
    g_out = torch.autograd.grad(out.tanh().sum(), (h, w), create_graph=True)
    g_ref = torch.autograd.grad(ref.tanh().sum(), (h, w), create_graph=True)
    for a, b in zip(g_out, g_ref):
        assert float((a - b).detach().abs().max()) <= 1e-12
    (gg_out,) = torch.autograd.grad(g_out[0].square().sum(), w)
    (gg_ref,) = torch.autograd.grad(g_ref[0].square().sum(), w)
    assert float((gg_out - gg_ref).abs().max()) <= 1e-12


@pytest.mark.parametrize("kernel", [(3, 1), (1, 3), (5, 5), (5, 3)])
def test_dense_conv_matrix_is_the_convolution_of_unit_inputs(kernel):
    """The gathered matrix equals the convolution applied to every unit input (an independent
    construction), entry for entry, for non-square kernels and C_out != C_in too."""
    torch.manual_seed(0)
    w = torch.randn(5, 3, *kernel, dtype=torch.float64)
    height, width = 2, 3
    pad = (kernel[0] // 2, kernel[1] // 2)
    units = torch.eye(3 * height * width, dtype=torch.float64)
    units = units.view(-1, height, width, 3).permute(0, 3, 1, 2)
    ref = F.conv2d(units, w, padding=pad).permute(0, 2, 3, 1).flatten(1)
    assert torch.equal(dense_conv_matrix(w, height, width), ref)
    h = torch.randn(4, 3, height, width, dtype=torch.float64)
    torch.testing.assert_close(warp_conv(h, w), F.conv2d(h, w, padding=pad), rtol=0, atol=1e-12)


@pytest.mark.parametrize("channels_inner", [False, True])
def test_warp_conv_keeps_channels_innermost(channels_inner):
    """On maps smaller than the kernel, a channels-innermost input (the adapted block's layout)
    is read as it is and the output is channels-innermost too, with the values of F.conv2d; an
    NCHW input gives the same values."""
    torch.manual_seed(0)
    h = torch.randn(3, 2, 2, 4, dtype=torch.float64).permute(0, 3, 1, 2)
    if not channels_inner:
        h = h.contiguous()
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    out = warp_conv(h, w)
    torch.testing.assert_close(out, F.conv2d(h, w, padding=1), rtol=0, atol=1e-12)
    assert out.permute(0, 2, 3, 1).is_contiguous()
