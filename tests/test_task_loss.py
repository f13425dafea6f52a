import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npbml.algorithms.npbml.layers.task_loss import (
    LossMLP,
    TaskAdaptiveLoss,
    _tensor_statistics,
    weight_statistics,
)

N = 5


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(10, N, generator=g, requires_grad=True)
    targets = torch.arange(N).repeat(2)
    q_logits = torch.randn(7, N, generator=g, requires_grad=True)
    scores = torch.rand(7, N, generator=g)
    params = {"w": torch.randn(4, 3, generator=g, requires_grad=True), "b": torch.zeros(4)}
    params["b"].requires_grad_(True)
    return logits, targets, q_logits, scores, params


def _call(m, logits, targets, q_logits, scores, params):
    return m(logits, targets, params=params, query_logits=q_logits, relation_scores=scores)


def test_zero_initialised_loss_equals_ce_in_value_and_gradient():
    logits, targets, q_logits, scores, params = _inputs()
    m = TaskAdaptiveLoss(N, init_std=0.0)
    loss = _call(m, logits, targets, q_logits, scores, params)
    ce = F.cross_entropy(logits, targets)
    torch.testing.assert_close(loss, ce)
    g_m = torch.autograd.grad(loss, (logits, q_logits, params["w"]), allow_unused=True)
    g_ce = torch.autograd.grad(ce, logits)[0]
    torch.testing.assert_close(g_m[0], g_ce)
    for g in g_m[1:]:
        assert g is None or torch.count_nonzero(g) == 0
    # Without the offset the value is CE + phi(0) per MLP term (3 of them), same gradient.
    raw = TaskAdaptiveLoss(N, init_std=0.0, center_output=False)
    phi0 = 0.75 * math.log(2) / 5
    torch.testing.assert_close(_call(raw, logits, targets, q_logits, scores, params), ce + 3 * phi0)


def test_default_init_is_close_to_ce():
    torch.manual_seed(0)
    logits, targets, q_logits, scores, params = _inputs()
    m = TaskAdaptiveLoss(N)
    loss = _call(m, logits, targets, q_logits, scores, params)
    ce = F.cross_entropy(logits, targets)
    assert abs(loss.item() - ce.item()) < 0.05 * ce.item()
    g_m = torch.autograd.grad(loss, logits)[0]
    g_ce = torch.autograd.grad(ce, logits)[0]
    assert (g_m - g_ce).norm() < 0.05 * g_ce.norm()


def _hand_stats(params, per_element):
    rows, eps = [], 1e-8  # weight_statistics takes square roots of (. + eps)
    for a in (p.detach().double().numpy().ravel() for p in params.values()):
        l1, l2 = np.abs(a).sum(), np.sqrt((a**2).sum() + eps)
        if per_element:
            l1, l2 = l1 / a.size, l2 / np.sqrt(a.size)
        rows.append([a.mean(), np.sqrt(a.var() + eps), l1, l2])
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("paper", [True, False], ids=["paper-inputs", "bounded-inputs"])
def test_terms_match_hand_written_inputs(paper):
    torch.manual_seed(0)
    logits, targets, q_logits, scores, params = _inputs()
    if paper:  # raw logits and CE, raw norms, one R network per tensor averaged
        m = TaskAdaptiveLoss(N, init_std=0.3, inputs="logits", reg_normalize=False)
    else:  # defaults: probabilities, tanh(CE), per-element statistics, one joint R
        m = TaskAdaptiveLoss(N, init_std=0.3, reg_tensors=len(params))
    onehot = F.one_hot(targets, N).float()
    ce_s = F.cross_entropy(logits, targets, reduction="none")
    pseudo = scores.argmax(1)
    ce_q = F.cross_entropy(q_logits, pseudo, reduction="none")
    if paper:
        s_in, q_in = (logits, ce_s), (q_logits, ce_q)
    else:
        s_in = (torch.exp(logits - logits.logsumexp(1, keepdim=True)), torch.tanh(ce_s))
        q_in = (torch.exp(q_logits - q_logits.logsumexp(1, keepdim=True)), torch.tanh(ce_q))
    l_s = m.support_net(torch.cat([s_in[0], onehot, s_in[1][:, None]], 1)).mean()
    l_q = m.query_net(torch.cat([q_in[0], scores, q_in[1][:, None]], 1)).mean()
    stats = _hand_stats(params, per_element=not paper)
    r = m.reg_net(stats).mean() if paper else m.reg_net(stats.reshape(-1))
    assert m.reg_net.in_features == (4 if paper else 4 * len(params))
    expected = F.cross_entropy(logits, targets) + l_s + l_q + r
    torch.testing.assert_close(_call(m, logits, targets, q_logits, scores, params), expected)
    # The transductive network has its own weights.
    assert m.query_net is not m.support_net
    ids_s = {id(p) for p in m.support_net.parameters()}
    assert not ids_s & {id(p) for p in m.query_net.parameters()}


