"""Masks: exact patterns, survival through state_dict / optimiser steps / deepcopy, baking."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from autoprune import masks
from autoprune.errors import InvalidInputError


def test_nm_mask_keeps_n_largest_of_every_m_along_input():
    w = torch.tensor([[4.0, -1.0, 3.0, 0.5, 1.0, 2.0, -5.0, 0.1]])
    m = masks.nm_mask(w.abs(), 2, 4)
    assert m.tolist() == [[1, 0, 1, 0, 0, 1, 1, 0]]
    assert masks.check_nm(w * m, 2, 4)
    assert not masks.check_nm(w, 2, 4)


def test_nm_mask_conv_runs_along_input_channels_per_kernel_position():
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)
    m = masks.nm_mask(w.abs(), 2, 4)
    # along dim 1 (input channels) each chunk of 4 keeps exactly 2, for every (out, kh, kw)
    chunks = m.permute(0, 2, 3, 1).reshape(6, 3, 3, 2, 4)
    assert torch.all(chunks.sum(-1) == 2)
    # the kept ones are the largest of their chunk
    s = w.abs().permute(0, 2, 3, 1).reshape(6, 3, 3, 2, 4)
    kept_min = torch.where(chunks.bool(), s, torch.inf).amin(-1)
    dropped_max = torch.where(chunks.bool(), -torch.inf, s).amax(-1)
    assert torch.all(kept_min >= dropped_max)
    assert masks.check_nm(w * m, 2, 4)


def test_nm_mask_pads_rows_that_are_not_a_multiple_of_m():
    w = torch.arange(1.0, 7.0).reshape(1, 6)  # chunks [1 2 3 4] [5 6 (pad pad)]
    m = masks.nm_mask(w, 2, 4)
    assert m.tolist() == [[0, 0, 1, 1, 1, 1]]
    assert masks.check_nm(w * m, 2, 4)


# --- the one set of edge rules (module docstring of autoprune.masks) ----------------------


@pytest.mark.parametrize(("row", "n", "m", "kept"), [
    # ties: of equal scores the lower index is pruned first (order by (score, index))
    ([1.0, 1.0, 1.0, 1.0], 2, 4, [0, 0, 1, 1]),
    ([1.0, 1.0, 1.0, 1.0], 1, 4, [0, 0, 0, 1]),
    ([0.0, 5.0, 0.0, 5.0, 2.0, 2.0, 2.0, 9.0], 2, 4, [0, 1, 0, 1, 0, 0, 1, 1]),
    ([3.0, 3.0, 1.0, 1.0], 2, 4, [1, 1, 0, 0]),
    # a length not divisible by m: the partial last group of r keeps min(n, r)
    ([4.0, 3.0, 2.0, 1.0, 7.0], 2, 4, [1, 1, 0, 0, 1]),
    ([4.0, 3.0, 2.0, 1.0, 7.0, 8.0], 2, 4, [1, 1, 0, 0, 1, 1]),
    ([4.0, 3.0, 2.0, 1.0, 7.0, 8.0, 6.0], 2, 4, [1, 1, 0, 0, 1, 1, 0]),
    ([4.0, 3.0, 2.0, 1.0, 7.0, 8.0, 6.0], 1, 4, [1, 0, 0, 0, 0, 1, 0]),
    ([2.0, 1.0, 3.0], 2, 4, [1, 0, 1]),
    ([2.0, 1.0], 2, 4, [1, 1]),
    # sparsity 0 (n == m) and 1 (n == 0)
    ([4.0, 3.0, 2.0, 1.0, 7.0], 4, 4, [1, 1, 1, 1, 1]),
    ([4.0, 3.0, 2.0, 1.0, 7.0], 0, 4, [0, 0, 0, 0, 0]),
    # m == 1 and groups of 8
    ([4.0, 3.0], 1, 1, [1, 1]),
    ([1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0], 4, 8, [0, 1, 0, 1, 0, 1, 0, 1]),
])
def test_nm_edge_rules(row, n, m, kept):
    scores = torch.tensor([row])
    mask = masks.nm_mask(scores, n, m)
    assert mask.tolist() == [kept]
    assert masks.check_nm(mask, n, m)
    assert masks.is_nm_mask(mask, n, m)
    # the same along dim 1 of a conv weight, at every output channel and kernel position
    conv = scores.reshape(1, -1, 1, 1).expand(3, -1, 2, 2).contiguous()
    cmask = masks.nm_mask(conv, n, m)
    assert torch.equal(cmask, torch.tensor(kept, dtype=torch.float32).reshape(1, -1, 1, 1)
                       .expand(3, -1, 2, 2))


@pytest.mark.parametrize(("numel", "sparsity", "count"), [
    (10, 0.0, 0), (10, 1.0, 10), (10, 0.34, 3), (10, 0.36, 4),
    # halves go to even (Python's round), the same for every caller
    (10, 0.25, 2), (10, 0.35, 4), (4, 0.125, 0), (4, 0.375, 2), (7, 0.5, 4), (9, 0.5, 4),
    (64, 0.7, 45), (1, 0.5, 0), (0, 0.5, 0),
])
def test_pruned_count_rounding(numel, sparsity, count):
    assert masks.pruned_count(numel, sparsity) == count
    scores = torch.arange(float(numel))
    assert int((masks.unstructured_mask(scores, sparsity=sparsity) == 0).sum()) == count
    # keep_ratio is the same rule with sparsity = 1 - keep_ratio
    keep = 1.0 - sparsity
    assert int((masks.unstructured_mask(scores, keep) == 0).sum()) == \
        masks.pruned_count(numel, 1.0 - keep)


@pytest.mark.parametrize(("scores", "sparsity", "kept"), [
    ([2.0, 2.0, 2.0, 2.0], 0.5, [0, 0, 1, 1]),  # ties: lower index pruned first
    ([1.0, 0.0, 1.0, 0.0, 1.0], 0.6, [0, 0, 1, 0, 1]),
    ([3.0, 1.0, 2.0], 0.0, [1, 1, 1]),
    ([3.0, 1.0, 2.0], 1.0, [0, 0, 0]),
    ([float("inf"), float("-inf"), 0.0], 1 / 3, [1, 0, 1]),
])
def test_unstructured_edge_rules(scores, sparsity, kept):
    assert masks.unstructured_mask(torch.tensor(scores), sparsity=sparsity).tolist() == kept


@pytest.mark.parametrize(("call", "match"), [
    (lambda: masks.nm_mask(torch.ones(2, 4), 5, 4), "0 <= n <= m"),
    (lambda: masks.nm_mask(torch.ones(2, 4), -1, 4), "0 <= n <= m"),
    (lambda: masks.nm_mask(torch.ones(2, 4), 2, 0), "m >= 1"),
    (lambda: masks.nm_mask(torch.ones(2, 4), 2.5, 4), "integers"),
    (lambda: masks.check_nm(torch.ones(2, 4), 3, 2), "0 <= n <= m"),
    (lambda: masks.nm_mask(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]), 2, 4), "NaN"),
    (lambda: masks.unstructured_mask(torch.tensor([1.0, float("nan")]), 0.5), "NaN"),
    (lambda: masks.unstructured_mask(torch.ones(4), 1.5), "keep_ratio must be in"),
    (lambda: masks.unstructured_mask(torch.ones(4), sparsity=-0.1), "sparsity must be in"),
    (lambda: masks.unstructured_mask(torch.ones(4)), "one of them"),
    (lambda: masks.unstructured_mask(torch.ones(4), 0.5, sparsity=0.5), "one of them"),
])
def test_mask_maths_rejects_bad_input(call, match):
    with pytest.raises(InvalidInputError, match=match):
        call()


def _tied_weight(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Small integers with signs: many ties in magnitude, the hard case for agreement."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-3, 4, shape, generator=g)).float()


@pytest.mark.parametrize("shape", [(8, 16), (8, 10), (6, 12, 3, 3), (6, 7, 3), (5, 6, 1, 1)])
def test_micro_model_and_finetune_nm_masks_agree(shape):
    from autoprune._finetune._schedule import GradualPruner, GradualSchedule
    from autoprune.backends import micro

    w = _tied_weight(shape)
    expected = masks.nm_mask(w.abs(), 2, 4)
    assert torch.equal(micro.nm_mask(w, 2, 4), expected.bool())  # latency micro-models
    layer = nn.Linear(1, 1) if len(shape) == 2 else nn.Conv2d(1, 1, 1)
    layer.weight = nn.Parameter(w.clone())
    net = nn.Sequential(layer)
    pruner = GradualPruner(net, GradualSchedule(targets={"0": (2, 4)}, end_step=4), 4)
    pruner.update(4)  # the last update of a gradual schedule lands on the final pattern
    assert torch.equal(masks.get_masks(net)["0.weight"], expected)


@pytest.mark.parametrize(("shape", "keep_ratio"), [((8, 16), 0.3), ((7, 5), 0.5),
                                                   ((6, 9, 3, 3), 0.25), ((3, 3), 0.7)])
def test_executor_and_finetune_unstructured_masks_agree(shape, keep_ratio):
    from autoprune._finetune._schedule import GradualPruner, GradualSchedule

    w = _tied_weight(shape, seed=1)
    expected = masks.unstructured_mask(w.abs(), keep_ratio)  # what apply_plan (l1) installs
    layer = nn.Linear(1, 1)
    layer.weight = nn.Parameter(w.clone())
    net = nn.Sequential(layer)
    pruner = GradualPruner(net, GradualSchedule(targets={"0": 1.0 - keep_ratio}, end_step=2), 2)
    pruner.update(2)
    assert torch.equal(masks.get_masks(net)["0.weight"], expected)
    assert int((expected == 0).sum()) == masks.pruned_count(w.numel(), 1.0 - keep_ratio)


def test_micro_model_weights_follow_the_masks_rules():
    from autoprune.backends.micro import MicroModel, build_micro_model
    from autoprune.types import LayerSpec, OpKind, Structure

    for spec in (LayerSpec(OpKind.CONV2D, 10, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, (6, 6)),
                 LayerSpec(OpKind.LINEAR, 18, 6, input_size=(4,))):
        torch.manual_seed(3)
        dense_w = MicroModel(spec).layer.weight.detach().clone()  # same seed, same init
        nm, _ = build_micro_model(spec, Structure.NM, 0.5, seed=3)
        assert torch.equal(nm.layer.weight != 0, masks.nm_mask(dense_w.abs(), 2, 4).bool())
        un, _ = build_micro_model(spec, Structure.UNSTRUCTURED, 0.3, seed=3)
        assert torch.equal(un.layer.weight != 0,
                           masks.unstructured_mask(dense_w.abs(), 0.3).bool())


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_mask_survives_optimizer_steps_and_enforce():
    net = _net()
    mask = masks.unstructured_mask(torch.rand(16, 8), 0.25)
    masks.set_mask(net, "0.weight", mask)
    assert torch.all(net[0].weight[mask == 0] == 0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
        # the optimiser revived masked weights; the next forward (pre-hook) zeroes them again
        net(torch.randn(1, 8))
        assert torch.all(net[0].weight[mask == 0] == 0)
    opt.step()
    masks.enforce(net)
    assert torch.all(net[0].weight[mask == 0] == 0)
    assert masks.sparsity(net) == {"0.weight": pytest.approx(0.75)}


def test_two_forwards_before_one_backward_still_work():
    net = _net()
    masks.set_mask(net, "0.weight", masks.unstructured_mask(torch.rand(16, 8), 0.5))
    loss = net(torch.randn(2, 8)).sum() + net(torch.randn(2, 8)).sum()
    loss.backward()  # the pre-hook did not write in place between the two forwards
    assert net[0].weight.grad is not None


def test_state_dict_round_trip_restores_masks_into_a_fresh_model():
    net = _net()
    mask = masks.nm_mask(torch.rand(4, 16), 2, 4)
    masks.set_mask(net, "2.weight", mask)
    sd = net.state_dict()
    assert "2.weight_mask" in sd
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = _net()
    with torch.no_grad():
        fresh[2].weight.fill_(1.0)
    masks.load_masked_state_dict(fresh, loaded)
    assert torch.equal(masks.get_masks(fresh)["2.weight"], mask)
    assert torch.equal(fresh[2].weight, net[2].weight)
    # still enforced after loading: revive and run
    with torch.no_grad():
        fresh[2].weight.add_(1.0)
    fresh(torch.randn(1, 8))
    assert masks.check_nm(fresh[2].weight, 2, 4)


def test_deepcopy_keeps_masks_and_hooks():
    net = _net()
    masks.set_mask(net, "0.weight", masks.unstructured_mask(torch.rand(16, 8), 0.5))
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin[0].weight.fill_(1.0)
    twin(torch.randn(1, 8))
    assert int((twin[0].weight == 0).sum()) == 64
    assert int((net[0].weight == 0).sum()) == 64  # the original is independent


def test_bake_removes_buffers_and_hooks_keeps_zeros():
    net = _net()
    masks.set_mask(net, "0.weight", masks.unstructured_mask(torch.rand(16, 8), 0.5))
    baked = masks.bake(net)
    assert not masks.get_masks(baked)
    assert all(not k.endswith("_mask") for k in baked.state_dict())
    assert not any(isinstance(h, masks.MaskHook)
                   for m in baked.modules() for h in m._forward_pre_hooks.values())
    assert int((baked[0].weight == 0).sum()) == 64
    assert masks.get_masks(net)  # the source keeps its masks
    x = torch.randn(3, 8)
    assert torch.allclose(baked(x), net(x))


def test_attention_out_proj_mask_is_enforced_through_the_parent():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    masks.set_mask(mha, "out_proj.weight", masks.unstructured_mask(torch.rand(16, 16), 0.5))
    masks.set_mask(mha, "in_proj_weight", masks.nm_mask(torch.rand(48, 16), 2, 4))
    with torch.no_grad():
        mha.out_proj.weight.fill_(1.0)
        mha.in_proj_weight.fill_(1.0)
    x = torch.randn(2, 5, 16)
    mha(x, x, x)  # out_proj is never called as a module; the parent's hook zeroes it
    assert int((mha.out_proj.weight == 0).sum()) == 128
    assert masks.check_nm(mha.in_proj_weight, 2, 4)


def test_set_mask_rejects_bad_shapes_and_paths():
    net = _net()
    with pytest.raises(InvalidInputError, match="shape"):
        masks.set_mask(net, "0.weight", torch.ones(3, 3))
    with pytest.raises(InvalidInputError, match="not a parameter"):
        masks.set_mask(net, "0.nothing", torch.ones(16, 8))
