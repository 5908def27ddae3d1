"""Fail-on-bug tests: each shows a common naive resume losing state, and ckptguard keeping it.

Every test runs the naive way first and asserts that it *does* lose the state (so the test
would catch ckptguard regressing to it), then does the same with CheckpointManager and asserts
exactness. Restoring rank 0's RNG on every rank is the distributed suite's to show.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckptguard import CheckpointManager, UnsupportedStateError
from ckptguard.core.format import rank_filename
from ckptguard.core.states.rng import WorkerRNGState
from tests._helpers import (
    assert_model_equal,
    assert_tensors_equal,
    batch,
    clone_tensors,
    make_loader,
    make_training_objects,
    optimizer_tensors,
    token_dataset,
    train_on_batches,
    train_steps,
)

pytestmark = pytest.mark.timeout(120)


def _dcp(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, no_dist=True, **kwargs)


# ------------------------------------------------------------------ (a) optimizer moments


def _naive_restore(step_dir, model, optimizer) -> None:
    """The pattern of KempnerForge#114: raw state dicts of the fresh objects as the template."""
    template = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    _dcp(dcp.load, template, checkpoint_id=step_dir)
    model.load_state_dict(template["model"])
    optimizer.load_state_dict(template["optimizer"])


@pytest.mark.parametrize("written_by", ["raw dcp.save", "CheckpointManager"])
def test_raw_optimizer_template_loads_no_moments_but_manager_does(tmp_path, written_by):
    model, optimizer, scheduler = make_training_objects()
    train_steps(model, optimizer, scheduler, 3)
    assert all(t.abs().sum() > 0 for k, t in optimizer_tensors(optimizer).items() if "exp_avg" in k)
    ref_opt = clone_tensors(optimizer_tensors(optimizer))
    lr_at_save = [g["lr"] for g in optimizer.param_groups]
    if written_by == "raw dcp.save":
        naive_dir = tmp_path / "naive"
        _dcp(dcp.save, {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
             checkpoint_id=naive_dir)
    with CheckpointManager(tmp_path / "ckpt", model=model, optimizer=optimizer) as mgr:
        step_dir = mgr.save(3)
    if written_by == "CheckpointManager":
        naive_dir = step_dir
    # what the uninterrupted run does next
    train_steps(model, optimizer, scheduler, 1, first_seed=3)

    # naive: the load "succeeds" silently and the fresh optimizer has no moments at all
    # (the next step's lr comes from the restored param_groups; the scheduler acts after it)
    m_naive, o_naive, _ = make_training_objects(seed=1)
    _naive_restore(naive_dir, m_naive, o_naive)
    assert len(o_naive.state) == 0, "the naive path was expected to drop the moments"
    assert [g["lr"] for g in o_naive.param_groups] == lr_at_save
    train_steps(m_naive, o_naive, None, 1, first_seed=3)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), m_naive.parameters(), strict=True))

    # ckptguard: every moment, and the next step, bit-exact
    m_good, o_good, _ = make_training_objects(seed=1)
    with CheckpointManager(tmp_path / "ckpt", model=m_good, optimizer=o_good) as mgr:
        mgr.load()
    assert_tensors_equal(ref_opt, optimizer_tensors(o_good), "optimizer moments")
    train_steps(m_good, o_good, None, 1, first_seed=3)
    assert_model_equal(model, m_good)


# ------------------------------------------------------------------ (b) plain DataLoader


def test_plain_dataloader_restarts_from_the_first_batch_and_is_refused(tmp_path):
    data = token_dataset()
    plain = torch.utils.data.DataLoader(data, batch_size=4)
    it = iter(plain)
    seen = [next(it) for _ in range(3)]
    expected_next = next(it)
    assert torch.equal(expected_next[0], data.tensors[0][12:16])
    # the bug: a plain loader in a new process has no idea where it was
    restarted = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert torch.equal(restarted[0], seen[0][0]) and not torch.equal(restarted[0], expected_next[0])

    model, optimizer, _ = make_training_objects()
    with pytest.raises(UnsupportedStateError) as err:
        CheckpointManager(tmp_path, model=model, optimizer=optimizer, dataloader=plain)
    assert "StatefulDataLoader" in str(err.value)

    # ckptguard with the loader it asks for: the next batch is the 4th one
    loader = make_loader(shuffle=False)
    it = iter(loader)
    for _ in range(3):
        next(it)
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, dataloader=loader) as mgr:
        mgr.save(3)
    fresh = make_loader(shuffle=False)
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, dataloader=fresh) as mgr:
        mgr.load()
    x, y = next(iter(fresh))
    assert torch.equal(x, expected_next[0]) and torch.equal(y, expected_next[1])


