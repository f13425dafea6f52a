"""AdaLFL: exact base update, meta-gradient vs finite differences, non-finite guard."""

import copy
import logging

import pytest
import torch
from torch import nn

from npbml.inner import InnerSGD
from npbml.loss_learning import AdaLFL, adalfl_meta_loss, default_meta_objective
from npbml.losses import LearnedLoss


def _data(n: int = 8, d: int = 3, c: int = 3, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


def test_base_update_matches_torch_sgd_nesterov_weight_decay():
    # With a frozen loss network (meta_lr=0) AdaLFL's base steps are exactly torch.optim.SGD's.
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    loss_net = LearnedLoss(hidden=(6, 6))
    reference = copy.deepcopy(model)
    adalfl = AdaLFL(model, loss_net, base_lr=0.1, meta_lr=0.0, guard=False)
    sgd = torch.optim.SGD(
        reference.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    batches = [_data(seed=s) for s in range(5)]
    for t in range(4):
        adalfl.step(batches[t], batches[t + 1])
        sgd.zero_grad()
        loss_net(reference(batches[t][0]), batches[t][1]).backward()
        sgd.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert p.grad_fn is None and p.is_leaf


def test_meta_gradient_matches_finite_differences():
    # One online step, float64, starting from a non-empty momentum buffer so the unrolled
    # momentum and weight decay enter the meta-gradient.
    torch.manual_seed(1)
    model = nn.Linear(3, 3).double()
    loss_net = LearnedLoss(hidden=(4, 4), output_activation="softplus").double()
    opt = InnerSGD(lr=0.3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    state = {k: 0.1 * torch.randn_like(v) for k, v in params.items()}
    batch, meta_batch = _data(seed=3, dtype=torch.float64), _data(seed=4, dtype=torch.float64)
    objective = default_meta_objective("classification")
    phi = {k: v.detach().clone().requires_grad_() for k, v in loss_net.named_parameters()}

    def f(phi_values):
        meta, *_ = adalfl_meta_loss(
            model, loss_net, params, batch, meta_batch, opt, state, objective, phi_values
        )
        return meta

    grads = torch.autograd.grad(f(phi), list(phi.values()))
    eps = 1e-6
    for (name, value), g in zip(phi.items(), grads):
        fd = torch.zeros_like(value)
        for i in range(value.numel()):
            plus = {k: v.detach().clone() for k, v in phi.items()}
            minus = {k: v.detach().clone() for k, v in phi.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            fd.view(-1)[i] = (f(plus) - f(minus)) / (2 * eps)
        torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-8, msg=name)
    assert any(g.abs().max() > 1e-6 for g in grads)


def test_step_updates_loss_network_and_reduces_meta_loss_on_fixed_batch():
    torch.manual_seed(2)
    model = nn.Linear(3, 3)
    loss_net = LearnedLoss(hidden=(8, 8))
    before = [p.detach().clone() for p in loss_net.parameters()]
    adalfl = AdaLFL(model, loss_net, base_lr=0.1, meta_lr=1e-2)
    batch = _data(seed=5)
    base, meta = adalfl.step(batch, batch)
    assert not adalfl.last_step.skipped and base > 0 and meta > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, loss_net.parameters()))


def test_non_finite_loss_is_skipped_and_loss_network_rolled_back(caplog):
    torch.manual_seed(3)
    model = nn.Linear(3, 3)
    loss_net = LearnedLoss(hidden=(5, 5))
    adalfl = AdaLFL(model, loss_net, base_lr=0.1, meta_lr=1e-2)
    b0, b1, b2 = _data(seed=0), _data(seed=1), _data(seed=2)
    adalfl.step(b0, b1)  # a good step: its phi become the rollback point
    good_phi = adalfl.state_dict()["last_good"]
    model_before = [p.detach().clone() for p in model.parameters()]
    momentum_before = {k: v.clone() for k, v in adalfl.opt_state.items()}
    with torch.no_grad():
        loss_net.layers[1].weight[0, 0] = float("inf")  # injected corruption
    with caplog.at_level(logging.WARNING, logger="npbml.loss_learning.adalfl"):
        adalfl.step(b1, b2)
    assert adalfl.last_step.skipped and adalfl.skipped_steps == 1
    assert "non-finite" in caplog.text
    for p, q in zip(model.parameters(), model_before):
        assert torch.equal(p, q)  # the model was not touched
    for k, v in adalfl.opt_state.items():
        assert torch.equal(v, momentum_before[k])
    for k, p in loss_net.named_parameters():
        assert torch.equal(p, good_phi[k])  # reset to the last good state
    base, meta = adalfl.step(b1, b2)  # and training goes on
    assert not adalfl.last_step.skipped and torch.isfinite(torch.tensor([base, meta])).all()


def test_offline_init_leaves_model_untouched_and_changes_phi():
    torch.manual_seed(4)
    model = nn.Linear(3, 3)
    loss_net = LearnedLoss(hidden=(6, 6))
    adalfl = AdaLFL(model, loss_net, base_lr=0.1, meta_lr=1e-2)
    w = model.weight.detach().clone()
    phi = loss_net.layers[0].weight.detach().clone()
    pairs = ((_data(seed=s), _data(seed=s + 100)) for s in range(100))
    history = adalfl.offline_init(pairs, steps=5)
    assert len(history) == 5
    assert torch.equal(model.weight, w)
    assert not torch.equal(loss_net.layers[0].weight, phi)


def test_validation_meta_batches_and_errors():
    model = nn.Linear(3, 3)
    val = [_data(seed=9)]
    adalfl = AdaLFL(
        model, LearnedLoss(hidden=(4,)), meta_batch="validation", validation_batches=val
    )
    steps = adalfl.train_epoch([_data(seed=s) for s in range(3)])
    assert len(steps) == 3 and adalfl.steps == 3
    with pytest.raises(ValueError, match="needs a meta batch"):
        AdaLFL(model, LearnedLoss(hidden=(4,))).step(_data())
    with pytest.raises(ValueError, match="meta_batch must be one of"):
        AdaLFL(model, LearnedLoss(hidden=(4,)), meta_batch="test")


def test_same_meta_batch_uses_the_steps_own_batch():
    # meta_batch="same" (a toolkit option, ML3's Algorithm 1 form) must equal passing the step's
    # batch explicitly as the meta batch.
    torch.manual_seed(3)
    model, net = nn.Linear(3, 3), LearnedLoss(hidden=(4,))
    twin_model, twin_net = copy.deepcopy(model), copy.deepcopy(net)
    same = AdaLFL(model, net, meta_batch="same", meta_lr=1e-2)
    explicit = AdaLFL(twin_model, twin_net, meta_lr=1e-2)
    batches = [_data(seed=s) for s in range(3)]
    steps = same.train_epoch(batches)
    for b in batches:
        explicit.step(b, b)
    assert [s.meta_loss for s in steps] != [steps[0].meta_loss] * 3
    for a, b in zip(net.parameters(), twin_net.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.weight, twin_model.weight)
    same.step(batches[0])  # no validation source needed


@pytest.mark.parametrize("loss_name", ["SaturatedLoss", "WrongWayLoss"])
def test_guarded_adalfl_cannot_be_wrecked_by_its_loss(loss_name):
    # Issue 15: the same guarantee as ML3's. A loss network that stalls past a knee or rewards
    # wrong classes, frozen (meta_lr=0): the paper's form wrecks the run, the default guard not.
    import test_ml3

    def final_ce(guard):
        torch.manual_seed(0)
        x, y = test_ml3._blobs()
        model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
        loss = getattr(test_ml3, loss_name)()
        adalfl = AdaLFL(model, loss, base_lr=0.05, meta_lr=0.0, guard=guard)
        batches = [(x[i : i + 30], y[i : i + 30]) for i in range(0, 300, 30)]
        for _ in range(15):
            adalfl.train_epoch(batches)
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(x), y).item()

    assert not final_ce(False) < 0.6  # nan (skipped steps) counts as wrecked too
    assert final_ce(True) < 0.2


