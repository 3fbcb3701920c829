"""Fine-tuner: masks kept, gradual schedule, distillation formula, checkpoints, rewind, DDP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autoprune import masks
from autoprune._finetune import (
    GradualSchedule,
    PruningCallback,
    cubic_sparsity,
    distillation_loss,
    evaluate_accuracy,
    finetune,
)
from autoprune.errors import InvalidInputError


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def _data(n: int = 256, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 12, generator=g)
    y = (x[:, 0].mean(-1) > 0).long() + 2 * (x[:, 1].mean(-1) > 0).long()
    return TensorDataset(x, y)


def _loader(shuffle: bool = False, n: int = 256) -> DataLoader:
    return DataLoader(_data(n), batch_size=32, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(1) if shuffle else None)


def _is_nm(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    from autoprune.masks import check_nm

    return check_nm(w, n, m)


def _install_masks(model: nn.Sequential) -> None:
    conv, lin = model[3], model[8]
    # 2:4 along the inputs of conv 2, 70% unstructured on the classifier
    masks.set_mask(model, "3.weight", masks.nm_mask(conv.weight.detach().abs(), 2, 4))
    masks.set_mask(model, "8.weight", masks.unstructured_mask(lin.weight.detach().abs(),
                                                              sparsity=0.7))


def test_masks_survive_steps_and_save_load(tmp_path):
    model = _net()
    _install_masks(model)
    zeros_before = (model[8].weight == 0).sum().item()
    res = finetune(model, _loader(shuffle=True), epochs=2, lr=0.1, progress=False)
    assert res.steps_run == 16
    conv, lin = model[3], model[8]
    assert _is_nm(conv.weight.detach())
    assert torch.all(lin.weight[lin.weight_mask == 0] == 0)
    assert (lin.weight == 0).sum().item() == zeros_before == round(0.7 * lin.weight.numel())
    # weights did move (the test would pass trivially with lr=0)
    assert res.history["train_loss"].notna().all()
    # save/load: masks are buffers in the state dict; a fresh model with masks reloads it
    from autoprune.io import atomic_torch_save, safe_torch_load

    atomic_torch_save(model.state_dict(), tmp_path / "w.pt")
    fresh = _net()
    _install_masks(fresh)
    fresh.load_state_dict(safe_torch_load(tmp_path / "w.pt"))
    fresh.eval(), model.eval()
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(fresh(x), model(x))
    assert torch.equal(fresh[8].weight_mask, lin.weight_mask)


def test_cubic_schedule_values():
    assert cubic_sparsity(0, 0.8, 0, 100) == 0.0
    assert cubic_sparsity(100, 0.8, 0, 100) == pytest.approx(0.8)
    assert cubic_sparsity(50, 0.8, 0, 100) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert cubic_sparsity(500, 0.8, 0, 100) == pytest.approx(0.8)


def test_gradual_schedule_hits_targets_at_the_end():
    model = _net()
    sched = GradualSchedule(targets={"3": (2, 4), "8": 0.75, "0": 0.5}, update_every=4)
    res = finetune(model, _loader(), steps=40, lr=0.05, gradual=sched, progress=False,
                   val_loader=_loader(n=64))
    lin, conv0 = model[8], model[0]
    assert (lin.weight == 0).sum().item() == round(0.75 * lin.weight.numel())
    assert (conv0.weight == 0).sum().item() == round(0.5 * conv0.weight.numel())
    assert _is_nm(model[3].weight.detach())
    assert (model[3].weight == 0).float().mean().item() == pytest.approx(0.5)
    # sparsity rose over training, monotonically, and was below the target early on
    s = res.history["masked_sparsity"].tolist()
    assert s == sorted(s) and s[0] < s[-1]
    assert res.final_sparsity == pytest.approx(s[-1])


def test_gradual_from_dict_and_bad_keys():
    with pytest.raises(InvalidInputError, match="unknown gradual schedule keys"):
        finetune(_net(), _loader(), steps=2, gradual={"target": {"8": 0.5}}, progress=False)
    with pytest.raises(InvalidInputError, match="not a module with a weight"):
        finetune(_net(), _loader(), steps=2, gradual={"targets": {"nope": 0.5}}, progress=False)


def test_distillation_loss_matches_documented_formula():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    T, w = 3.0, 0.3
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    expected = (1 - w) * F.cross_entropy(s, y) + w * T * T * kl
    got = distillation_loss(s, t, y, temperature=T, weight=w)
    torch.testing.assert_close(got, expected)
    # weight 0 is plain cross-entropy; identical logits give zero soft loss
    torch.testing.assert_close(distillation_loss(s, t, y, weight=0.0), F.cross_entropy(s, y))
    assert distillation_loss(s, s, None).abs().item() < 1e-6


def test_teacher_changes_training():
    teacher = _net().eval()
    a, b = _net(), _net()
    b.load_state_dict(a.state_dict())
    finetune(a, _loader(), steps=6, lr=0.05, progress=False)
    finetune(b, _loader(), steps=6, lr=0.05, progress=False, teacher=teacher, kd_weight=0.9)
    assert not torch.allclose(a[8].weight, b[8].weight)
    # teacher is left untouched and frozen
    assert all(not p.requires_grad for p in teacher.parameters())


class _Interrupt(Exception):
    pass


class _DyingLoader:
    """Yields the wrapped loader's batches, raising after ``die_after`` batches in total."""

    def __init__(self, loader: DataLoader, die_after: int) -> None:
        self.loader, self.die_after, self.seen = loader, die_after, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for b in self.loader:
            if self.seen >= self.die_after:
                raise _Interrupt
            self.seen += 1
            yield b


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    torch.manual_seed(0)
    ref = _net()
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    finetune(ref, _loader(), epochs=3, lr=0.05, progress=False)

    model = _net()
    model.load_state_dict(init)
    with pytest.raises(_Interrupt):  # dies inside epoch 2 (after 8 + 3 batches)
        finetune(model, _DyingLoader(_loader(), 11), epochs=3, lr=0.05, progress=False,
                 checkpoint_dir=tmp_path)
    assert (tmp_path / "finetune_last.pt").exists()
    resumed = _net()
    resumed.load_state_dict(init)
    res = finetune(resumed, _loader(), epochs=3, lr=0.05, progress=False, checkpoint_dir=tmp_path)
    assert res.resumed_from_step == 8
    assert res.steps_run == 24
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, msg=k)


