"""Every importance criterion satisfies the ``Importance`` contract (``autoprune/importance.py``).

A new criterion is one more entry in ``CRITERIA``: its registry name → (a factory returning a
fresh instance, the traits it has). Traits: ``magnitude`` (scores come from weight magnitudes:
blind to weight signs, ranking unchanged when every weight is scaled by one positive factor),
``positional`` (scores ignore the weights, e.g. ``random``: exempt from permutation
equivariance). A registered name missing from ``CRITERIA`` fails the suite.

Groups are real torch-pruning dependency groups of a small conv net with BatchNorm, a residual
add (a group spanning several layers) and an MLP head (a group without BatchNorm).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autoprune.errors import InvalidInputError, UnknownNameError
from autoprune.importance import (
    IMPORTANCES,
    Importance,
    MagnitudeImportance,
    RandomImportance,
    get_importance,
)

CRITERIA = {
    "l1": (lambda: get_importance("l1"), {"magnitude"}),
    "l2": (lambda: get_importance("l2"), {"magnitude"}),
    "taylor": (lambda: get_importance("taylor"), set()),
    "bn_gamma": (lambda: get_importance("bn_gamma"), {"magnitude"}),
    "random": (lambda: get_importance("random", seed=7), {"positional"}),
}

pytestmark = pytest.mark.filterwarnings("ignore:bn_gamma importance:UserWarning")


class Net(nn.Module):
    """c1 → b1 → (+ b2(c2)) → c3 → b3 → pool → f1 → f2: groups c1 (8 channels, through the
    residual add), c3 (16) and f1 (12, no BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.f1, self.f2 = nn.Linear(16, 12), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(x + self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x))).mean((2, 3))
        return self.f2(torch.relu(self.f1(x)))


ROOTS = {"c1": 8, "c3": 16, "f1": 12}
X = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
Y = torch.tensor([0, 1, 2, 3, 0, 1])


def _net() -> Net:
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():  # BatchNorm with distinct scales and statistics
        for b in (m.b1, m.b2, m.b3):
            b.weight.uniform_(0.2, 2.0)
            b.bias.uniform_(-0.5, 0.5)
            b.running_mean.uniform_(-0.2, 0.2)
            b.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _with_grads(m: Net) -> Net:
    m.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(m(X), Y).backward()
    return m


def _scores(imp: Importance, m: Net, root: str) -> torch.Tensor:
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(m, example_inputs=X[:1])
    mod = m.get_submodule(root)
    pruner = dg.get_pruner_of_module(mod)
    n = pruner.get_out_channels(mod)
    return imp.channel_scores(dg.get_pruning_group(mod, pruner.prune_out_channels,
                                                   list(range(n))))


def _permuted(m: Net, perm: torch.Tensor) -> Net:
    """The same function with the channels of group c1 (c1, b1, c2 in and out, b2, c3 in)
    reordered by ``perm``."""
    p = copy.deepcopy(m)
    with torch.no_grad():
        p.c1.weight.copy_(m.c1.weight[perm])
        p.c1.bias.copy_(m.c1.bias[perm])
        p.c2.weight.copy_(m.c2.weight[perm][:, perm])
        p.c2.bias.copy_(m.c2.bias[perm])
        for a, b in ((p.b1, m.b1), (p.b2, m.b2)):
            for t in ("weight", "bias", "running_mean", "running_var"):
                getattr(a, t).copy_(getattr(b, t)[perm])
        p.c3.weight.copy_(m.c3.weight[:, perm])
    torch.testing.assert_close(p(X), m(X), rtol=1e-5, atol=1e-5)  # same function
    return p


def _ready(name: str, m: Net) -> Net:
    imp = CRITERIA[name][0]()
    return _with_grads(m) if imp.needs_gradients else m


@pytest.fixture(params=sorted(CRITERIA))
def name(request) -> str:
    return request.param


def test_every_registered_criterion_is_in_the_suite():
    assert set(CRITERIA) == set(IMPORTANCES)


def test_interface(name):
    imp = CRITERIA[name][0]()
    assert isinstance(imp, Importance) and imp.name == name
    assert isinstance(imp.needs_gradients, bool) and repr(imp)
    assert get_importance(imp) is imp


@pytest.mark.parametrize("root", sorted(ROOTS))
def test_channel_scores_one_finite_non_negative_score_per_root_channel(name, root):
    m = _ready(name, _net())
    before = copy.deepcopy(m.state_dict())
    s = _scores(CRITERIA[name][0](), m, root)
    assert isinstance(s, torch.Tensor) and s.dtype.is_floating_point
    assert s.shape == (ROOTS[root],)
    assert torch.isfinite(s).all() and (s >= 0).all()
    assert s.max() > 0  # scores something
    for k, v in m.state_dict().items():  # scoring leaves the model alone
        assert torch.equal(v, before[k]), k


