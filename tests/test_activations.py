import math

import torch

from npbml.activations import SmoothLeakyReLU, smooth_leaky_relu


def test_matches_closed_form():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    g, b = 0.25, 5.0
    expected = g * x + (1 - g) * torch.log1p(torch.exp(b * x)) / b
    torch.testing.assert_close(smooth_leaky_relu(x, g, b), expected)


def test_asymptotic_slopes_and_value_at_zero():
    f = SmoothLeakyReLU()
    x = torch.tensor([-50.0, 50.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(f(x).sum(), x)
    torch.testing.assert_close(grad, torch.tensor([0.25, 1.0], dtype=torch.float64))
    assert math.isclose(f(torch.zeros(1)).item(), 0.75 * math.log(2) / 5, rel_tol=1e-6)