def test_joint_regulariser_weights_tensors_differently_and_checks_their_count():
    torch.manual_seed(0)
    m = TaskAdaptiveLoss(N, use_ce=False, use_support=False, use_query=False, init_std=0.3,
                         reg_tensors=2)
    a, b = torch.randn(4, 3), torch.randn(6)
    # A per-tensor average is symmetric in the tensors; the joint R is not.
    assert not torch.allclose(m.reg_term({"a": a, "b": b}), m.reg_term({"a": b, "b": a}))
    with pytest.raises(ValueError, match="reg_tensors=3"):
        m.reg_term({"a": a, "b": b, "c": b})


@pytest.mark.parametrize("scale", [1.0, 10.0, 1e3])
def test_bounded_inputs_keep_the_learned_terms_gradient_bounded_for_large_logits(scale):
    """With the default inputs the learned terms see only values in [0, 1], so their value and
    their gradient w.r.t. the logits stay bounded however large the logits grow; with the
    paper's raw logits they grow with the logits (the feedback behind the divergence)."""
    torch.manual_seed(0)
    logits, targets, q_logits, scores, params = _inputs()
    out = {}
    for inputs in ("probs", "logits"):
        m = TaskAdaptiveLoss(N, use_ce=False, use_reg=False, init_std=0.1, inputs=inputs)
        x = (logits.detach() * scale).requires_grad_(True)
        q = (q_logits.detach() * scale).requires_grad_(True)
        loss = _call(m, x, targets, q, scores, params)
        gx, gq = torch.autograd.grad(loss, (x, q))
        out[inputs] = (abs(loss.item()), gx.norm().item() + gq.norm().item())
    assert out["probs"][0] < 1.0 and out["probs"][1] < 1.0
    if scale >= 1e3:
        assert out["logits"][0] > 100 * out["probs"][0]


def test_query_term_depends_on_relation_scores_not_labels():
    logits, targets, q_logits, scores, params = _inputs()
    m = TaskAdaptiveLoss(N, use_ce=False, use_support=False, use_reg=False, init_std=0.3)
    a = _call(m, logits, targets, q_logits, scores, params)
    b = _call(m, logits, targets, q_logits, scores.flip(1), params)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="relation_scores"):
        m(logits, targets, params=params, query_logits=q_logits)


def test_weight_statistics_closed_form_and_finite_gradient_at_constant_tensor():
    a = torch.randn(3, 4, dtype=torch.float64)
    s = weight_statistics([a], eps=0.0)[0]
    x = a.numpy().ravel()
    np.testing.assert_allclose(
        s.numpy(), [x.mean(), x.std(), np.abs(x).sum(), np.linalg.norm(x)], rtol=1e-10
    )
    const = torch.full((5,), 0.3, requires_grad=True)  # e.g. a head bias expanded from a scalar
    (g,) = torch.autograd.grad(weight_statistics([const]).sum(), const)
    assert torch.isfinite(g).all()
    np.testing.assert_allclose(
        weight_statistics([a], normalize=True, eps=0.0)[0, 2:].numpy(),
        [np.abs(x).mean(), np.sqrt((x**2).mean())],
        rtol=1e-10,
    )