def test_channel_scores_are_deterministic(name):
    a = _scores(CRITERIA[name][0](), _ready(name, _net()), "c1")
    b = _scores(CRITERIA[name][0](), _ready(name, _net()), "c1")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_channel_scores_follow_the_channels_not_their_positions(name):
    if "positional" in CRITERIA[name][1]:
        pytest.skip(f"{name} scores ignore the weights")
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    m = _net()
    s = _scores(CRITERIA[name][0](), _ready(name, m), "c1")
    sp = _scores(CRITERIA[name][0](), _ready(name, _permuted(_net(), perm)), "c1")
    torch.testing.assert_close(sp, s[perm], rtol=1e-4, atol=1e-6)


def test_magnitude_channel_scores_ignore_sign_and_overall_scale(name):
    if "magnitude" not in CRITERIA[name][1]:
        pytest.skip(f"{name} is not a magnitude criterion")
    s = _scores(CRITERIA[name][0](), _net(), "c1")
    flipped, scaled = _net(), _net()
    with torch.no_grad():
        for mod in flipped.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                mod.weight.neg_()
        for mod in scaled.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                mod.weight.mul_(3.0)
    torch.testing.assert_close(_scores(CRITERIA[name][0](), flipped, "c1"), s)
    sc = _scores(CRITERIA[name][0](), scaled, "c1")
    torch.testing.assert_close(sc / sc.mean(), s / s.mean())


def test_criteria_that_need_gradients_refuse_to_score_without_them(name):
    imp = CRITERIA[name][0]()
    if not imp.needs_gradients:
        s = _scores(imp, _net(), "c3")  # no gradients anywhere: still scores
        assert s.shape == (16,)
        return
    with pytest.raises(InvalidInputError, match="gradients"):
        _scores(imp, _net(), "c3")


# --- weight scores --------------------------------------------------------------------------
def _weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(16, 8, 3, 3, generator=g), torch.randn(16, 8, 3, 3, generator=g),
            torch.rand(16, generator=g) + 0.1)


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (12, 20), (6, 4, 5)])
def test_weight_scores_one_finite_non_negative_score_per_element(name, shape):
    w = torch.randn(*shape)
    grad, gamma = torch.randn(*shape), torch.rand(shape[0]) + 0.1
    w0 = w.clone()
    for gm in (gamma, None):
        s = CRITERIA[name][0]().weight_scores(w, grad, gm)
        assert s.shape == w.shape and s.dtype.is_floating_point
        assert torch.isfinite(s).all() and (s >= 0).all() and s.max() > 0
    assert torch.equal(w, w0)  # the weight is not modified


def test_weight_scores_are_deterministic_and_sign_blind(name):
    w, grad, gamma = _weights()
    a = CRITERIA[name][0]().weight_scores(w, grad, gamma)
    b = CRITERIA[name][0]().weight_scores(w.clone(), grad.clone(), gamma.clone())
    c = CRITERIA[name][0]().weight_scores(-w, grad, gamma)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_weight_scores_follow_the_rows(name):
    if "positional" in CRITERIA[name][1]:
        pytest.skip(f"{name} scores ignore the weights")
    w, grad, gamma = _weights()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    s = CRITERIA[name][0]().weight_scores(w, grad, gamma)
    sp = CRITERIA[name][0]().weight_scores(w[perm], grad[perm], gamma[perm])
    torch.testing.assert_close(sp, s[perm], rtol=0, atol=0)


def test_weight_scores_without_a_gradient(name):
    w, _, gamma = _weights()
    imp = CRITERIA[name][0]()
    if imp.needs_gradients:
        with pytest.raises(InvalidInputError, match="gradients"):
            imp.weight_scores(w, None, gamma)
        with pytest.raises(InvalidInputError, match="shape"):
            imp.weight_scores(w, torch.randn(16, 8), gamma)
    else:
        assert imp.weight_scores(w, None, gamma).shape == w.shape


# --- registry ---------------------------------------------------------------------------------
def test_unknown_or_ill_typed_criteria_are_refused_clearly():
    with pytest.raises(UnknownNameError, match="unknown importance 'l3'; known: bn_gamma, l1"):
        get_importance("l3")
    with pytest.raises(InvalidInputError, match="importance must be a name .* got int 3"):
        get_importance(3)
    assert get_importance("l1").p == 1 and isinstance(get_importance("l2"), MagnitudeImportance)


def test_random_follows_its_seed():
    w, grad, gamma = _weights()
    a = RandomImportance(seed=1).weight_scores(w, grad, gamma)
    torch.testing.assert_close(RandomImportance(seed=1).weight_scores(w, grad, gamma), a)
    assert not torch.equal(RandomImportance(seed=2).weight_scores(w, grad, gamma), a)
    assert get_importance("random", seed=5).seed == 5