def test_early_stopping_and_restore_best():
    values = iter([0.5, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    snapshots = []

    def metric(m: nn.Module) -> float:
        snapshots.append(m[8].weight.detach().clone())
        return next(values)

    model = _net()
    res = finetune(model, _loader(), epochs=7, lr=0.05, val_metric=metric,
                   early_stopping_patience=2, progress=False)
    assert res.stopped_early
    assert len(res.history) == 4  # epochs 0..3, stopped after two bad epochs
    assert res.best_metric == 0.9 and res.best_step == 16
    torch.testing.assert_close(model[8].weight, snapshots[1])


def test_rewind_resets_and_retrains_with_final_masks():
    model = _net()
    sched = GradualSchedule(targets={"8": 0.6}, end_step=8, update_every=2)
    res = finetune(model, _loader(), steps=16, lr=0.05, gradual=sched, rewind=4, progress=False)
    assert set(res.history["phase"]) == {"train", "rewind"}
    assert res.steps_run == 16
    lin = model[8]
    assert (lin.weight == 0).sum().item() == round(0.6 * lin.weight.numel())
    assert torch.all(lin.weight[lin.weight_mask == 0] == 0)


def test_bn_l1_shrinks_gammas():
    a, b = _net(), _net()
    b.load_state_dict(a.state_dict())
    finetune(a, _loader(), steps=16, lr=0.05, progress=False)
    finetune(b, _loader(), steps=16, lr=0.05, progress=False, bn_l1=0.05)

    def gsum(m: nn.Module) -> float:
        return sum(x.weight.abs().sum().item() for x in m.modules()
                   if isinstance(x, nn.BatchNorm1d))

    assert gsum(b) < gsum(a) - 0.5


def test_callback_in_own_loop():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cb = PruningCallback(model, gradual={"targets": {"8": 0.5}, "update_every": 2},
                         total_steps=16)
    cb.on_train_begin()
    for _ in range(2):
        for x, y in _loader():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            cb.on_step_end()
    assert (model[8].weight == 0).sum().item() == round(0.5 * model[8].weight.numel())
    assert evaluate_accuracy(model, _loader(n=64)) >= 0.0


def test_bad_arguments():
    with pytest.raises(InvalidInputError, match="optimizer"):
        finetune(_net(), _loader(), steps=1, optimizer="adam", progress=False)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="kd_weight"):
        finetune(_net(), _loader(), steps=1, kd_weight=2.0, progress=False)
    with pytest.raises(InvalidInputError, match="early_stopping_patience"):
        finetune(_net(), _loader(), steps=1, early_stopping_patience=1, progress=False)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _net()
    _install_masks(model)
    res = finetune(model, _loader(), epochs=1, lr=0.05, progress=False,
                   checkpoint_dir=out)  # both ranks pass it; only rank 0 writes
    torch.save({"w": model[8].weight.detach(), "steps": res.steps_run}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_process_gloo_ddp(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # each rank saw half the data (DistributedSampler) and DDP kept the weights identical
    assert r0["steps"] == r1["steps"] == math.ceil(128 / 32)
    torch.testing.assert_close(r0["w"], r1["w"])
    assert (r0["w"] == 0).sum().item() == round(0.7 * r0["w"].numel())
    assert (tmp_path / "finetune_last.pt").exists()
