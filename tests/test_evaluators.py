"""Evaluators: BatchNorm re-calibration, accuracy/agreement proxies, the data-free proxy."""

from __future__ import annotations

import math

import pytest
import torch
from test_space import ToyNet, toy_spec
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autoprune.errors import InvalidInputError
from autoprune.evaluators import (
    ImportanceProxy,
    accuracy_evaluator,
    agreement_evaluator,
    recalibrate_batchnorm,
)
from autoprune.plan import GroupPlan, PruningPlan


def _data(n: int = 256, shift: float = 3.0) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g) * 2 + shift
    y = (x[:, 0] > shift).long()
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)


def _bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():  # a net that separates the classes if its BN stats are right
        net[0].weight.zero_()
        net[0].weight[:, 0] = 1.0
        net[0].bias.zero_()
        net[3].weight.copy_(torch.stack([-torch.ones(16), torch.ones(16)]))
        net[3].bias.zero_()
    return net.eval()


def test_bn_recalibration_restores_accuracy():
    loader = _data()
    net = _bn_net()  # running stats are the defaults (mean 0, var 1): wrong for shift=3
    raw = accuracy_evaluator(loader, bn_recalibration_batches=0)(net)
    recal = accuracy_evaluator(loader, bn_recalibration_batches=4)(_bn_net())
    assert recal > 0.9 and raw < 0.7
    bn = recalibrate_batchnorm(_bn_net(), loader, 4)[1]
    assert abs(float(bn.running_mean.mean()) - 3.0) < 0.5
    assert bn.momentum == 0.1 and not bn.training


def test_finetune_proxy_trains_and_needs_labels():
    loader = _data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    before = accuracy_evaluator(loader, bn_recalibration_batches=0)(net)
    after = accuracy_evaluator(loader, finetune_steps=60, finetune_lr=0.05)(net)
    assert after > max(before, 0.8)
    unlabelled = DataLoader(TensorDataset(torch.randn(32, 8)), batch_size=16)
    with pytest.raises(InvalidInputError, match="needs labelled batches"):
        accuracy_evaluator(unlabelled)(net)


def test_accuracy_evaluator_device_moves_model_and_batches():
    """``device=`` gives the same score as no device on the CPU, batches reach the model on
    that device, and on a CUDA machine (the lent GPU) the proxy runs there."""
    loader = _data()
    torch.manual_seed(0)
    plain = accuracy_evaluator(loader, finetune_steps=5)(
        nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    on_cpu = accuracy_evaluator(loader, finetune_steps=5, device="cpu")(net)
    assert on_cpu == plain
    bn = _bn_net()
    seen: list[torch.device] = []
    bn[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0].device))
    accuracy_evaluator(loader, bn_recalibration_batches=2, device="cpu")(bn)
    assert seen and all(d.type == "cpu" for d in seen)
    if torch.cuda.is_available():
        assert accuracy_evaluator(loader, device="cuda")(_bn_net()) > 0.9


def test_agreement_top1_and_kl():
    loader = _data()
    dense = _bn_net()
    recalibrate_batchnorm(dense, loader, 4)
    ev = agreement_evaluator(dense, loader, metric="top1")
    assert ev(_bn_net()) == 1.0  # same weights, re-calibrated the same way
    broken = _bn_net()
    with torch.no_grad():
        broken[0].weight.mul_(-1)  # the feature flips sign: every prediction flips
    assert ev(broken) < 0.1
    kl = agreement_evaluator(dense, loader, metric="kl")
    same, other = kl(_bn_net()), kl(broken)
    assert math.isclose(same, 1.0, rel_tol=1e-4) and 0 < other < same
    with pytest.raises(InvalidInputError, match="unknown agreement metric 'l2'"):
        agreement_evaluator(dense, loader, metric="l2")(_bn_net())  # type: ignore[arg-type]


def test_importance_proxy_orders_plans_by_kept_magnitude():
    spec = toy_spec()
    torch.manual_seed(0)
    proxy = ImportanceProxy(ToyNet(), spec).fit()
    dense = proxy.evaluate_plan(PruningPlan.dense(spec))
    assert math.isclose(dense, 1.0, rel_tol=1e-9)
    half = PruningPlan.uniform(spec, 0.5, "channel")
    quarter = PruningPlan.uniform(spec, 0.25, "channel")
    s_half, s_quarter = proxy.evaluate_plan(half), proxy.evaluate_plan(quarter)
    assert 1.0 > s_half > s_quarter > 0
    # keeping the largest units beats keeping a random subset's expectation (the ratio)
    only_c3 = PruningPlan(groups={"c3": GroupPlan("channel", 0.5)})
    per_layer_c3 = proxy.evaluate_plan(only_c3)
    assert per_layer_c3 > 1.0 - 2 * 0.5 / 4  # c3 and fc each keep more than half their weight
    nm = PruningPlan(groups={"c1": GroupPlan("nm")})
    unstr = PruningPlan(groups={"c1": GroupPlan("unstructured", 0.5)})
    # magnitude-based 2:4 keeps less than free unstructured at the same density, more than half
    assert 0.5 < proxy.evaluate_plan(nm) < proxy.evaluate_plan(unstr) < 1.0
    blk = PruningPlan(groups={"blk": GroupPlan("block")})
    assert math.isclose(proxy.evaluate_plan(blk), 3 / 4)  # c2 removed: one of four layers
    with pytest.raises(InvalidInputError, match="scores plans, not models"):
        proxy(ToyNet())


def test_importance_proxy_needs_the_matching_model():
    with pytest.raises(InvalidInputError, match="found no weighted layer"):
        ImportanceProxy(nn.Sequential(nn.Linear(2, 2)), toy_spec()).fit()
