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
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    a, b = _net(), _net()
    b.load_state_dict(a.state_dict())
    finetune(a, _loader(), steps=6, lr=0.05, progress=False)
    finetune(b, _loader(), steps=6, lr=0.05, progress=False, teacher=teacher, kd_weight=0.9)
    assert not torch.allclose(a[8].weight, b[8].weight)
    # the teacher is left untouched: same weights and statistics, still trainable (freezing it
    # made a user's dense model untrainable after it had taught once), its mode restored
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in teacher.parameters()) and not teacher.training
    trained = _net().train()
    finetune(_net(), _loader(), steps=2, progress=False, teacher=trained)
    assert trained.training
    finetune(trained, _loader(), steps=2, progress=False)  # the former teacher trains


class _Interrupt(Exception):
    pass


class _DyingLoader(DataLoader):
    """The wrapped loader's batches (same dataset and batch size, unshuffled), raising after
    ``die_after`` batches in total. A DataLoader, so BatchNorm recalibration re-reads its
    dataset (a seeded shuffle) without counting towards ``die_after``."""

    def __init__(self, loader: DataLoader, die_after: int) -> None:
        super().__init__(loader.dataset, batch_size=loader.batch_size, shuffle=False)
        self.die_after, self.seen = die_after, 0

    def __iter__(self):
        for b in super().__iter__():
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


# --- Trainer, callbacks, config, state -----------------------------------------------------

from autoprune._finetune import (  # noqa: E402
    Callback,
    Checkpoint,
    EarlyStopping,
    FinetuneConfig,
    GradualPruning,
    MaskEnforcer,
    Rewind,
    Trainer,
    TrainState,
)
from autoprune.errors import CorruptFileError  # noqa: E402


