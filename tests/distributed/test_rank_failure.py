"""A rank that fails during a 2-rank save: no checkpoint is committed, every rank is told.

Run with ``torchrun --nproc_per_node=2 -m pytest tests/distributed/test_rank_failure.py``.
One rank raises ``OSError(ENOSPC)`` at a phase of a save (``ckptguard.testing.faults``, armed on both
ranks, firing on one); both ranks must raise the same ``CommitError`` naming the failing rank,
promptly (not after ``commit_timeout_s``, not by hanging in a collective the failed rank never
joins), the previous checkpoint must stay the newest and intact, and the next save must work.
A rank *killed* mid-save is covered by ``tests/e2e/test_kill.py`` (2 ranks under torchrun).
"""

from __future__ import annotations

import logging

import pytest
import torch.distributed as dist

from ckptguard import CheckpointCorruptError, CheckpointManager, CommitError
from ckptguard.core.commit import CheckpointLayout
from ckptguard.testing import faults
from tests.distributed._fsdp import (
    assert_all_ranks,
    build_sharded,
    local_state,
    seed_per_rank,
    tensor_problems,
    train_sharded,
)

pytestmark = pytest.mark.timeout(600)

# (point, failing rank, modes). A non-coordinator failing while writing, and the coordinator
# failing while writing DCP's metadata or committing.
CASES = [
    ("partial_created", 1, ("sync", "async")),
    ("rank_file_written", 1, ("sync", "async")),
    ("dcp_write", 1, ("sync", "async")),
    ("dcp_done", 1, ("sync", "async")),
    # async: the record is durable before the fault, so rank 0 may rightly commit; sync only
    ("done_record_written", 1, ("sync",)),
    ("dcp_metadata", 0, ("sync", "async")),
    ("commit_start", 0, ("sync", "async")),
    ("manifest_written", 0, ("sync", "async")),
]
PARAMS = [(p, r, m) for p, r, modes in CASES for m in modes]


@pytest.mark.parametrize("point,bad_rank,mode", PARAMS, ids=[f"{p}-rank{r}-{m}" for p, r, m in PARAMS])
def test_one_rank_failing_mid_save_commits_nothing(mesh, shared_tmp, point, bad_rank, mode):
    seed_per_rank(0)
    model, optimizer, scheduler = build_sharded(mesh, seed=0, with_scheduler=True)
    # Far above this test's needs: if the failure were not passed on, rank 0 would sit out
    # this timeout and the message would say "did not finish" instead of naming the cause.
    mgr = CheckpointManager(
        shared_tmp, model=model, optimizer=optimizer, lr_scheduler=scheduler, commit_timeout_s=300
    )
    blocking = mode == "sync"
    train_sharded(model, optimizer, scheduler, 1, first_batch=0)
    mgr.save(1, blocking=blocking)
    mgr.wait()
    at_1 = local_state(model, optimizer)
    train_sharded(model, optimizer, scheduler, 1, first_batch=1)

    problems: list[str] = []
    with faults.injected(f"{point}:rank={bad_rank}:action=raise"):
        try:
            mgr.save(2, blocking=blocking)
            mgr.wait()
            problems.append("save(2) succeeded although a rank failed")
        except CommitError as e:
            msg = str(e)
            if "No space left on device" not in msg or f"rank {bad_rank}" not in msg:
                problems.append(f"the error does not name rank {bad_rank} and its cause: {msg}")
            if "did not finish writing" in msg:
                problems.append(f"rank 0 waited for the timeout instead of being told: {msg}")
    steps = mgr.steps()
    if steps != [1]:
        problems.append(f"complete steps after the failed save: {steps}, expected [1]")

    # the next save, with the fault gone, succeeds and cleans up
    mgr.save(2, blocking=blocking)
    mgr.wait()
    dist.barrier()
    if mgr.steps() != [1, 2]:
        problems.append(f"after a good save: {mgr.steps()}, expected [1, 2]")
    leftovers = CheckpointLayout(shared_tmp).transient_dirs()
    if leftovers:
        problems.append(f"leftovers: {leftovers}")

    # the checkpoint that was the newest during the failure is intact
    train_sharded(model, optimizer, scheduler, 1, first_batch=2)
    mgr.load(1)
    problems += tensor_problems(at_1, local_state(model, optimizer), "step 1 after the failure")
    mgr.close()
    assert_all_ranks(problems)


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_damage_seen_by_one_rank_fails_both_and_fallback_is_agreed(mesh, shared_tmp, caplog, verify):
    """Rank 1's own file of the newest checkpoint is damaged. Without checksums only rank 1
    notices, while reading it: both ranks must still raise (a rank going on alone would hang in
    the next collective), and ``fallback=True`` must bring both back to the same older step."""
    seed_per_rank(0)
    model, optimizer, scheduler = build_sharded(mesh, seed=0, with_scheduler=True)
    mgr = CheckpointManager(
        shared_tmp, model=model, optimizer=optimizer, lr_scheduler=scheduler, keep_last=None,
        verify_on_load=verify,
    )
    train_sharded(model, optimizer, scheduler, 1, first_batch=0)
    mgr.save(1)
    at_1 = local_state(model, optimizer)
    train_sharded(model, optimizer, scheduler, 1, first_batch=1)
    mgr.save(2)
    dist.barrier()
    if dist.get_rank() == 0:
        path = shared_tmp / "step-00000002" / "rank-00001.pt"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    dist.barrier()

    problems: list[str] = []
    try:
        mgr.load()
        problems.append("load() of the damaged step 2 succeeded")
    except CheckpointCorruptError as e:
        if "rank-00001.pt" not in str(e):
            problems.append(f"the error does not name rank-00001.pt: {e}")
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        step = mgr.load(fallback=True)
    if step != 1:
        problems.append(f"load(fallback=True) returned {step}, expected 1")
    if dist.get_rank() == 0 and "fallback" not in caplog.text:
        problems.append("no fallback WARNING on rank 0")
    problems += tensor_problems(at_1, local_state(model, optimizer), "after fallback to step 1")
    mgr.close()
    assert_all_ranks(problems)
