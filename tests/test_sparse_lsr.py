"""SparseLSR against closed forms and the standard label-smoothing loss.

The loss: Raymond, PhD thesis "Meta-Learning Loss Functions for Deep Neural Networks" (arXiv
2406.09713), and EvoMAL (Raymond et al., TPAMI 2023, arXiv 2209.08907); see
`docs/methods/sparse-lsr.md`.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npbml.losses import SparseLSR, label_smoothing_ce, sparse_label_smoothing


def _reference(z: torch.Tensor, t: torch.Tensor, xi: float) -> torch.Tensor:
    """Hand-written per-example SparseLSR from softmax probabilities (float64, no tricks)."""
    p = torch.softmax(z.double(), -1)
    c = z.shape[-1]
    a = 1 - xi + xi / c
    b = 1 - a
    pt = p.gather(-1, t[:, None]).squeeze(-1)
    return -a * torch.log(pt) - b * torch.log((1 - pt) / (c - 1))


def _unclamped(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rows whose ``1 - p_t`` is above the documented 1e-7 floor (where the forms are exact)."""
    pt = torch.softmax(z.detach().double(), -1).gather(-1, t[:, None]).squeeze(-1)
    return (1 - pt) > 1e-6


def _logits(n: int, c: int, scale: float, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)


def _targets(n: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, c, (n,), generator=g)


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
classes = st.one_of(st.integers(2, 50), st.sampled_from([2, 3, 1000, 100_000]))
smoothings = st.floats(0.0, 1.0)
scales = st.sampled_from([0.01, 1.0, 5.0])
seeds = st.integers(0, 2**16)


@SETTINGS
@given(c=classes, xi=smoothings, scale=scales, seed=seeds)
def test_matches_hand_written_reference(c, xi, scale, seed):
    n = 3
    z, t = _logits(n, c, scale, seed), _targets(n, c, seed)
    got = sparse_label_smoothing(z, t, xi, reduction="none")
    keep = _unclamped(z, t)
    torch.testing.assert_close(got[keep], _reference(z, t, xi)[keep], rtol=1e-9, atol=1e-9)


@SETTINGS
@given(c=classes, xi=smoothings, scale=scales, seed=seeds)
def test_target_logit_gradient_is_pt_minus_a(c, xi, scale, seed):
    n = 3
    z = _logits(n, c, scale, seed).requires_grad_()
    t = _targets(n, c, seed)
    (g,) = torch.autograd.grad(sparse_label_smoothing(z, t, xi, reduction="sum"), z)
    p = torch.softmax(z.detach(), -1)
    pt = p.gather(-1, t[:, None]).squeeze(-1)
    a = 1 - xi + xi / c
    keep = _unclamped(z, t)
    got_t = g.gather(-1, t[:, None]).squeeze(-1)
    torch.testing.assert_close(got_t[keep], (pt - a)[keep], rtol=1e-9, atol=1e-12)
    # Same target-logit gradient as standard label smoothing (F.cross_entropy's form).
    z2 = z.detach().clone().requires_grad_()
    (g2,) = torch.autograd.grad(F.cross_entropy(z2, t, label_smoothing=xi, reduction="sum"), z2)
    torch.testing.assert_close(
        got_t[keep], g2.gather(-1, t[:, None]).squeeze(-1)[keep], rtol=1e-9, atol=1e-12
    )


@SETTINGS
@given(c=classes, xi=smoothings, scale=scales, seed=seeds)
def test_lower_bound_of_standard_label_smoothing(c, xi, scale, seed):
    n = 3
    z, t = _logits(n, c, scale, seed), _targets(n, c, seed)
    sparse = sparse_label_smoothing(z, t, xi, reduction="none")
    dense = F.cross_entropy(z, t, label_smoothing=xi, reduction="none")
    assert bool((sparse <= dense + 1e-9 * dense.abs().clamp_min(1)).all())


@SETTINGS
@given(c=classes, xi=smoothings, zt=st.floats(-10, 10), other=st.floats(-10, 10))
def test_equal_to_standard_when_non_targets_uniform(c, xi, zt, other):
    n = 2
    z = torch.full((n, c), other, dtype=torch.float64)
    t = torch.tensor([0, c - 1])
    z[0, 0] = zt
    z[1, c - 1] = zt
    keep = _unclamped(z, t)
    torch.testing.assert_close(
        sparse_label_smoothing(z, t, xi, reduction="none")[keep],
        F.cross_entropy(z, t, label_smoothing=xi, reduction="none")[keep],
        rtol=1e-9,
        atol=1e-9,
    )