# ------------------------------------------------------------------ (c) RNG vs loader order


def test_rng_restored_before_the_resumed_iterator_is_shifted_by_one_draw(tmp_path):
    """Creating a DataLoader iterator draws a base seed from the torch RNG. Restore the RNG and
    then ``iter(loader)`` (the obvious order), and every later dropout mask is off by that draw."""
    torch.manual_seed(0)
    model, optimizer, _ = make_training_objects()
    loader = make_loader()
    it = iter(loader)
    for _ in range(3):
        next(it)
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, dataloader=loader) as mgr:
        step_dir = mgr.save(3)
    expected_batch = next(it)
    expected_draw = torch.rand(8)

    payload = torch.load(step_dir / rank_filename(0), weights_only=True)["states"]
    # naive order, from the very same checkpoint: loader state, RNG, then the trainer's iter()
    torch.manual_seed(1)
    naive = make_loader()
    naive.load_state_dict(payload["dataloader"])
    torch.set_rng_state(payload["rng"]["torch"])
    x, _ = next(iter(naive))
    assert torch.equal(x, expected_batch[0])  # the data position is right...
    assert not torch.equal(torch.rand(8), expected_draw), "...but the RNG was expected to shift"

    # ckptguard: load(), then the trainer's iter() as usual
    torch.manual_seed(1)
    m2, o2, _ = make_training_objects(seed=1)
    fresh = make_loader()
    with CheckpointManager(tmp_path, model=m2, optimizer=o2, dataloader=fresh) as mgr:
        mgr.load()
    x, _ = next(iter(fresh))
    assert torch.equal(x, expected_batch[0])
    assert torch.equal(torch.rand(8), expected_draw)


def test_dropout_after_resume_matches_only_with_the_right_order(tmp_path):
    """The same shift seen as a training loss: dropout masks after resume."""
    torch.manual_seed(0)
    model, optimizer, scheduler = make_training_objects()
    torch.manual_seed(0)
    loader = make_loader()
    it = iter(loader)
    train_on_batches(model, optimizer, scheduler, [next(it), next(it)])
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           dataloader=loader) as mgr:
        step_dir = mgr.save(2)
    ref = train_on_batches(model, optimizer, scheduler, [next(it), next(it)])

    payload = torch.load(step_dir / rank_filename(0), weights_only=True)["states"]
    m_naive, o_naive, s_naive = make_training_objects(seed=1)
    with CheckpointManager(tmp_path, model=m_naive, optimizer=o_naive, lr_scheduler=s_naive) as mgr:
        mgr.load()  # model/optimizer/scheduler/RNG restored; the loader by hand, afterwards
    naive = make_loader()
    naive.load_state_dict(payload["dataloader"])
    it_naive = iter(naive)
    got_naive = train_on_batches(m_naive, o_naive, s_naive, [next(it_naive), next(it_naive)])
    assert got_naive != ref

    m2, o2, s2 = make_training_objects(seed=1)
    fresh = make_loader()
    with CheckpointManager(tmp_path, model=m2, optimizer=o2, lr_scheduler=s2, dataloader=fresh) as mgr:
        mgr.load()
    it2 = iter(fresh)
    got = train_on_batches(m2, o2, s2, [next(it2), next(it2)])
    assert [v.hex() for v in got] == [v.hex() for v in ref]
    assert_model_equal(model, m2)


# ------------------------------------------------------------------ (e) LR scheduler


