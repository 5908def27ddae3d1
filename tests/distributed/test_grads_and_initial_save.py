"""Optimizer state at the edges of a run under FSDP2 on 2 ranks (issue 10, points 2 and 3).

* A warm-up forward/backward before ``load()`` leaves sharded ``.grad`` on every rank; DCP then
  skips its optimizer-state initialisation (pytorch#140898). The moments and step counts must
  still come back exactly, and the gradients stay as they were.
* ``save(0)`` before the first ``optimizer.step()``, sync and async, must not change the run;
  loading it gives an optimizer without state, and the resume guard accepts that.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from ckptguard import CheckpointManager
from tests._helpers import batch
from tests.distributed._fsdp import (
    assert_all_ranks,
    build_sharded,
    local_state,
    seed_per_rank,
    tensor_problems,
    train_sharded,
)


def _warmup_backward(model) -> None:
    """The trainer's sanity check before resuming: one forward/backward, no step."""
    x, y = batch(777)
    torch.nn.functional.cross_entropy(model(x), y).backward()


def _local_grads(model) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Each parameter's ``.grad`` object and a copy of its local shard."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        local = g.to_local() if isinstance(g, DTensor) else g
        out[name] = (g, None if local is None else local.detach().clone())
    return out


def test_warmup_backward_before_load_restores_sharded_moments(mesh, shared_tmp):
    seed_per_rank(30)
    model, optimizer, scheduler = build_sharded(mesh, with_scheduler=True)
    with CheckpointManager(shared_tmp, model=model, optimizer=optimizer, lr_scheduler=scheduler) as mgr:
        train_sharded(model, optimizer, scheduler, 3, first_batch=0)
        mgr.save(3)
    saved = local_state(model, optimizer)
    uninterrupted = train_sharded(model, optimizer, scheduler, 3, first_batch=3)

    seed_per_rank(31)
    fresh, fresh_opt, fresh_sched = build_sharded(mesh, seed=1, with_scheduler=True)
    _warmup_backward(fresh)
    grads = _local_grads(fresh)
    problems = [f"{n}: no grad after the warm-up" for n, (g, _) in grads.items() if g is None]
    with CheckpointManager(
        shared_tmp, model=fresh, optimizer=fresh_opt, lr_scheduler=fresh_sched, strict=True
    ) as mgr:
        step = mgr.load()
    if step != 3:
        problems.append(f"load() returned {step}, expected 3")
    for name, p in fresh.named_parameters():
        g, values = grads[name]
        if p.grad is not g:
            problems.append(f"{name}: .grad was replaced by load()")
        elif g is not None and not torch.equal(p.grad.to_local(), values):
            problems.append(f"{name}: .grad values changed by load()")
    problems += tensor_problems(saved, local_state(fresh, fresh_opt), "local shards after load")
    fresh_opt.zero_grad(set_to_none=True)  # the trainer's loop starts clean, as it always does
    resumed = train_sharded(fresh, fresh_opt, fresh_sched, 3, first_batch=3)
    if resumed != uninterrupted:
        problems.append(f"losses after resume {resumed} != uninterrupted {uninterrupted}")
    problems += tensor_problems(
        local_state(model, optimizer), local_state(fresh, fresh_opt), "after 3 more steps"
    )
    assert_all_ranks(problems)


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
def test_save_before_the_first_step_changes_nothing_and_loads_without_state(mesh, shared_tmp, blocking):
    seed_per_rank(40)
    plain, plain_opt, plain_sched = build_sharded(mesh, with_scheduler=True)
    never_saved = train_sharded(plain, plain_opt, plain_sched, 4, first_batch=0)

    seed_per_rank(40)
    model, optimizer, scheduler = build_sharded(mesh, with_scheduler=True)
    problems = []
    with CheckpointManager(shared_tmp, model=model, optimizer=optimizer, lr_scheduler=scheduler) as mgr:
        mgr.save(0, blocking=blocking)
        if optimizer.state:
            problems.append("save(0) created optimizer state")
        with_save = train_sharded(model, optimizer, scheduler, 4, first_batch=0)
        mgr.wait()
    if with_save != never_saved:
        problems.append(f"losses with save(0) {with_save} != without {never_saved}")
    problems += tensor_problems(
        local_state(plain, plain_opt), local_state(model, optimizer), "run with save(0)"
    )

    # A restarted trainer (warm-up backward included) resumes from the initial checkpoint.
    seed_per_rank(41)
    fresh, fresh_opt, fresh_sched = build_sharded(mesh, seed=1, with_scheduler=True)
    _warmup_backward(fresh)
    with CheckpointManager(
        shared_tmp, model=fresh, optimizer=fresh_opt, lr_scheduler=fresh_sched, strict=True
    ) as mgr:
        mgr.load(step=0)
        if fresh_opt.state:
            problems.append(f"optimizer has state for {len(fresh_opt.state)} params after loading step 0")
        problems += [f.format() for f in mgr.last_report.errors]
    fresh_opt.zero_grad(set_to_none=True)
    resumed = train_sharded(fresh, fresh_opt, fresh_sched, 4, first_batch=0)
    if resumed != never_saved:
        problems.append(f"losses resumed from step 0 {resumed} != never saved {never_saved}")
    problems += tensor_problems(
        local_state(plain, plain_opt), local_state(fresh, fresh_opt), "resumed from step 0"
    )
    assert_all_ranks(problems)
