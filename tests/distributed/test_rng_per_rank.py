"""Each rank gets its own RNG streams back after load, not rank 0's (a bug several trainers
shipped: with rank 0's state everywhere, every rank draws the same dropout masks)."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from ckptguard import CheckpointManager
from ckptguard.core.states.rng import restore_rng_state
from ckptguard.tools.reader import load_rank_states
from tests.distributed._fsdp import (
    all_gather,
    assert_all_ranks,
    build_sharded,
    seed_per_rank,
    tensor_problems,
)


def _draw() -> dict[str, torch.Tensor]:
    """What a training step draws: a dropout mask (torch), an augmentation (python, numpy)."""
    return {
        "dropout_mask": F.dropout(torch.ones(256), p=0.5, training=True),
        "python": torch.tensor([random.random() for _ in range(4)], dtype=torch.float64),
        "numpy": torch.from_numpy(np.random.rand(4)),
    }


def _ranks_draw_alike(draws: list[dict[str, torch.Tensor]]) -> dict[str, bool]:
    return {k: all(torch.equal(d[k], draws[0][k]) for d in draws) for k in draws[0]}


def test_each_rank_restores_its_own_rng(mesh, shared_tmp):
    model, optimizer, _ = build_sharded(mesh)
    seed_per_rank(50)
    problems = []
    if len({bytes(s.numpy()) for s in all_gather(torch.get_rng_state())}) != 2:
        problems.append("seeding per rank did not give the ranks different torch RNG states")
    with CheckpointManager(shared_tmp, model=model, optimizer=optimizer) as mgr:
        step_dir = mgr.save(1)
    after_save = _draw()
    alike = _ranks_draw_alike(all_gather(after_save))
    if any(alike.values()):
        problems.append(f"ranks drew alike before any restore: {alike}")

    seed_per_rank(999)  # move every stream elsewhere
    fresh, fresh_opt, _ = build_sharded(mesh, seed=1)
    with CheckpointManager(shared_tmp, model=fresh, optimizer=fresh_opt) as mgr:
        mgr.load()
    restored = _draw()
    problems += tensor_problems(after_save, restored, "draws after load vs after save, same rank")
    alike = _ranks_draw_alike(all_gather(restored))
    if any(alike.values()):
        problems.append(f"ranks draw alike after load: {alike}")

    # Fail-on-bug: the shortcut of restoring rank 0's streams on every rank.
    rank0_rng = load_rank_states(step_dir)[0]["states"]["rng"]
    restore_rng_state(rank0_rng)
    shortcut = _draw()
    alike = _ranks_draw_alike(all_gather(shortcut))
    if not all(alike.values()):
        problems.append(f"rank 0's RNG on every rank should make the draws identical, got {alike}")
    assert_all_ranks(problems)