class _Recorder(Callback):
    """Records every hook with the phase and step it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def _log(self, hook: str, trainer) -> None:  # noqa: ANN001
        self.calls.append((hook, trainer.state.phase, trainer.state.step))

    def on_train_begin(self, trainer=None):  # noqa: ANN001, ANN201
        self._log("train_begin", trainer)

    def on_phase_begin(self, trainer):  # noqa: ANN001, ANN201
        self._log("phase_begin", trainer)

    def on_step_end(self, trainer=None):  # noqa: ANN001, ANN201
        self._log("step", trainer)

    def on_epoch_end(self, trainer=None):  # noqa: ANN001, ANN201
        self._log("epoch", trainer)

    def on_phase_end(self, trainer):  # noqa: ANN001, ANN201
        self._log("phase_end", trainer)

    def on_train_end(self, trainer=None):  # noqa: ANN001, ANN201
        self._log("train_end", trainer)


def test_trainer_calls_callbacks_in_order():
    rec = _Recorder()
    cfg = FinetuneConfig(steps=12, lr=0.05, rewind=5, progress=False)
    res = Trainer(_net(), _loader(), cfg, callbacks=[rec]).fit()  # 8 batches per epoch
    train = ([("step", "train", s) for s in range(1, 9)] + [("epoch", "train", 8)]
             + [("step", "train", s) for s in range(9, 13)] + [("epoch", "train", 12)])
    rewind = ([("step", "rewind", s) for s in range(6, 13)] + [("epoch", "rewind", 12)])
    assert rec.calls == (
        [("train_begin", "train", 0), ("phase_begin", "train", 0)] + train
        + [("phase_end", "train", 12), ("phase_begin", "rewind", 5)] + rewind
        + [("phase_end", "rewind", 12), ("train_end", "rewind", 12)]
    )
    assert res.history[["phase", "epoch", "step"]].values.tolist() == [
        ["train", 0, 8], ["train", 1, 12], ["rewind", 0, 12]]


def test_builtin_callbacks_run_before_the_users_and_checkpoint_last(tmp_path):
    cfg = FinetuneConfig(steps=2, checkpoint_dir=tmp_path, rewind=1, progress=False)
    trainer = Trainer(_net(), _loader(), cfg, val_loader=_loader(n=32), callbacks=[_Recorder()])
    trainer.fit()
    assert [type(c).__name__ for c in trainer.callbacks] == [
        "MaskEnforcer", "EarlyStopping", "Rewind", "_Recorder", "Checkpoint"]
    with pytest.raises(InvalidInputError, match="one Checkpoint, as the last callback"):
        Trainer(_net(), _loader(), cfg, callbacks=[Checkpoint(tmp_path / "b")]).fit()
    with pytest.raises(InvalidInputError, match="one Checkpoint, as the last callback"):
        Trainer(_net(), _loader(), FinetuneConfig(steps=2, progress=False),
                callbacks=[Checkpoint(tmp_path / "c"), _Recorder()]).fit()


@pytest.mark.parametrize(("options", "match"), [
    ({"epochs": 0}, r"epochs must be an int >= 1.*got 0"),
    ({"epochs": 2.5}, r"epochs must be an int"),
    ({"steps": 0}, r"steps must be an int >= 1 or None, got 0"),
    ({"lr": 0.0}, r"lr must be a finite number > 0, got 0.0"),
    ({"lr": float("nan")}, r"lr must be a finite number > 0, got nan"),
    ({"optimizer": "adam"}, r"unknown optimizer 'adam'; allowed: sgd, adamw"),
    ({"weight_decay": -1e-4}, r"weight_decay must be a finite number >= 0"),
    ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\), got 1.0"),
    ({"warmup_steps": -1}, r"warmup_steps must be an int >= 0, got -1"),
    ({"kd_temperature": 0}, r"kd_temperature must be a finite number > 0, got 0"),
    ({"kd_weight": 2.0}, r"kd_weight must be a number in \[0, 1\], got 2.0"),
    ({"early_stopping_patience": 0}, r"early_stopping_patience must be an int >= 1 or None"),
    ({"restore_best": "yes"}, r"restore_best must be True or False, got 'yes'"),
    ({"checkpoint_dir": 3}, r"checkpoint_dir must be a directory path"),
    ({"gradual": {"target": {}}}, r"unknown gradual schedule keys \['target'\]"),
    ({"gradual": {"update_every": 0}}, r"update_every must be an int >= 1, got 0"),
    ({"gradual": [1, 2]}, r"gradual must be a GradualSchedule or a dict, got list"),
    ({"rewind": -2}, r"rewind must be an int >= 0.*got -2"),
    ({"bn_l1": -0.1}, r"bn_l1 must be a finite number >= 0, got -0.1"),
    ({"device": "gpu7"}, r"device must be a torch device.*got 'gpu7'"),
    ({"seed": "0"}, r"seed must be an int, got '0'"),
    ({"progress": 1}, r"progress must be True or False, got 1"),
])
def test_config_rejects_bad_values_naming_them(options, match):
    with pytest.raises(InvalidInputError, match=match):
        FinetuneConfig(**options)


def test_config_from_dict_and_defaults():
    cfg = FinetuneConfig.from_dict({"steps": 5, "gradual": {"targets": {"8": 0.5}},
                                    "checkpoint_dir": "ck"})
    assert isinstance(cfg.gradual, GradualSchedule) and cfg.gradual.targets == {"8": 0.5}
    assert str(cfg.checkpoint_dir) == "ck" and cfg.epochs == 3 and cfg.optimizer == "sgd"
    with pytest.raises(InvalidInputError, match=r"unknown fine-tuning options \['lr_max'\]"):
        FinetuneConfig.from_dict({"lr_max": 1.0})
    # steps= makes epochs irrelevant, so epochs=0 is fine with it (as finetune always allowed)
    assert FinetuneConfig(epochs=0, steps=3).steps == 3


def test_train_state_round_trips_through_a_checkpoint_file(tmp_path):
    from autoprune._finetune import EpochLog
    from autoprune.io import atomic_torch_save, safe_torch_load

    state = TrainState(phase="rewind", step=7, epoch=1, stop_requested=True, stopped_early=True,
                       history=[EpochLog("train", 0, 4, 0.01, 1.5, None, 0.25),
                                EpochLog("rewind", 0, 7, 0.002, 0.5, 0.75, 0.5)])
    atomic_torch_save({"state": state.to_dict()}, tmp_path / "s.pt")
    back = TrainState.from_dict(safe_torch_load(tmp_path / "s.pt")["state"])
    assert back == state
    with pytest.raises(InvalidInputError, match=r"lacks \['done'\]"):
        TrainState.from_dict({k: v for k, v in state.to_dict().items() if k != "done"})
    with pytest.raises(InvalidInputError, match="'step' is '7', not a int"):
        TrainState.from_dict({**state.to_dict(), "step": "7"})


class _Die(Callback):
    """Raises after ``at`` optimiser steps in total (a crash in the middle of an epoch)."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def on_step_end(self, trainer=None):  # noqa: ANN001, ANN201
        self.seen += 1
        if self.seen >= self.at:
            raise _Interrupt


