"""Many managers in one 2-rank job leak no process groups, threads or file descriptors.

Run with ``torchrun --nproc_per_node=2 -m pytest tests/distributed/test_lifecycle_groups.py``.
Each manager makes two gloo groups (its own collectives and DCP's); a hyper-parameter sweep or a
test suite creates one manager per trial. Closed managers destroy their groups at once; the
groups of managers that were only dropped are destroyed by the next manager created or closed
(a finalizer may run in any thread, so it only queues them). Groups, the threads gloo runs for
them and their sockets must all come back to the count before the sweep.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed.distributed_c10d as c10d

from ckptguard import CheckpointManager
from ckptguard.core.format import LOCK_NAME
from tests._helpers import optimizer_tensors
from tests.distributed._fsdp import assert_all_ranks, tensor_problems

pytestmark = pytest.mark.timeout(300)


def _counts() -> dict[str, int]:
    gc.collect()
    return {
        "process groups": len(c10d._world.pg_map),
        "file descriptors": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
    }


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"optim.{k}": v.clone() for k, v in optimizer_tensors(optimizer).items()})
    return state


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """The same learnable batch on every rank (tokens ``arange % 8``), so replicas agree."""
    x = (torch.arange(32, dtype=torch.float32) + step).remainder(8).reshape(4, 8) / 8
    loss = torch.nn.functional.mse_loss(model(x), x.roll(1, dims=1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_fifty_managers_closed_and_fifty_dropped_leak_nothing(dist_world, shared_tmp):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, optimizer, 0)
    with CheckpointManager(shared_tmp, model=model, optimizer=optimizer) as mgr:  # warm-up
        mgr.save(0)
    before = _counts()
    problems: list[str] = []
    most_groups = 0

    for trial in range(50):  # a sweep that closes its managers
        _train_step(model, optimizer, trial)
        with CheckpointManager(shared_tmp, model=model, optimizer=optimizer, keep_last=1) as mgr:
            if trial % 10 == 0:
                mgr.save(1 + trial, blocking=trial % 20 == 0)
        most_groups = max(most_groups, len(c10d._world.pg_map))
    for trial in range(50):  # ... and one that just drops them (no close, no with)
        _train_step(model, optimizer, 50 + trial)
        mgr = CheckpointManager(shared_tmp, model=model, optimizer=optimizer, keep_last=1)
        if trial % 10 == 0:
            mgr.save(100 + trial)
            saved = _state(model, optimizer)
        del mgr
        most_groups = max(most_groups, len(c10d._world.pg_map))

    # the next manager (created, then closed) destroys the groups the dropped ones left
    torch.manual_seed(1)
    fresh = torch.nn.Linear(8, 8)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    _train_step(fresh, fresh_opt, 0)
    with CheckpointManager(shared_tmp, model=fresh, optimizer=fresh_opt) as mgr:
        step = mgr.load()
    after = _counts()

    if step != 140:
        problems.append(f"loaded step {step}, expected the last one saved, 140")
    problems += tensor_problems(saved, _state(fresh, fresh_opt), "step 140")
    leaked = {k: (before[k], after[k]) for k in before if after[k] > before[k]}
    if leaked:
        problems.append(f"leaked (before, after): {leaked}")
    if most_groups > before["process groups"] + 4:
        problems.append(f"{most_groups} process groups at once (before: {before['process groups']})")
    if dist_world.rank == 0 and (shared_tmp / LOCK_NAME).read_text():
        problems.append("the root's lock is still held after every manager is gone")
    assert_all_ranks(problems)