def test_scheduler_not_restored_gives_another_lr(tmp_path):
    model, optimizer, scheduler = make_training_objects()
    train_steps(model, optimizer, scheduler, 2)
    with CheckpointManager(tmp_path / "without", model=model, optimizer=optimizer) as mgr:
        mgr.save(2)
    with CheckpointManager(tmp_path / "with", model=model, optimizer=optimizer,
                           lr_scheduler=scheduler) as mgr:
        mgr.save(2)
    train_steps(model, optimizer, scheduler, 1, first_seed=2)
    expected_lr = [g["lr"] for g in optimizer.param_groups]

    # the optimizer's param_groups hold the current lr, so the first step looks right; the
    # fresh scheduler then steps from its own position 0 and sets a warmup lr again
    m1, o1, s1 = make_training_objects(seed=1)
    with CheckpointManager(tmp_path / "without", model=m1, optimizer=o1) as mgr:
        mgr.load()
    train_steps(m1, o1, s1, 1, first_seed=2)
    assert [g["lr"] for g in o1.param_groups] != expected_lr

    m2, o2, s2 = make_training_objects(seed=1)
    with CheckpointManager(tmp_path / "with", model=m2, optimizer=o2, lr_scheduler=s2) as mgr:
        mgr.load()
    train_steps(m2, o2, s2, 1, first_seed=2)
    assert [g["lr"] for g in o2.param_groups] == expected_lr
    assert s2.last_epoch == scheduler.last_epoch
    assert_model_equal(model, m2)


# ------------------------------------------------------------------ AMP loss scale


def test_grad_scaler_not_restored_resets_the_loss_scale(tmp_path):
    """Lightning#10766: a lost loss scale restarts at 65536 and spikes fp16 training."""
    model, optimizer, _ = make_training_objects()
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch(0)
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y))
    for _ in range(3):
        scaler.update(new_scale=scaler.get_scale() / 2)  # as after overflowing steps
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, extra={"scaler": scaler}) as mgr:
        mgr.save(1)

    naive = torch.amp.GradScaler("cpu")
    assert naive.get_scale() != scaler.get_scale()
    restored = torch.amp.GradScaler("cpu")
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, extra={"scaler": restored}) as mgr:
        mgr.load()
    assert restored.get_scale() == scaler.get_scale() == 65536.0 / 8


# ------------------------------------------------------------------ RNG inside loader workers


class AugmentedTokens(torch.utils.data.Dataset):
    """Token windows with augmentation drawn in ``__getitem__`` from python, numpy and torch."""

    def __init__(self) -> None:
        self.data = token_dataset()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int):
        import random

        import numpy as np

        x, y = self.data[idx]
        x = x.clone()
        x[random.randrange(4)] = int(np.random.randint(33))
        return x + torch.randint(0, 2, ()), y


class AugmentedTokensWithWorkerRNG(WorkerRNGState, AugmentedTokens):
    pass


def _worker_resume(tmp_path, dataset_cls, caplog):
    """Batches after a mid-epoch resume vs the uninterrupted ones, with 2 loader workers."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader():
        return StatefulDataLoader(dataset_cls(), batch_size=4, shuffle=True, num_workers=2)

    torch.manual_seed(0)
    model, optimizer, _ = make_training_objects()
    original = loader()
    it = iter(original)
    for _ in range(5):
        next(it)
    with caplog.at_level("WARNING", logger="ckptguard.core.states"):
        mgr = CheckpointManager(tmp_path, model=model, optimizer=optimizer, dataloader=original)
    mgr.save(5)
    mgr.close()
    expected = [next(it) for _ in range(4)]
    del it

    fresh = loader()
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, dataloader=fresh) as mgr:
        mgr.load()
    it = iter(fresh)
    got = [next(it) for _ in range(4)]
    del it
    return all(torch.equal(a[0], b[0]) for a, b in zip(expected, got, strict=True))


@pytest.mark.timeout(180)
def test_augmentation_in_loader_workers_needs_worker_rng_state(tmp_path, caplog):
    """StatefulDataLoader restarts its workers on resume and they reseed from the base seed:
    augmentation drawn in workers repeats the epoch's first draws. The manager warns, and
    ``WorkerRNGState`` (the dataset's per-worker state, saved by StatefulDataLoader) fixes it."""
    assert not _worker_resume(tmp_path / "plain", AugmentedTokens, caplog)
    assert "WorkerRNGState" in caplog.text and "num_workers=2" in caplog.text
    caplog.clear()
    assert _worker_resume(tmp_path / "mixin", AugmentedTokensWithWorkerRNG, caplog)
    assert "WorkerRNGState" not in caplog.text