def _full_run(tmp_path, die_at: int | None = None):  # noqa: ANN202
    """Gradual 2:4 + 60% unstructured, rewinding to step 3, early-stopping bookkeeping, a
    shuffled loader with its own generator: every piece of state a checkpoint must carry."""
    torch.manual_seed(0)
    model = _net()
    loader = _loader(shuffle=True)
    cfg = FinetuneConfig(steps=20, lr=0.05, rewind=3, checkpoint_dir=tmp_path, progress=False,
                         gradual={"targets": {"3": (2, 4), "8": 0.6}, "update_every": 2,
                                  "end_step": 10},
                         early_stopping_patience=5)
    extra = [_Die(die_at)] if die_at is not None else []
    res = Trainer(model, loader, cfg, val_loader=_loader(n=64), callbacks=extra).fit()
    return model, res


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    ref_model, ref = _full_run(tmp_path / "ref")
    assert set(ref.history["phase"]) == {"train", "rewind"}
    # 20 train steps, then 17 rewind steps: die inside the rewind phase's second epoch
    with pytest.raises(_Interrupt):
        _full_run(tmp_path / "ck", die_at=20 + 8 + 3)
    model, res = _full_run(tmp_path / "ck")
    assert res.resumed_from_step == 3 + 8  # the rewind phase's first epoch end
    assert res.steps_run == ref.steps_run == 20
    assert res.history.equals(ref.history)
    assert (res.best_metric, res.best_step) == (ref.best_metric, ref.best_step)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k, rtol=0, atol=0)
    # and dying inside the train phase (while the schedule is still ramping) resumes too
    with pytest.raises(_Interrupt):
        _full_run(tmp_path / "ck2", die_at=11)
    model2, res2 = _full_run(tmp_path / "ck2")
    assert res2.resumed_from_step == 8
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(model2.state_dict()[k], v, msg=k, rtol=0, atol=0)


def test_checkpoint_of_other_callbacks_is_refused(tmp_path):
    Trainer(_net(), _loader(), FinetuneConfig(steps=9, rewind=2, checkpoint_dir=tmp_path,
                                              progress=False)).fit()
    with pytest.raises(CorruptFileError, match=r"callbacks \['Rewind'\] this run does not"):
        Trainer(_net(), _loader(), FinetuneConfig(steps=9, checkpoint_dir=tmp_path,
                                                  progress=False)).fit()


