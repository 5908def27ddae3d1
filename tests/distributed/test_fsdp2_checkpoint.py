"""Sharded model and AdamW state under FSDP2 on 2 ranks: restored bit-exactly into freshly built
objects, including uneven shards, and the naive raw ``optimizer.state_dict()`` path shown to lose
the moments."""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from ckptguard import CheckpointManager
from ckptguard.tools.reader import load_tensor_state
from tests.distributed._fsdp import (
    all_gather,
    assert_all_ranks,
    build_sharded,
    full_state,
    local_state,
    seed_per_rank,
    tensor_problems,
    train_sharded,
)

MOMENTS = ("exp_avg", "exp_avg_sq", "step")


def _moment_keys(model) -> set[str]:
    return {f"optim.{name}.{m}" for name, _ in model.named_parameters() for m in MOMENTS}


def test_sharded_adamw_moments_restored_bit_exactly(mesh, shared_tmp):
    seed_per_rank(10)
    model, optimizer, scheduler = build_sharded(mesh, with_scheduler=True)
    train_sharded(model, optimizer, scheduler, 3, first_batch=0)
    with CheckpointManager(
        shared_tmp, model=model, optimizer=optimizer, lr_scheduler=scheduler
    ) as mgr:
        mgr.save(3)
    saved = local_state(model, optimizer)
    uninterrupted = train_sharded(model, optimizer, scheduler, 3, first_batch=3)

    # Another init seed: whatever the load does not overwrite shows up as a difference.
    fresh, fresh_opt, fresh_sched = build_sharded(mesh, seed=1, with_scheduler=True)
    problems = [] if not fresh_opt.state else ["the fresh optimizer has state before load"]
    with CheckpointManager(
        shared_tmp, model=fresh, optimizer=fresh_opt, lr_scheduler=fresh_sched
    ) as mgr:
        step = mgr.load()
    if step != 3:
        problems.append(f"load() returned step {step}, expected 3")
    missing = _moment_keys(fresh) - set(saved)
    if missing:
        problems.append(f"the reference itself lacks moments {sorted(missing)}")
    problems += tensor_problems(saved, local_state(fresh, fresh_opt), "local shards after load")
    resumed = train_sharded(fresh, fresh_opt, fresh_sched, 3, first_batch=3)
    if resumed != uninterrupted:
        problems.append(f"losses after resume {resumed} != uninterrupted {uninterrupted}")
    problems += tensor_problems(
        local_state(model, optimizer), local_state(fresh, fresh_opt), "after 3 more steps"
    )
    assert_all_ranks(problems)


def test_naive_raw_optimizer_state_dict_template_loses_moments(mesh, shared_tmp):
    """Fail-on-bug: DCP loads only what the template asks for, and a never-stepped AdamW's raw
    ``state_dict()`` asks for no moments; under FSDP2 just as on one process."""
    seed_per_rank(20)
    # No dropout: three models step one after another here, and must see the same forward.
    model, optimizer, _ = build_sharded(mesh, dropout=0.0)
    train_sharded(model, optimizer, None, 3, first_batch=0)
    saved = local_state(model, optimizer)
    naive_dir = shared_tmp / "naive"
    dcp.save(
        {"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=naive_dir
    )
    with CheckpointManager(shared_tmp / "managed", model=model, optimizer=optimizer) as mgr:
        mgr.save(3)

    naive, naive_opt, _ = build_sharded(mesh, seed=1, dropout=0.0)
    template = {"model": naive.state_dict(), "optim": naive_opt.state_dict()}
    dcp.load(template, checkpoint_id=naive_dir)
    naive.load_state_dict(template["model"])
    naive_opt.load_state_dict(template["optim"])

    managed, managed_opt, _ = build_sharded(mesh, seed=1, dropout=0.0)
    with CheckpointManager(shared_tmp / "managed", model=managed, optimizer=managed_opt) as mgr:
        mgr.load()

    problems = []
    naive_state = local_state(naive, naive_opt)
    params_only = {k: v for k, v in saved.items() if k.startswith("model.")}
    # The bug: the weights come back, the moments do not.
    problems += tensor_problems(params_only, naive_state, "naive path, parameters")
    if _moment_keys(naive) & set(naive_state):
        problems.append(
            "naive path restored moments: the fail-on-bug demonstration no longer holds"
        )
    problems += tensor_problems(saved, local_state(managed, managed_opt), "CheckpointManager")

    # Consequence: the next update differs from the one the saved run would have made.
    train_sharded(naive, naive_opt, None, 1, first_batch=3)
    train_sharded(managed, managed_opt, None, 1, first_batch=3)
    train_sharded(model, optimizer, None, 1, first_batch=3)
    after = local_state(model, optimizer)
    problems += tensor_problems(
        after, local_state(managed, managed_opt), "CheckpointManager, one step on"
    )
    naive_params = local_state(naive)
    same = [k for k in naive_params if torch.equal(naive_params[k], after[k])]
    # Both ranks must agree that the naive step went wrong on some shard somewhere.
    if not any(all_gather(len(same) < len(naive_params))):
        problems.append("the naive path's next step matched the saved run on every shard")
    assert_all_ranks(problems)


def test_uneven_shards_round_trip_exactly(mesh, shared_tmp):
    """Vocab 33 and hidden 9 on 2 ranks: 17/16 and 5/4 rows per rank (torchtitan#1136)."""
    seed_per_rank(30)
    dims = {"dim": 6, "hidden": 9}
    model, optimizer, _ = build_sharded(mesh, **dims)
    train_sharded(model, optimizer, None, 3, first_batch=0)
    rows = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
    with CheckpointManager(shared_tmp, model=model, optimizer=optimizer) as mgr:
        step_dir = mgr.save(3)
    saved = local_state(model, optimizer)
    saved_full = full_state(model, optimizer)
    uninterrupted = train_sharded(model, optimizer, None, 2, first_batch=3)

    fresh, fresh_opt, _ = build_sharded(mesh, seed=1, **dims)
    with CheckpointManager(shared_tmp, model=fresh, optimizer=fresh_opt) as mgr:
        mgr.load()
    loaded = local_state(fresh, fresh_opt)
    loaded_full = full_state(fresh, fresh_opt)
    resumed = train_sharded(fresh, fresh_opt, None, 2, first_batch=3)

    problems = []
    all_rows = all_gather(rows)
    for name, want in {
        "embed.weight": [17, 16],
        "head.bias": [17, 16],
        "hidden.weight": [5, 4],
    }.items():
        got = [r[name] for r in all_rows]
        if got != want:
            problems.append(
                f"{name} has {got} rows per rank, expected {want}: the test lost its uneven case"
            )
    for key, value in loaded.items():
        name, _, moment = key.removeprefix("optim.").rpartition(".")
        if key.startswith("optim.") and moment != "step" and value.shape[0] != rows[name]:
            problems.append(f"{key} has {value.shape[0]} local rows, its parameter {rows[name]}")
    problems += tensor_problems(saved, loaded, "local shards")
    problems += tensor_problems(saved_full, loaded_full, "full tensors")
    on_disk = load_tensor_state(step_dir)
    problems += tensor_problems(
        {k: v for k, v in saved_full.items() if k.startswith("model.")},
        {f"model.{k}": v for k, v in on_disk["model"].items()},
        "full tensors on disk",
    )
    if resumed != uninterrupted:
        problems.append(f"losses after resume {resumed} != uninterrupted {uninterrupted}")
    assert_all_ranks(problems)
