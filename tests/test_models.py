"""Backbones and the functional-parameter helpers (npbml.models, npbml.params)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from npbml.models import Conv4, ConvBlock, ResNet12, available_models, build_model
from npbml.params import functional_forward, named_params, split_params, strip_prefix


@pytest.mark.parametrize(
    "kwargs, shape, feature_dim",
    [
        (dict(in_channels=1, image_size=28), (4, 1, 28, 28), 64),
        (dict(in_channels=3, image_size=84), (4, 3, 84, 84), 64 * 5 * 5),
        (dict(in_channels=1, image_size=28, variant="strided"), (4, 1, 28, 28), 64),
        (dict(in_channels=3, image_size=84, variant="strided", hidden=48), (4, 3, 84, 84), 48),
    ],
)
def test_conv4_shapes(kwargs, shape, feature_dim):
    torch.manual_seed(0)
    model = Conv4(num_classes=5, **kwargs)
    x = torch.rand(*shape)
    assert model.features(x).shape == (shape[0], feature_dim)
    assert model(x).shape == (shape[0], 5)
    assert model.feature_dim == feature_dim


def test_resnet12_shapes():
    torch.manual_seed(0)
    model = build_model("resnet12", channels=(8, 16, 24, 32), num_classes=5)
    x = torch.rand(3, 3, 84, 84)
    assert model.features(x).shape == (3, 32)
    assert model(x).shape == (3, 5)
    flat = ResNet12(channels=(4, 4, 4, 8), image_size=84, pool="flatten")
    assert flat(x).shape == (3, 5) and flat.feature_dim == 8 * 5 * 5
    # The standard width builds (its forward is too slow to run here).
    assert build_model("resnet12").head.in_features == 640


def test_parameter_names():
    names = list(named_params(Conv4()))
    for i in range(4):
        assert f"blocks.{i}.conv.weight" in names and f"blocks.{i}.bn.bias" in names
    assert names[-2:] == ["head.weight", "head.bias"]
    rnames = list(named_params(ResNet12(channels=(4, 4, 4, 4))))
    assert {n.split(".")[0] for n in rnames} == {"blocks", "head"}
    assert any(n.startswith("blocks.3.") for n in rnames)


@pytest.mark.parametrize(
    "model_fn", [lambda: Conv4(hidden=8), lambda: ResNet12(channels=(4, 6, 8, 10))]
)
def test_batchnorm_uses_batch_statistics(model_fn):
    torch.manual_seed(0)
    model = model_fn()
    in_ch = 1 if isinstance(model, Conv4) else 3
    size = 28 if isinstance(model, Conv4) else 32
    assert not list(model.buffers()), "no running statistics by default"
    x = torch.rand(6, in_ch, size, size)
    before = copy.deepcopy(model.state_dict())
    y_train = model.train()(x)
    y_eval = model.eval()(x)
    torch.testing.assert_close(y_train, y_eval)  # same statistics at train and test time
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # Batch statistics: a sample's output depends on the other samples in the batch.
    x2 = x.clone()
    x2[1:] = torch.rand_like(x2[1:]) * 3
    assert not torch.allclose(model(x)[0], model(x2)[0])


def test_batchnorm_running_stats_optional():
    model = Conv4(track_running_stats=True)
    assert any("running_mean" in n for n, _ in model.named_buffers())


def test_functional_forward_matches_module():
    torch.manual_seed(0)
    model = Conv4(in_channels=1, image_size=28, hidden=8).double()
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    params = named_params(model)
    torch.testing.assert_close(functional_forward(model, params, x), model(x))
    # Perturbed parameters: equals a module that holds them (independent copy).
    new = {k: v.detach() + 0.01 * torch.randn_like(v) for k, v in params.items()}
    ref = copy.deepcopy(model)
    ref.load_state_dict(new, strict=False)
    torch.testing.assert_close(functional_forward(model, new, x), ref(x))
    # A partial dict: missing entries come from the module; the module is not modified.
    head_only = {k: new[k] for k in ("head.weight", "head.bias")}
    ref2 = copy.deepcopy(model)
    ref2.head.load_state_dict(strip_prefix(head_only, "head."))
    torch.testing.assert_close(functional_forward(model, head_only, x), ref2(x))
    torch.testing.assert_close(
        functional_forward(model, head_only, x, method="features"), model.features(x)
    )
    torch.testing.assert_close(
        functional_forward(model, new, x, method="features"), ref.features(x)
    )
    for k, v in named_params(model).items():
        assert v is params[k]


def test_split_params():
    params = named_params(Conv4())
    adapted, rest = split_params(params, adapt=["head.*", "blocks.3.*"])
    assert list(adapted) == [n for n in params if n.startswith(("blocks.3.", "head."))]
    assert set(rest) == set(params) - set(adapted)
    adapted, rest = split_params(params, adapt="*", freeze=["blocks.0.*", "blocks.1.*"])
    assert not any(n.startswith(("blocks.0.", "blocks.1.")) for n in adapted)
    assert len(adapted) + len(rest) == len(params)
    with pytest.raises(ValueError, match="matches no parameter"):
        split_params(params, adapt=["haed.*"])
    with pytest.raises(ValueError, match="no parameter is adapted"):
        split_params(params, adapt=["head.*"], freeze=["head.*"])


def test_build_model_errors():
    assert available_models() == ["conv4", "lenet5", "logistic", "resnet12"]
    assert isinstance(build_model("Conv4", hidden=8), nn.Module)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg")
    with pytest.raises(TypeError, match="bad arguments"):
        build_model("conv4", filters=3)
    with pytest.raises(ValueError, match="variant"):
        Conv4(variant="avgpool")
    with pytest.raises(ValueError, match="image_size"):
        Conv4(image_size=8)
    with pytest.raises(ValueError, match="images"):
        Conv4().features(torch.rand(2, 28, 28))


class _SharedBlock(nn.Module):
    """One submodule registered under two names (the layout of learn2learn's OmniglotCNN)."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(3, 3)
        self.features = nn.Sequential(self.base, nn.Tanh())
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _TiedWeights(nn.Module):
    """One Parameter held by two different modules (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_functional_forward_restores_shared_submodules_and_ties():
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    shared = _SharedBlock()
    before = dict(shared.named_parameters())
    new = {n: torch.randn_like(p) for n, p in before.items()}
    out = functional_forward(shared, new, x)
    expected = F.linear(
        torch.tanh(F.linear(x, new["base.weight"], new["base.bias"])),
        new["head.weight"],
        new["head.bias"],
    )
    torch.testing.assert_close(out, expected)
    # The module keeps its own Parameters under both names (torch's default tie_weights=True
    # path left the substitutes in place here).
    assert shared.features[0].weight is before["base.weight"]
    assert all(p is before[n] for n, p in shared.named_parameters())

    tied = _TiedWeights()
    w = torch.randn(3, 3)
    b1, b2 = torch.randn(3), torch.randn(3)
    out = functional_forward(tied, {"a.weight": w, "a.bias": b1, "b.bias": b2}, x)
    torch.testing.assert_close(out, F.linear(torch.tanh(F.linear(x, w, b1)), w, b2))
    assert tied.b.weight is tied.a.weight and isinstance(tied.a.weight, nn.Parameter)


def test_maml_on_shared_submodule_model_matches_reference_twice():
    """Two meta-gradients in a row on a model with a shared submodule equal a hand-written
    second-order unroll (the second one failed when the first leaked fast weights)."""
    from npbml.algorithms import MAML

    torch.manual_seed(0)
    model = _SharedBlock()
    maml = MAML(model, inner_lr=0.3)
    sx, sy = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    qx, qy = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    from tasks.episode import Episode

    ep = Episode(sx, sy, qx, qy, torch.arange(2))
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(sx), sy)
    grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=True)
    fast = {n: p - 0.3 * g for (n, p), g in zip(params.items(), grads)}
    h = torch.tanh(F.linear(qx, fast["base.weight"], fast["base.bias"]))
    ref = torch.autograd.grad(
        F.cross_entropy(F.linear(h, fast["head.weight"], fast["head.bias"]), qy),
        tuple(params.values()),
    )
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        maml.meta_backward(ep)
        for p, r in zip(params.values(), ref):
            torch.testing.assert_close(p.grad, r)


def test_conv_block_without_grad_equals_with_grad():
    # without autograd the block applies its ReLU in place; the values are the same, and a block
    # whose activation was replaced keeps it
    torch.manual_seed(0)
    block = ConvBlock(3, 4, stride=2, pool=False)
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        fast = block(x)
    assert torch.equal(fast, block(x).detach())
    block.relu = torch.nn.Tanh()
    with torch.no_grad():
        assert float(block(x).min()) < 0


def _reference_lenet5() -> nn.Sequential:
    """LeNet-5 written out layer by layer (tanh, average pooling, no padding, 120-84-10)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), nn.Tanh(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(256, 120), nn.Tanh(), nn.Linear(120, 84),
        nn.Tanh(), nn.Linear(84, 10),
    )  # fmt: skip


def test_lenet5_is_the_papers_network_layer_for_layer():
    from npbml.models import LeNet5

    model = build_model("lenet5", num_classes=10)
    assert isinstance(model, LeNet5)
    # 156 + 2416 + 30840 + 10164 + 850 parameters: the two convs and three linear layers.
    assert sum(p.numel() for p in model.parameters()) == 44426
    ref = _reference_lenet5()
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), ref.parameters()):
            theirs.copy_(mine)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(model(x), ref(x))
    assert model.features(x).shape == (3, 84)
    biases = [b.detach() for n, b in model.named_parameters() if "bias" in n]
    assert all(float(b.abs().max()) == 0 for b in biases)
    assert build_model("lenet5", num_classes=4, in_channels=3, image_size=32)(
        torch.zeros(2, 3, 32, 32)
    ).shape == (2, 4)
    with pytest.raises(ValueError, match="image_size >= 16"):
        LeNet5(image_size=12)


def test_logistic_is_one_linear_layer_on_the_pixels():
    model = build_model("logistic", num_classes=10, in_features=784)
    assert sum(p.numel() for p in model.parameters()) == 7850
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(model(x), x.flatten(1) @ model.head.weight.T + model.head.bias)
