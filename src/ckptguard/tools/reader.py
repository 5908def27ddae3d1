"""Load a ckptguard checkpoint into plain tensors and values, with no model code.

DCP's ``_EmptyStateDictLoadPlanner`` rebuilds the saved state dict from ``.metadata`` alone,
with every sharded tensor gathered to its full shape, so checkpoints written by different world
sizes compare key for key. The per-rank files are read with ``weights_only=True``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from ckptguard.errors import CheckpointFormatError
from ckptguard.layout import MANIFEST_NAME, rank_filename, read_manifest


def load_tensor_state(step_dir: str | Path) -> dict[str, Any]:
    """The DCP part (model, optimizer) as a nested dict of full tensors and values."""
    step_dir = Path(step_dir)
    if not (step_dir / ".metadata").is_file():
        raise CheckpointFormatError(f"{step_dir} has no DCP .metadata file: not a checkpoint")
    sd: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load_state_dict(
            sd,
            storage_reader=FileSystemReader(step_dir),
            planner=_EmptyStateDictLoadPlanner(),
            no_dist=True,
        )
    return sd


def load_rank_states(step_dir: str | Path) -> list[dict[str, Any]]:
    """Each rank's ``rank-NNNNN.pt`` payload, in rank order."""
    step_dir = Path(step_dir)
    manifest = read_manifest(step_dir) if (step_dir / MANIFEST_NAME).is_file() else {}
    world = manifest.get("world_size")
    if world is None:
        world = len(list(step_dir.glob("rank-*.pt")))
    return [
        torch.load(step_dir / rank_filename(r), map_location="cpu", weights_only=True)
        for r in range(world)
    ]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [x, y]}}`` -> ``{"a.b.0": x, "a.b.1": y}``; tensors and scalars are leaves."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        if not obj and prefix:
            out[prefix] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)) and not _is_scalar_seq(obj):
        if not obj and prefix:
            out[prefix] = type(obj)()
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix] = obj
    return out


def _is_scalar_seq(seq: list | tuple) -> bool:
    # Long runs of plain numbers (python RNG state, betas) are one value, not hundreds of keys.
    return len(seq) > 0 and all(isinstance(x, (int, float, bool)) for x in seq)


def load_checkpoint(step_dir: str | Path) -> dict[str, Any]:
    """Everything in a checkpoint, flattened: ``model.*``, ``optimizer.*`` (full tensors) and
    ``rank{R}.{component}.*`` from the per-rank files."""
    flat = flatten(load_tensor_state(step_dir))
    for r, payload in enumerate(load_rank_states(step_dir)):
        flat.update(flatten(payload.get("states", {}), f"rank{r}"))
    return flat


def values_equal(a: Any, b: Any) -> bool:
    """Exact equality for leaves: ``torch.equal`` for tensors (dtype too), ``==`` otherwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    return type(a) is type(b) and a == b
