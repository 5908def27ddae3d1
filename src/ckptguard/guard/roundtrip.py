"""``verify_roundtrip``: save -> restore into the live objects -> compare, as one call.

The in-process version of the experiment everyone runs when a resume looks wrong: if the state
that comes back from disk is not bitwise the state that went in, the loss will jump at resume no
matter how the trainer is written. It goes through the same adapters and formats as a real
save and load (DCP for model and optimizer, read back through ``DirectFileSystemReader``, the
reader ``load()`` uses, so that a bug of that read path shows here too; ``torch.save`` +
``weights_only`` load for the rest) but not through the commit protocol: the files go to a
hidden directory under the root (shared by all ranks, like the checkpoints), which is removed
afterwards. The dataloader is neither saved nor restored: asking a loader for its state can
start its iterator, which would change the run being checked. It needs memory for one copy of
the state (the "before" it compares with).
"""

from __future__ import annotations

import copy
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from ckptguard.core import dist as _dist
from ckptguard.core.dist import quiet_no_dist
from ckptguard.core.reader import DirectFileSystemReader
from ckptguard.core.records import read_rank_file
from ckptguard.core.states import DATALOADER, ModelOptimizerState
from ckptguard.errors import CheckpointError
from ckptguard.guard.statecheck import compare_nested


@dataclass
class RoundtripResult:
    """Which components came back different from a save -> restore (``changed``: descriptions
    per component, every rank's), and which were checked."""

    checked: list[str]
    changed: dict[str, list[str]] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return not self.changed

    @property
    def changed_components(self) -> list[str]:
        return sorted(self.changed)

    def format(self) -> str:
        lines = []
        for comp in self.checked:
            bad = self.changed.get(comp)
            if bad:
                lines.append(f"  DIFFERS {comp:<14} {len(bad)} value(s), e.g. {bad[0]}")
            else:
                lines.append(f"  exact   {comp}")
        verdict = "round trip BIT-EXACT" if self.exact else f"round trip changed {', '.join(self.changed_components)}"
        return "\n".join([*lines, verdict])


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def verify_roundtrip(
    *, root: Path, tensor_state: ModelOptimizerState, rank_states: dict[str, Any], group: Any,
    dcp_kwargs: dict[str, Any], tag: str,
) -> RoundtripResult:
    """Run the experiment on the live objects behind ``tensor_state`` and ``rank_states`` (the
    adapters a manager saves through), in a hidden directory under ``root`` named after ``tag``;
    ``group`` is a gloo group of every rank (every rank must call it), ``dcp_kwargs`` what DCP's
    save and load get to use it. Call it with no save in flight."""
    rank, world_size = _dist.get_rank(), _dist.get_world_size()
    names = [n for n in rank_states if n != DATALOADER]
    before_tensors = _clone(tensor_state.state_dict())
    before_rank = {n: _clone(rank_states[n].state_dict()) for n in names}

    def make_dir() -> str:
        for leftover in root.glob(".ckptguard-roundtrip-*"):  # of a process killed mid-way
            shutil.rmtree(leftover, ignore_errors=True)
        path = root / f".ckptguard-roundtrip-{tag}"
        path.mkdir(parents=True)
        return str(path)

    tmp = Path(_dist.on_rank0_then_all(make_dir, group, CheckpointError))
    try:
        kwargs = dcp_kwargs
        with quiet_no_dist():
            dcp.save(tensor_state.state_dict(), storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=True), **kwargs)
        buf = io.BytesIO()
        torch.save({"states": before_rank}, buf)
        (tmp / f"roundtrip-rank-{rank:05d}.pt").write_bytes(buf.getvalue())

        template = tensor_state.state_dict()
        with quiet_no_dist():
            dcp.load(template, storage_reader=DirectFileSystemReader(tmp), **kwargs)
        tensor_state.load_state_dict(template)
        payload = read_rank_file(tmp / f"roundtrip-rank-{rank:05d}.pt")["states"]
        for n in names:  # build_rank_states' order: RNG last
            rank_states[n].load_state_dict(payload[n])

        after_tensors = tensor_state.state_dict()
        local: dict[str, list[str]] = {}
        for comp in before_tensors:
            bad = compare_nested(before_tensors[comp], after_tensors.get(comp, {}), comp)
            if bad:
                local[comp] = bad
        for n in names:
            bad = compare_nested(before_rank[n], rank_states[n].state_dict(), n)
            if bad:
                local[n] = bad
    finally:
        _dist.barrier(group)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    result = RoundtripResult(checked=list(before_tensors) + names)
    for rank, part in enumerate(_dist.all_gather_object(local, group)):
        for comp, bad in part.items():
            result.changed.setdefault(comp, []).extend(
                f"rank {rank}: {b}" if world_size > 1 else b for b in bad
            )
    return result

