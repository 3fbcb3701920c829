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
    with pytest.raises(InvalidInputError, match="0 < n < m"):
        masks.nm_mask(w, 4, 4)


@pytest.mark.parametrize("keep_ratio", [0.0, 0.1, 0.37, 0.5, 0.999, 1.0])
def test_unstructured_mask_exact_count_even_with_ties(keep_ratio):
    scores = torch.tensor([0.0] * 40 + [1.0] * 30 + list(range(2, 32)), dtype=torch.float32)
    m = masks.unstructured_mask(scores.reshape(10, 10), keep_ratio)
    assert int((m == 0).sum()) == round(100 * (1 - keep_ratio))


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