@pytest.mark.parametrize("value", [0.3, 0.1, 1 / 3, 0.7, 1.1, 0.123456, 2.5, 0.01, 7.3])
def test_std_second_derivative_at_a_constant_tensor_does_not_depend_on_rounding(value):
    """A constant tensor (NPBML's head bias at init) has variance 0; the one-pass form rounds it
    to +-1e-17, and a plain clamp at 0 then cut the derivatives for some values (2 of these 36
    cases before the fix). The Hessian of its std must be the two-pass formula's:
    (2/n)(I - 11^T/n) / (2 sqrt(eps)), whatever the sign of the rounding."""
    other = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for n in (3, 5, 64, 100):

        def hessian_row(fn, n=n):
            x = torch.full((n,), value, dtype=torch.float64, requires_grad=True)
            std = fn([x, other])[0, 1]
            (g,) = torch.autograd.grad(std, x, create_graph=True)
            return torch.autograd.grad(g[0], x)[0]

        fast = hessian_row(lambda ts: weight_statistics(ts, normalize=True))
        ref = hessian_row(lambda ts: torch.stack([_tensor_statistics(t, True, 1e-8) for t in ts]))
        closed = (torch.eye(n, dtype=torch.float64)[0] - 1.0 / n) * (2.0 / n) / (2 * 1e-4)
        torch.testing.assert_close(ref, closed, rtol=1e-9, atol=0)
        torch.testing.assert_close(fast, closed, rtol=1e-6, atol=0)


def test_lossmlp_shapes_and_zero_output():
    mlp = LossMLP(3, init_std=0.0)
    assert mlp(torch.randn(2, 7, 3)).shape == (2, 7)
    assert torch.count_nonzero(mlp(torch.randn(4, 3))) == 0
    with pytest.raises(ValueError, match="expects 3 input features"):
        mlp(torch.randn(4, 2))


def test_switches_and_errors():
    assert TaskAdaptiveLoss(N, use_query=False, use_reg=False).terms == ("ce", "support")
    with pytest.raises(ValueError, match="at least one"):
        TaskAdaptiveLoss(N, False, False, False, False)
    logits, targets, *_ = _inputs()
    with pytest.raises(ValueError, match="params="):
        TaskAdaptiveLoss(N, use_query=False)(logits, targets)
    with pytest.raises(ValueError, match=r"\[batch, 5\]"):
        TaskAdaptiveLoss(N, use_query=False, use_reg=False)(logits[:, :3], targets)


def test_one_pass_statistics_of_several_tensors_match_numpy_and_finite_differences():
    """The several-tensor path (sums of x and x^2 through a segment matrix) against numpy's
    mean / std / norms per tensor, a constant tensor included, and its gradient against finite
    differences (gradcheck, float64)."""
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64) * 0.05 + 0.01,
        torch.full((6,), 0.3, dtype=torch.float64),
        torch.randn(5, 7, generator=g, dtype=torch.float64),
    ]
    for normalize in (False, True):
        s = weight_statistics(tensors, normalize=normalize, eps=0.0)
        for row, t in zip(s, tensors):
            x = t.numpy().ravel()
            l1, l2 = np.abs(x).sum(), np.linalg.norm(x)
            if normalize:
                l1, l2 = l1 / x.size, l2 / np.sqrt(x.size)
            np.testing.assert_allclose(
                row.numpy(), [x.mean(), x.std(), l1, l2], rtol=1e-9, atol=1e-12
            )
    leaves = [t.clone().requires_grad_() for t in (tensors[0], tensors[2])]
    assert torch.autograd.gradcheck(
        lambda a, b: weight_statistics([a, b], normalize=True), tuple(leaves)
    )
