"""``save(blocking=False)`` on 2 FSDP2 ranks: training goes on over the default group while the
save runs (no deadlock against DCP's background work, KempnerForge#102/#104), and ``wait()``
commits a checkpoint equal, value for value, to a synchronous save of the same state."""

from __future__ import annotations

from ckptguard import CheckpointManager
from ckptguard.tools.reader import load_checkpoint, values_equal
from tests.distributed._fsdp import (
    assert_all_ranks,
    build_sharded,
    local_state,
    seed_per_rank,
    tensor_problems,
    train_sharded,
)


def test_async_save_equals_sync_save_while_training_continues(mesh, shared_tmp):
    seed_per_rank(60)
    model, optimizer, scheduler = build_sharded(mesh, with_scheduler=True)
    train_sharded(model, optimizer, scheduler, 3, first_batch=0)
    objects = {"model": model, "optimizer": optimizer, "lr_scheduler": scheduler}
    with (
        CheckpointManager(shared_tmp / "sync", **objects) as sync_mgr,
        CheckpointManager(shared_tmp / "async", **objects) as async_mgr,
    ):
        sync_dir = sync_mgr.save(3)
        saved = local_state(model, optimizer)
        async_mgr.save(3, blocking=False)
        # FSDP2 all-gathers and reduce-scatters on the default group while the save is pending;
        # the steps also overwrite the parameters and moments the save must have snapshotted.
        uninterrupted = train_sharded(model, optimizer, scheduler, 3, first_batch=3)
        async_dir = async_mgr.wait()
        async_steps = async_mgr.steps()

    problems = []
    if async_dir != sync_dir.parent.parent / "async" / sync_dir.name or async_steps != [3]:
        problems.append(
            f"wait() returned {async_dir}, steps() {async_steps}; expected step 3 committed"
        )
    sync_ckpt, async_ckpt = load_checkpoint(sync_dir), load_checkpoint(async_dir)
    if set(sync_ckpt) != set(async_ckpt):
        problems.append(
            f"keys differ: sync only {set(sync_ckpt) - set(async_ckpt)}, async only {set(async_ckpt) - set(sync_ckpt)}"
        )
    problems += [
        f"async checkpoint differs from sync at {k}"
        for k in sorted(set(sync_ckpt) & set(async_ckpt))
        if not values_equal(sync_ckpt[k], async_ckpt[k])
    ]

    fresh, fresh_opt, fresh_sched = build_sharded(mesh, seed=1, with_scheduler=True)
    with CheckpointManager(
        shared_tmp / "async", model=fresh, optimizer=fresh_opt, lr_scheduler=fresh_sched
    ) as mgr:
        mgr.load()
    problems += tensor_problems(saved, local_state(fresh, fresh_opt), "loaded from the async save")
    resumed = train_sharded(fresh, fresh_opt, fresh_sched, 3, first_batch=3)
    if resumed != uninterrupted:
        problems.append(
            f"losses after resume from the async save {resumed} != uninterrupted {uninterrupted}"
        )
    assert_all_ranks(problems)
