"""Background staging of async saves on 2 FSDP2 ranks (``ckptguard.core.staging``).

The sharded parameters and moments are DTensors: the stager must recognise their local shards
as the optimizer's (copied in the background, guarded by the step hook) and watch the DTensor's
own version counter, which is the one the optimizer's in-place update bumps. The background copy
is held behind a gate so that training provably runs (FSDP2 collectives included) before it.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ckptguard import CheckpointManager
from ckptguard.core.staging import BackgroundStager
from ckptguard.errors import CommitError
from tests.distributed._fsdp import (
    assert_all_ranks,
    build_sharded,
    local_state,
    seed_per_rank,
    tensor_problems,
    train_sharded,
)

# hidden.weight is 256x256 floats: each rank's shard (128 KiB) is copied in the background
_BIG = {"dim": 64, "hidden": 256, "dropout": 0.0}


@pytest.fixture
def gate(monkeypatch) -> threading.Event:
    event = threading.Event()
    original = BackgroundStager._copy_all

    def gated(self, *args, **kwargs):
        assert event.wait(timeout=120), "test never opened the gate"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BackgroundStager, "_copy_all", gated)
    return event


def test_sharded_async_save_is_the_saved_step_while_training_goes_on(mesh, shared_tmp, gate):
    seed_per_rank(70)
    model, optimizer, _ = build_sharded(mesh, **_BIG)
    train_sharded(model, optimizer, None, 2, first_batch=0)
    saved = local_state(model, optimizer)
    problems = []
    with CheckpointManager(shared_tmp, model=model, optimizer=optimizer) as mgr:
        mgr.save(2, blocking=False)
        future = mgr._stager._future
        if future is None or future.done():
            problems.append("the sharded parameters were not left to the background copy")
        timer = threading.Timer(0.3, gate.set)
        timer.start()
        train_sharded(model, optimizer, None, 2, first_batch=2)  # step() waits for the copy
        mgr.wait()
        timer.join()

    fresh, fresh_opt, _ = build_sharded(mesh, seed=1, **_BIG)
    with CheckpointManager(shared_tmp, model=fresh, optimizer=fresh_opt) as mgr:
        mgr.load(2)
    problems += tensor_problems(saved, local_state(fresh, fresh_opt), "loaded from the async save")
    assert_all_ranks(problems)


def test_sharded_in_place_write_during_staging_fails_on_every_rank(mesh, shared_tmp, gate):
    seed_per_rank(71)
    model, optimizer, _ = build_sharded(mesh, **_BIG)
    train_sharded(model, optimizer, None, 1, first_batch=0)
    problems = []
    with CheckpointManager(shared_tmp, model=model, optimizer=optimizer) as mgr:
        mgr.save(1)
        mgr.save(2, blocking=False)
        with torch.no_grad():
            model.hidden.weight.mul_(0.5)  # a DTensor written outside optimizer.step()
        gate.set()
        try:
            mgr.wait()
            problems.append("wait() committed a checkpoint whose weights changed while staging")
        except CommitError as e:
            if "hidden.weight" not in str(e):
                problems.append(f"CommitError does not name the tensor: {e}")
        if mgr.steps() != [1]:
            problems.append(f"steps() is {mgr.steps()}, expected only the earlier [1]")
    assert_all_ranks(problems)
