"""Fixtures for the 2-process suite: ``torchrun --nproc_per_node=2 -m pytest tests/distributed``.

Every rank runs the same pytest session: the same tests in the same order, so that the
collectives inside them (FSDP2 all-gathers, DCP planning, ckptguard's own groups) pair up. Hence
no test here may skip or return early on one rank only; a check that fails on one rank is
turned into a failure on every rank by ``tests.distributed._fsdp.assert_all_ranks``.

Without torchrun (``WORLD_SIZE`` unset) every test skips with the command to run instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tests.distributed._fsdp import WORLD_SIZE, DistWorld

_COMMAND = "torchrun --nproc_per_node=2 -m pytest tests/distributed"

# A rank that fails between two collectives leaves the other waiting; gloo's default timeout
# (30 min, also used by every ``new_group`` ckptguard creates) would turn that into a silent
# hang. Five minutes is far above any collective in this suite on a loaded 2-core machine.
_COLLECTIVE_TIMEOUT = timedelta(minutes=5)


@pytest.fixture(scope="session", autouse=True)
def dist_world() -> DistWorld:
    """The gloo default process group, created once per rank and destroyed at the end."""
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        pytest.skip(
            f"distributed suite: not launched by torchrun (WORLD_SIZE unset); run `{_COMMAND}`"
        )
    if int(world) != WORLD_SIZE:
        pytest.skip(
            f"distributed suite needs exactly {WORLD_SIZE} ranks, got WORLD_SIZE={world}; run `{_COMMAND}`"
        )
    c10d.default_pg_timeout = _COLLECTIVE_TIMEOUT  # read by new_group(timeout=None)
    dist.init_process_group("gloo", timeout=_COLLECTIVE_TIMEOUT)
    try:
        yield DistWorld(rank=dist.get_rank(), world_size=dist.get_world_size())
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def mesh(dist_world: DistWorld) -> DeviceMesh:
    """The 1-D CPU mesh FSDP2 shards over, built explicitly as users do."""
    return init_device_mesh("cpu", (dist_world.world_size,))


@pytest.fixture
def shared_tmp(dist_world: DistWorld):
    """One fresh directory seen by every rank (rank 0 creates it and broadcasts the path).

    pytest's ``tmp_path`` differs per rank, but a checkpoint root must be shared.
    """
    box = [tempfile.mkdtemp(prefix="ckptguard-dist-") if dist_world.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    path = Path(box[0])
    yield path
    dist.barrier()
    if dist_world.rank == 0:
        shutil.rmtree(path, ignore_errors=True)
