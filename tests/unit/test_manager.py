"""CheckpointManager, one process: every component comes back into freshly built objects.

The "resumed" side of each test builds new objects the way a restarted trainer does (other seed,
never-stepped optimizer) so that a component the manager failed to restore shows up as a
difference instead of hiding behind objects that happen to be equal already.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

from ckptguard import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointLockedError,
    CheckpointManager,
    CheckpointNotFoundError,
    StateMismatchError,
)
from ckptguard.tools.reader import load_checkpoint, values_equal
from tests._helpers import (
    Counter,
    assert_draws_equal,
    assert_model_equal,
    assert_tensors_equal,
    clone_tensors,
    make_loader,
    make_training_objects,
    optimizer_tensors,
    rng_draws,
    train_on_batches,
)

pytestmark = pytest.mark.timeout(120)


@dataclass
class Run:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    scaler: torch.amp.GradScaler
    counter: Counter
    mgr: CheckpointManager


def build_run(root, seed: int = 0, **mgr_kwargs: Any) -> Run:
    """Every kind of state the manager handles, built as a trainer builds it."""
    model, optimizer, scheduler = make_training_objects(seed)
    loader = make_loader()
    scaler = torch.amp.GradScaler("cpu")
    counter = Counter()
    mgr = CheckpointManager(
        root, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader,
        extra={"scaler": scaler, "counter": counter}, **mgr_kwargs,
    )
    return Run(model, optimizer, scheduler, loader, scaler, counter, mgr)


def advance(run: Run, it, nbatches: int) -> None:
    """Train on the next ``nbatches`` batches of ``it`` and move every extra along."""
    batches = [next(it) for _ in range(nbatches)]
    train_on_batches(run.model, run.optimizer, run.scheduler, batches)
    for x, _ in batches:
        run.counter.add(x.numel())
    run.scaler.scale(torch.tensor(1.0))  # makes the scale tensor exist, as a real step does
    run.scaler.update(new_scale=run.scaler.get_scale() / 4)


def test_every_component_round_trips_into_fresh_objects(tmp_path):
    orig = build_run(tmp_path / "ckpt")
    torch.manual_seed(0)
    it = iter(orig.loader)
    advance(orig, it, 3)
    orig.mgr.save(3)
    ref_model = clone_tensors(dict(orig.model.state_dict()))
    ref_opt = clone_tensors(optimizer_tensors(orig.optimizer))
    ref_groups = [{k: v for k, v in g.items() if k != "params"} for g in orig.optimizer.param_groups]
    ref_sched = orig.scheduler.state_dict()
    ref_scaler = orig.scaler.state_dict()
    ref_counter = orig.counter.state_dict()
    # What the uninterrupted run does next: the next batch, then draws from every RNG.
    ref_next = next(it)
    ref_draws = rng_draws()
    orig.mgr.close()

    torch.manual_seed(1234)  # a restarted process is in some other RNG state
    fresh = build_run(tmp_path / "ckpt", seed=1)
    assert len(fresh.optimizer.state) == 0, "the fresh optimizer must never have stepped"
    assert not torch.equal(fresh.model.hidden.weight, ref_model["hidden.weight"])
    assert fresh.scaler.state_dict() != ref_scaler and fresh.counter.state_dict() != ref_counter

    assert fresh.mgr.load() == 3

    assert_tensors_equal(ref_model, dict(fresh.model.state_dict()), "model")
    fresh_opt = optimizer_tensors(fresh.optimizer)
    assert {k.split(".", 1)[1] for k in fresh_opt} == {"exp_avg", "exp_avg_sq", "step"}
    assert_tensors_equal(ref_opt, fresh_opt, "optimizer")
    assert [{k: v for k, v in g.items() if k != "params"} for g in fresh.optimizer.param_groups] == ref_groups
    assert fresh.scheduler.state_dict() == ref_sched
    assert fresh.scheduler.get_last_lr() == orig.scheduler.get_last_lr()
    assert fresh.scaler.state_dict() == ref_scaler
    assert fresh.scaler.get_scale() == orig.scaler.get_scale()
    assert fresh.counter.state_dict() == ref_counter
    x, y = next(iter(fresh.loader))
    assert torch.equal(x, ref_next[0]) and torch.equal(y, ref_next[1]), "loader did not resume mid-epoch"
    assert_draws_equal(ref_draws, rng_draws())
    fresh.mgr.close()


def test_resumed_training_matches_uninterrupted(tmp_path):
    """Two more steps after load give the same losses and parameters as never stopping."""
    a = build_run(tmp_path / "a")
    torch.manual_seed(0)
    it = iter(a.loader)
    advance(a, it, 2)
    a.mgr.save(2)
    ref_losses = train_on_batches(a.model, a.optimizer, a.scheduler, [next(it), next(it)])
    a.mgr.close()

    b = build_run(tmp_path / "a", seed=7)
    b.mgr.load()
    it_b = iter(b.loader)
    losses = train_on_batches(b.model, b.optimizer, b.scheduler, [next(it_b), next(it_b)])
    assert [v.hex() for v in losses] == [v.hex() for v in ref_losses]
    assert_model_equal(a.model, b.model)
    assert_tensors_equal(optimizer_tensors(a.optimizer), optimizer_tensors(b.optimizer), "optimizer")
    b.mgr.close()


def test_load_on_empty_root_returns_zero_and_changes_nothing(tmp_path):
    model, optimizer, _ = make_training_objects()
    before = clone_tensors(dict(model.state_dict()))
    with CheckpointManager(tmp_path / "nothing", model=model, optimizer=optimizer) as mgr:
        assert mgr.steps() == []
        assert mgr.latest_step() is None
        assert mgr.load() == 0
    assert_tensors_equal(before, dict(model.state_dict()))
    assert len(optimizer.state) == 0


def test_load_picks_newest_or_the_given_step(tmp_path):
    model, optimizer, scheduler = make_training_objects()
    snapshots = {}
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           keep_last=None) as mgr:
        for step in (1, 2, 3):
            train_on_batches(model, optimizer, scheduler, [next(iter(make_loader()))])
            mgr.save(step)
            snapshots[step] = clone_tensors(dict(model.state_dict()))
        assert mgr.steps() == [1, 2, 3]
        assert mgr.latest_step() == 3

    m2, o2, s2 = make_training_objects(seed=5)
    with CheckpointManager(tmp_path, model=m2, optimizer=o2, lr_scheduler=s2, keep_last=None) as mgr:
        assert mgr.load(step=2) == 2
        assert_tensors_equal(snapshots[2], dict(m2.state_dict()))
        assert s2.last_epoch == 2
        assert mgr.load() == 3
        assert_tensors_equal(snapshots[3], dict(m2.state_dict()))


def test_missing_step_names_the_available_ones(tmp_path):
    model, optimizer, _ = make_training_objects()
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, keep_last=None) as mgr:
        mgr.save(10)
        mgr.save(20)
        with pytest.raises(CheckpointNotFoundError) as err:
            mgr.load(step=15)
    msg = str(err.value)
    assert "15" in msg and "[10, 20]" in msg and str(tmp_path) in msg


def test_missing_step_on_empty_root_says_none(tmp_path):
    model, optimizer, _ = make_training_objects()
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        with pytest.raises(CheckpointNotFoundError, match="none"):
            mgr.load(step=1)


def test_async_save_writes_the_same_checkpoint_as_sync(tmp_path):
    run = build_run(tmp_path / "sync")
    torch.manual_seed(0)
    it = iter(run.loader)
    advance(run, it, 3)
    sync_path = run.mgr.save(3)
    run.mgr.close()
    mgr_async = CheckpointManager(
        tmp_path / "async", model=run.model, optimizer=run.optimizer, lr_scheduler=run.scheduler,
        dataloader=run.loader, extra={"scaler": run.scaler, "counter": run.counter},
    )
    returned = mgr_async.save(3, blocking=False)
    assert mgr_async.wait() == returned
    assert mgr_async.steps() == [3]
    assert mgr_async.wait() is None  # nothing pending any more
    mgr_async.close()

    a = load_checkpoint(sync_path)
    b = load_checkpoint(returned)
    assert set(a) == set(b)
    assert any(k.startswith("optimizer.state.") and k.endswith("exp_avg") for k in a)
    bad = [k for k in a if not values_equal(a[k], b[k])]
    assert not bad, f"async and sync checkpoints differ in {bad}"


def test_async_save_then_training_does_not_leak_into_the_checkpoint(tmp_path):
    """The async snapshot is the state at ``save``; later steps do not change it."""
    run = build_run(tmp_path / "ckpt")
    torch.manual_seed(0)
    it = iter(run.loader)
    advance(run, it, 2)
    ref_model = clone_tensors(dict(run.model.state_dict()))
    ref_opt = clone_tensors(optimizer_tensors(run.optimizer))
    run.mgr.save(2, blocking=False)
    advance(run, it, 2)  # keeps training while the save may still be writing
    run.mgr.wait()
    run.mgr.close()

    fresh = build_run(tmp_path / "ckpt", seed=3)
    assert fresh.mgr.load() == 2
    assert_tensors_equal(ref_model, dict(fresh.model.state_dict()), "model")
    assert_tensors_equal(ref_opt, optimizer_tensors(fresh.optimizer), "optimizer")
    fresh.mgr.close()


def test_next_save_and_load_finish_a_pending_async_save(tmp_path):
    model, optimizer, scheduler = make_training_objects()
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, keep_last=None) as mgr:
        mgr.save(1, blocking=False)
        mgr.save(2, blocking=False)  # waits for step 1 first
        assert 1 in mgr.steps()
        assert mgr.load() == 2  # waits for step 2
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        mgr.save(3, blocking=False)
    # close() finished it
    assert (tmp_path / "step-00000003" / "ckptguard.json").is_file()


def test_save_of_existing_step_needs_overwrite(tmp_path):
    model, optimizer, scheduler = make_training_objects()
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        train_on_batches(model, optimizer, scheduler, [next(iter(make_loader()))])
        mgr.save(5)
        first = clone_tensors(dict(model.state_dict()))
        train_on_batches(model, optimizer, scheduler, [next(iter(make_loader()))])
        with pytest.raises(CheckpointExistsError) as err:
            mgr.save(5)
        assert "step-00000005" in str(err.value) and "overwrite=True" in str(err.value)
        assert mgr.steps() == [5]
        second = clone_tensors(dict(model.state_dict()))
        mgr.save(5, overwrite=True)
        assert mgr.steps() == [5]
    assert not any(p.name.startswith(".") and "step" in p.name for p in tmp_path.iterdir())

    m2, o2, _ = make_training_objects(seed=9)
    with CheckpointManager(tmp_path, model=m2, optimizer=o2) as mgr:
        assert mgr.load() == 5
    assert_tensors_equal(second, dict(m2.state_dict()))
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_refused_save_keeps_the_checkpoint_loadable(tmp_path):
    model, optimizer, scheduler = make_training_objects()
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        train_on_batches(model, optimizer, scheduler, [next(iter(make_loader()))])
        mgr.save(5)
        saved = clone_tensors(dict(model.state_dict()))
        train_on_batches(model, optimizer, scheduler, [next(iter(make_loader()))])
        with pytest.raises(CheckpointExistsError):
            mgr.save(5)
    m2, o2, _ = make_training_objects(seed=9)
    with CheckpointManager(tmp_path, model=m2, optimizer=o2) as mgr:
        assert mgr.load() == 5
    assert_tensors_equal(saved, dict(m2.state_dict()))


def test_keep_last_zero_is_rejected(tmp_path):
    model, optimizer, _ = make_training_objects()
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, model=model, optimizer=optimizer, keep_last=0)
    # and nothing was created or locked: a valid manager opens the same root
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, keep_last=1):
        pass


def test_second_writer_on_the_same_root_is_refused(tmp_path):
    """The lock belongs to writers: a second manager may be built (it could be a reader), but
    its first save is refused while the first manager is a live writer."""
    model, optimizer, _ = make_training_objects()
    first = CheckpointManager(tmp_path, model=model, optimizer=optimizer)
    second = CheckpointManager(tmp_path, model=model, optimizer=optimizer)
    first.save(1)
    with pytest.raises(CheckpointLockedError, match="locked"):
        second.save(2)
    assert first.steps() == [1]
    second.close()
    first.close()
    first.close()  # idempotent
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer):
        pass


def test_closed_manager_refuses_work(tmp_path):
    model, optimizer, _ = make_training_objects()
    mgr = CheckpointManager(tmp_path, model=model, optimizer=optimizer)
    mgr.close()
    with pytest.raises(CheckpointError, match="closed"):
        mgr.save(1)
    with pytest.raises(CheckpointError, match="closed"):
        mgr.load()


def test_checkpoint_without_a_component_the_manager_expects_is_refused(tmp_path):
    model, optimizer, scheduler = make_training_objects()
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        mgr.save(1)
    m2, o2, s2 = make_training_objects(seed=2)
    with CheckpointManager(tmp_path, model=m2, optimizer=o2, lr_scheduler=s2) as mgr:
        with pytest.raises(StateMismatchError, match="lr_scheduler"):
            mgr.load()


def test_model_of_another_shape_is_a_state_mismatch(tmp_path):
    from ckptguard.demo import TinyLM, build_optimizer

    model, optimizer, _ = make_training_objects()
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer) as mgr:
        mgr.save(1)
    other = TinyLM(dim=16)
    with CheckpointManager(tmp_path, model=other, optimizer=build_optimizer(other)) as mgr:
        with pytest.raises(StateMismatchError, match="step-00000001"):
            mgr.load()
    assert (tmp_path / "step-00000001" / "ckptguard.json").is_file()