def test_own_loop_with_shipped_callbacks_matches_the_trainer():
    """The same callbacks in a hand-written loop (same optimiser and LR formula) give the same
    masks and weights as the built-in Trainer, bit for bit."""
    sched = {"targets": {"3": (2, 4), "8": 0.7, "0": 0.5}, "update_every": 3, "end_step": 12}
    steps, lr = 16, 0.05
    torch.manual_seed(0)
    init = _net().state_dict()

    built = _net()
    built.load_state_dict(init)
    # the hand-written loop below has no BatchNorm recalibration: off in the trainer too
    Trainer(built, _loader(), FinetuneConfig(steps=steps, lr=lr, gradual=sched, progress=False,
                                             bn_recalibration_batches=0)).fit()

    own = _net()
    own.load_state_dict(init)
    opt = torch.optim.SGD(own.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    pruning = GradualPruning(own, sched, total_steps=steps)
    pruning.on_train_begin()
    step = 0
    while step < steps:
        for x, y in _loader():
            if step >= steps:
                break
            for g in opt.param_groups:  # the documented cosine decay
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(own(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            pruning.on_step_end()
    got, want = masks.get_masks(own), masks.get_masks(built)
    assert set(got) == set(want) == {"0.weight", "3.weight", "8.weight"}
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for k, v in built.state_dict().items():
        torch.testing.assert_close(own.state_dict()[k], v, msg=k, rtol=0, atol=0)
    assert masks.check_nm(own[3].weight, 2, 4)
    assert int((own[8].weight == 0).sum()) == masks.pruned_count(own[8].weight.numel(), 0.7)


def test_mask_enforcer_in_own_loop_keeps_masks_like_the_trainer():
    torch.manual_seed(0)
    init = _net()
    _install_masks(init)
    built, own = _net(), _net()
    for m in (built, own):
        _install_masks(m)
        m.load_state_dict(init.state_dict())
    Trainer(built, _loader(), FinetuneConfig(steps=8, lr=0.1, momentum=0.0, weight_decay=0.0,
                                             progress=False, bn_recalibration_batches=0)).fit()
    opt = torch.optim.SGD(own.parameters(), lr=0.1)
    enforcer = MaskEnforcer(own)
    for i, (x, y) in enumerate(_loader()):
        for g in opt.param_groups:
            g["lr"] = 0.1 * 0.5 * (1 + math.cos(math.pi * i / 8))
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(own(x), y).backward()
        opt.step()
        enforcer()  # same as enforcer.on_step_end()
    for k, v in built.state_dict().items():
        torch.testing.assert_close(own.state_dict()[k], v, msg=k, rtol=0, atol=0)


def test_early_stopping_and_rewind_in_own_loop():
    model = _net()
    stopper = EarlyStopping(model, patience=2)
    values = [0.5, 0.9, 0.8, 0.7, 0.95]
    kept = None
    stopped_at = None
    for epoch, v in enumerate(values):
        with torch.no_grad():
            model[8].weight.add_(1.0)
        if v == 0.9:
            kept = model[8].weight.detach().clone()
        if stopper.on_epoch_end(metric=v, step=epoch):
            stopped_at = epoch
            break
    assert stopped_at == 3 and stopper.best_metric == 0.9 and stopper.best_step == 1
    stopper.on_train_end()
    torch.testing.assert_close(model[8].weight, kept)
    with pytest.raises(InvalidInputError, match="patience must be an int >= 1"):
        EarlyStopping(model, patience=0)

    rw = Rewind(model, at_step=2)
    with pytest.raises(InvalidInputError, match="never reached step 2"):
        rw.rewind()
    snap = None
    for step in range(1, 5):
        with torch.no_grad():
            model[8].weight.add_(0.5)
        if step == 2:
            snap = model[8].weight.detach().clone()
        rw.on_step_end()
    masks.set_mask(model, "8.weight", masks.unstructured_mask(model[8].weight.abs(), 0.5))
    final_mask = masks.get_masks(model)["8.weight"].clone()
    rw.rewind()
    assert torch.equal(masks.get_masks(model)["8.weight"], final_mask)
    torch.testing.assert_close(model[8].weight, snap * final_mask)


def test_rewind_step_must_fit_the_run():
    with pytest.raises(InvalidInputError, match=r"rewind step must be in \[0, 4\), got 4"):
        finetune(_net(), _loader(), steps=4, rewind=4, progress=False)


def test_bad_batches_name_the_convention():
    bad = DataLoader(TensorDataset(torch.randn(8, 4, 12)), batch_size=4)
    with pytest.raises(InvalidInputError, match=r"\(inputs, targets\).*a list of length 1"):
        finetune(_net(), bad, steps=1, progress=False)
    dict_batches = [{"inputs": x, "targets": y} for x, y in _loader()]
    res = finetune(_net(), dict_batches, steps=3, progress=False)
    assert res.steps_run == 3


def test_batchnorm_statistics_are_recalibrated_before_and_after_training():
    """A pruned model's inherited BatchNorm statistics are wrong for its new widths: finetune
    re-estimates them from the training data before the first step and after the last."""
    torch.manual_seed(0)
    data = _loader()
    xs = torch.cat([x for x, _ in data])
    want = xs.mean(dim=(0, 2))  # what BatchNorm1d(4) would see on the raw inputs
    net = nn.Sequential(nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(xs.shape[1] * xs.shape[2], 4))
    seen: list[torch.Tensor] = []

    class Spy(Callback):
        def on_phase_begin(self, trainer) -> None:  # right before the first step
            seen.append(net[0].running_mean.clone())

    with torch.no_grad():
        net[0].running_mean.fill_(100.0)
    Trainer(net, data, FinetuneConfig(steps=1, lr=1e-6, progress=False),
            callbacks=[Spy()]).fit()
    assert torch.allclose(seen[0], want, atol=0.05)  # recalibrated before the first step
    assert torch.allclose(net[0].running_mean, want, atol=0.05)
    with torch.no_grad():
        net[0].running_mean.fill_(100.0)
    finetune(net, data, steps=1, lr=1e-6, progress=False, bn_recalibration_batches=0)
    assert net[0].running_mean.min() > 50  # off: only one momentum step towards the data
    with pytest.raises(InvalidInputError, match="bn_recalibration_batches"):
        finetune(net, data, steps=1, progress=False, bn_recalibration_batches=-1)