def _readme_block(title: str) -> str:
    """The first ```python block of README.md's section ``title``."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_online_loss_learning_example_runs():
    # The README's "Online loss learning in your own loop" code, executed as written.
    code = _readme_block("Online loss learning in your own loop")
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    adalfl, model = scope["adalfl"], scope["model"]
    assert adalfl.steps == 3 * 7 and adalfl.skipped_steps == 0  # 8 batches: 7 steps per epoch
    assert adalfl.model is model and adalfl.loss is not adalfl.loss_net  # guarded by default
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert scope["base_loss"] > 0 and scope["meta_loss"] > 0


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
        (torch.optim.Adam, {"lr": 1e-2}),
        (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    ],
)
def test_users_own_optimizer_takes_the_step_and_keeps_its_state(cls, kwargs):
    """With a frozen loss network, AdaLFL over the user's optimizer trains exactly as that
    optimizer on the loss does, and the optimizer's momentum/moment buffers equal those of a
    plain torch.optim run step for step (never dropped, never desynchronised)."""
    torch.manual_seed(5)
    model = nn.Linear(3, 3)
    reference = copy.deepcopy(model)
    loss_net = LearnedLoss(hidden=(6, 6))
    opt = cls(model.parameters(), **kwargs)
    ref_opt = cls(reference.parameters(), **kwargs)
    adalfl = AdaLFL(model, loss_net, meta_lr=0.0, guard=False, optimizer=opt)
    assert adalfl.optimizer is opt
    batches = [_data(seed=s) for s in range(6)]
    for t in range(5):
        adalfl.step(batches[t], batches[t + 1])
        ref_opt.zero_grad()
        loss_net(reference(batches[t][0]), batches[t][1]).backward()
        ref_opt.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
            for key, value in ref_opt.state[q].items():
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-6, atol=1e-7)


def test_a_schedule_on_the_optimizer_reaches_the_step():
    torch.manual_seed(6)
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    adalfl = AdaLFL(model, LearnedLoss(hidden=(4,)), meta_lr=0.0, guard=False, optimizer=opt)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)  # lr 0 from the start: no move
    w = model.weight.detach().clone()
    adalfl.step(_data(seed=0), _data(seed=1))
    assert torch.equal(model.weight, w)
    adalfl.set_base_lr(0.5)
    assert opt.param_groups[0]["lr"] == 0.5 and adalfl._offline_sgd().learning_rates() == 0.5
    adalfl.step(_data(seed=0), _data(seed=1))
    assert not torch.equal(model.weight, w)


def test_step_reports_cross_entropy_and_the_logit_gradient_against_ce():
    torch.manual_seed(7)
    model = nn.Linear(3, 4)
    loss_net = LearnedLoss(hidden=(5, 5))
    adalfl = AdaLFL(model, loss_net, meta_lr=0.0, guard=False)
    x, y = _data(c=4, seed=2)
    z = model(x).detach().requires_grad_()
    (g,) = torch.autograd.grad(loss_net(z, y), z)
    g_ce = (torch.softmax(z.detach(), -1) - nn.functional.one_hot(y, 4)) / len(y)
    expected_ce = float(nn.functional.cross_entropy(z.detach(), y))
    adalfl.step((x, y), _data(c=4, seed=3))
    info = adalfl.last_step
    assert info.ce == pytest.approx(expected_ce, rel=1e-6)
    assert info.grad_ratio == pytest.approx(float(g.norm() / g_ce.norm()), rel=1e-5)
    cos = float((g * g_ce).sum() / (g.norm() * g_ce.norm()))
    assert info.grad_cosine == pytest.approx(cos, rel=1e-5, abs=1e-7)


def test_resume_restores_the_base_optimizer_state():
    torch.manual_seed(8)
    model = nn.Linear(3, 3)
    adalfl = AdaLFL(model, LearnedLoss(hidden=(4,)), meta_lr=1e-2)
    for s in range(3):
        adalfl.step(_data(seed=s), _data(seed=s + 1))
    saved = copy.deepcopy(adalfl.state_dict())
    weights = copy.deepcopy(model.state_dict())
    adalfl.step(_data(seed=7), _data(seed=8))
    after = [p.detach().clone() for p in model.parameters()]
    model2 = nn.Linear(3, 3)
    model2.load_state_dict(weights)
    again = AdaLFL(model2, LearnedLoss(hidden=(4,)), meta_lr=1e-2)
    again.load_state_dict(saved)
    again.step(_data(seed=7), _data(seed=8))
    for p, q in zip(model2.parameters(), after):
        assert torch.equal(p, q)


def test_bad_horizon_and_optimizer_are_refused():
    model = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="horizon must be one of"):
        AdaLFL(model, LearnedLoss(hidden=(4,)), horizon="forever")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="RMSprop"):
        AdaLFL(model, LearnedLoss(hidden=(4,)), optimizer=torch.optim.RMSprop(model.parameters()))


def test_a_parameter_the_loss_does_not_reach_is_left_alone_as_torch_would():
    """An unused parameter gets no gradient: neither weight decay nor momentum touches it."""

    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)  # self.unused is registered but never called

    torch.manual_seed(9)
    model = WithUnused()
    w = model.unused.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    adalfl = AdaLFL(model, LearnedLoss(hidden=(4,)), meta_lr=1e-2, optimizer=opt)
    for s in range(3):
        adalfl.step(_data(seed=s), _data(seed=s + 1))
    assert torch.equal(model.unused.weight, w) and model.unused.weight not in opt.state


def test_the_meta_gradient_of_a_step_matches_finite_differences():
    """The meta-gradient AdaLFL.step applies (through the look-ahead of a live torch.optim SGD
    with a non-empty Nesterov buffer and weight decay) against central differences in float64."""
    torch.manual_seed(10)
    model = nn.Linear(3, 3).double()
    loss_net = LearnedLoss(hidden=(4, 4), output_activation="softplus").double()
    opt = torch.optim.SGD(
        model.parameters(), lr=0.3, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    adalfl = AdaLFL(model, loss_net, meta_lr=0.0, guard=False, optimizer=opt)
    adalfl.step(_data(seed=1, dtype=torch.float64), _data(seed=2, dtype=torch.float64))
    batch, meta_batch = _data(seed=3, dtype=torch.float64), _data(seed=4, dtype=torch.float64)
    meta, *_ = adalfl._look_ahead(batch, meta_batch)
    phis = list(loss_net.parameters())
    grads = torch.autograd.grad(meta, phis)
    eps = 1e-6
    for p, g in zip(phis, grads):
        for i in range(min(p.numel(), 4)):
            with torch.no_grad():
                p.view(-1)[i] += eps
            up = adalfl._look_ahead(batch, meta_batch)[0].item()
            with torch.no_grad():
                p.view(-1)[i] -= 2 * eps
            down = adalfl._look_ahead(batch, meta_batch)[0].item()
            with torch.no_grad():
                p.view(-1)[i] += eps
            assert g.view(-1)[i].item() == pytest.approx(
                (up - down) / (2 * eps), rel=1e-4, abs=1e-8
            )