@SETTINGS
@given(xi=smoothings, scale=scales, seed=seeds)
def test_two_classes_coincides_with_standard(xi, scale, seed):
    # With C = 2 the single non-target probability is trivially "uniform": the forms coincide.
    z, t = _logits(5, 2, scale, seed), _targets(5, 2, seed)
    keep = _unclamped(z, t)
    torch.testing.assert_close(
        sparse_label_smoothing(z, t, xi, reduction="none")[keep],
        label_smoothing_ce(z, t, xi, reduction="none")[keep],
    )


@SETTINGS
@given(c=classes, scale=scales, seed=seeds)
def test_zero_smoothing_is_cross_entropy(c, scale, seed):
    z, t = _logits(3, c, scale, seed), _targets(3, c, seed)
    torch.testing.assert_close(sparse_label_smoothing(z, t, 0.0), F.cross_entropy(z, t))


def test_dense_reference_matches_torch_label_smoothing():
    z, t = _logits(8, 13, 2.0, 0), _targets(8, 13, 0)
    for xi in (0.0, 0.1, 0.7, 1.0):
        torch.testing.assert_close(
            label_smoothing_ce(z, t, xi), F.cross_entropy(z, t, label_smoothing=xi)
        )


def test_minimiser_puts_target_probability_at_a():
    # L as a function of the logits is minimised where p_t = A; the "+B" form would push p_t -> 1.
    c, xi = 10, 0.2
    a = 1 - xi + xi / c
    z = torch.zeros(1, c, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([3])
    opt = torch.optim.SGD([z], lr=5.0)
    for _ in range(300):
        opt.zero_grad()
        sparse_label_smoothing(z, t, xi).backward()
        opt.step()
    assert math.isclose(torch.softmax(z, -1)[0, 3].item(), a, abs_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_float32(dtype):
    z = _logits(6, 50, 3.0, 1, dtype=dtype).requires_grad_()
    t = _targets(6, 50, 1)
    loss = sparse_label_smoothing(z, t, 0.1)
    assert loss.dtype == torch.float32
    expected = sparse_label_smoothing(z.detach().float(), t, 0.1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert z.grad.dtype == dtype and bool(torch.isfinite(z.grad.float()).all())


def test_floor_of_one_minus_pt():
    # Past the 1e-7 floor the B term is constant: value -A log p_t - B log(1e-7 / (C - 1)).
    c, xi = 4, 0.1
    a = 1 - xi + xi / c
    z = torch.tensor([[40.0, 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0])
    loss = sparse_label_smoothing(z, t, xi)
    log_pt = -math.log1p(3 * math.exp(-40.0))
    assert math.isclose(loss.item(), -a * log_pt - (1 - a) * math.log(1e-7 / 3), rel_tol=1e-12)
    loss.backward()
    assert bool(torch.isfinite(z.grad).all())


def test_extreme_logits_stay_finite():
    z = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    t = torch.tensor([0, 0])
    loss = sparse_label_smoothing(z, t, 0.1)
    loss.backward()
    assert math.isfinite(loss.item()) and bool(torch.isfinite(z.grad).all())


def _saved_for_backward(n: int, c: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits ``[n, c]`` and every tensor autograd saves for SparseLSR's backward."""
    z = torch.randn(n, c, requires_grad=True)
    t = torch.randint(0, c, (n,))
    saved: list[torch.Tensor] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sparse_label_smoothing(z, t, 0.1)
    return z, saved


def test_does_not_build_dense_intermediates_beyond_logsumexp():
    # Autograd saves the logits (input) and per-row values only; no other [N, C] tensor is saved.
    n, c = 4, 1000
    z, saved = _saved_for_backward(n, c)
    dense = [s for s in saved if s.numel() >= n * c and s.data_ptr() != z.data_ptr()]
    assert len(dense) <= 1, [tuple(s.shape) for s in dense]  # logsumexp saves its own result only


def test_module_and_leading_dims():
    z, t = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    m = SparseLSR(0.3, reduction="none")
    assert m(z, t).shape == (2, 3)
    torch.testing.assert_close(
        SparseLSR(0.3)(z, t), sparse_label_smoothing(z.reshape(6, 7), t.reshape(6), 0.3)
    )


def test_bad_input_errors():
    z = torch.randn(4, 5)
    with pytest.raises(TypeError, match="integer class indices"):
        sparse_label_smoothing(z, torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="does not match"):
        sparse_label_smoothing(z, torch.zeros(3, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="smoothing"):
        SparseLSR(1.5)
    with pytest.raises(ValueError, match="reduction"):
        SparseLSR(0.1, reduction="avg")


def test_twice_differentiable_for_maml_inner_loops():
    # MAML differentiates through the inner-loop loss's gradient (second order).
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 2, 4])
    assert torch.autograd.gradgradcheck(lambda x: sparse_label_smoothing(x, t, 0.2), (z,))


# -- issue 15: the closed-form autograd Function ---------------------------------------------


def _composed(z: torch.Tensor, t: torch.Tensor, xi: float) -> torch.Tensor:
    """Per-example SparseLSR in plain autograd ops (the pre-issue-15 implementation)."""
    c = z.shape[-1]
    a = 1 - xi + xi / c
    log_pt = z.gather(-1, t[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
    one_minus = (-torch.expm1(log_pt)).clamp_min(1e-7)
    return -a * log_pt - (1 - a) * (torch.log(one_minus) - math.log(c - 1))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("c", [2, 7, 300])  # both backward branches (below/above 256 classes)
def test_gradcheck_against_finite_differences(reduction, c):
    z = _logits(5, c, 2.0, c, dtype=torch.float64).requires_grad_()
    t = _targets(5, c, c)
    assert torch.autograd.gradcheck(lambda x: sparse_label_smoothing(x, t, 0.3, reduction), (z,))
    if reduction == "none":  # second order through a non-uniform upstream gradient as well
        assert torch.autograd.gradgradcheck(
            lambda x: sparse_label_smoothing(x, t, 0.3, "none"), (z,)
        )


@pytest.mark.parametrize("c", [10, 1000, 100_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradient_match_the_composed_formula(c, dtype):
    z = _logits(16, c, 3.0, 5, dtype=dtype).requires_grad_()
    t = _targets(16, c, 5)
    weights = torch.rand(16, dtype=dtype)  # a non-uniform upstream gradient ("none")
    got = sparse_label_smoothing(z, t, 0.1, "none")
    (g_got,) = torch.autograd.grad((got * weights).sum(), z)
    ref = _composed(z, t, 0.1)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), z)
    # float32: both sides sum c terms (the log-sum-exp), in orders that depend on the CPU's
    # kernels; the rounding grows like sqrt(c) * eps (1.1e-5 relative seen at c = 1e5 on an AMD
    # EPYC), while a wrong formula is off by O(xi) = 1e-1 relative.
    rtol32 = max(1e-5, 2 * torch.finfo(torch.float32).eps * math.sqrt(c))
    tol = (
        {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": rtol32, "atol": 1e-7}
    )
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(g_got, g_ref, **tol)


def test_gradient_under_the_floor_drops_the_b_term():
    # Past the floor only -A log p_t moves: dL/dz = A (p - onehot), exactly.
    c, xi = 4, 0.1
    a = 1 - xi + xi / c
    z = torch.tensor([[40.0, 0.0, 0.0, 0.0], [0.5, 0.0, 1.0, 0.0]], dtype=torch.float64)
    z.requires_grad_()
    t = torch.tensor([0, 1])
    (g,) = torch.autograd.grad(sparse_label_smoothing(z, t, xi, "sum"), z)
    p = torch.softmax(z.detach(), -1)
    onehot = F.one_hot(t, c).double()
    torch.testing.assert_close(g[0], a * (p[0] - onehot[0]), rtol=1e-12, atol=1e-20)
    pt = p[1, 1]
    factor = 1 - (1 - a) / (1 - pt)  # the unfloored row: (p - onehot)(1 - B / (1 - p_t))
    torch.testing.assert_close(g[1], factor * (p[1] - onehot[1]))


def test_saves_no_class_sized_tensor_for_backward():
    # Only the logits themselves (by reference) and [N] vectors: the memory claim, exactly.
    n, c = 4, 1000
    z, saved = _saved_for_backward(n, c)
    dense = [s for s in saved if s.numel() >= c]
    assert len(dense) == 1 and dense[0].data_ptr() == z.data_ptr()
    assert sum(s.numel() for s in saved if s.data_ptr() != z.data_ptr()) <= 3 * n
