"""Builders and cross-rank assertions for the FSDP2 suite (import as ``tests.distributed._fsdp``)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ckptguard.demo import TinyLM, build_optimizer
from tests._helpers import train_steps

WORLD_SIZE = 2


@dataclass(frozen=True)
class DistWorld:
    rank: int
    world_size: int


def seed_per_rank(base: int) -> None:
    """Seed python, numpy and torch with ``base + rank``: every rank draws its own stream,
    as a trainer that wants different dropout masks per data-parallel rank does."""
    seed = base + dist.get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_sharded(
    mesh: DeviceMesh, *, seed: int = 0, with_scheduler: bool = False, **tinylm: Any
) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """TinyLM sharded with FSDP2 like the demo (``hidden`` its own unit, then the root), and the
    demo's AdamW built on the sharded parameters. ``seed`` sets the (identical) init on every
    rank. Returns ``(model, optimizer, scheduler or None)``."""
    torch.manual_seed(seed)
    model = TinyLM(**tinylm)
    fully_shard(model.hidden, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = build_optimizer(model)
    scheduler = None
    if with_scheduler:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    return model, optimizer, scheduler


def train_sharded(
    model: nn.Module, optimizer, scheduler, steps: int, first_batch: int
) -> list[float]:
    """``steps`` optimizer steps; each rank trains on its own deterministic batches (data
    parallel), so the ranks' losses and dropout masks differ. Returns this rank's losses."""
    return train_steps(
        model, optimizer, scheduler, steps, first_seed=1000 * dist.get_rank() + first_batch
    )


def _named_state(model: nn.Module, optimizer: torch.optim.Optimizer | None):
    """(key, tensor) for every parameter and optimizer tensor, keyed by FQN, in a fixed order."""
    for name, param in model.named_parameters():
        yield f"model.{name}", param
        if optimizer is not None:
            state = optimizer.state.get(param, {})
            for k in sorted(state):
                if isinstance(state[k], torch.Tensor):
                    yield f"optim.{name}.{k}", state[k]


def local_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, torch.Tensor]:
    """This rank's shard of every parameter and moment (copies), plus the optimizer ``step``."""
    return {
        k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in _named_state(model, optimizer)
    }


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, torch.Tensor]:
    """Every parameter and moment gathered to its full shape (a collective: call on all ranks)."""
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in _named_state(model, optimizer)
    }


def tensor_problems(expected: dict[str, Any], actual: dict[str, Any], what: str) -> list[str]:
    """Why ``actual`` is not bit-identical to ``expected`` (missing keys, dtype, shape, values)."""
    problems = []
    for k in sorted(set(expected) - set(actual)):
        problems.append(f"{what}: {k} missing")
    for k in sorted(set(actual) - set(expected)):
        problems.append(f"{what}: {k} unexpected")
    for k in sorted(set(expected) & set(actual)):
        a, b = expected[k], actual[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(
                f"{what}: {k} is {b.dtype}{tuple(b.shape)}, expected {a.dtype}{tuple(a.shape)}"
            )
        elif not torch.equal(a, b):
            problems.append(
                f"{what}: {k} differs (max abs diff {(a.double() - b.double()).abs().max().item():g})"
            )
    return problems


def all_gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def assert_all_ranks(problems: list[str]) -> None:
    """Fail on every rank if any rank found a problem, naming the rank.

    Each rank checks its own shards; gathering the verdict keeps the ranks in lockstep (a
    failure on one rank alone would leave the other waiting in the next test's collective).
    """
    gathered = all_gather(list(problems))
    report = [f"rank {r}: {p}" for r, ps in enumerate(gathered) for p in ps]
    assert not report, "\n".join(report)
