"""Nested state dicts as flat ``dotted.key -> leaf`` maps, and exact equality of leaves.

Shared by the guard's checks, the tools and the harness: one notion of "the same value".
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor


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


def values_equal(a: Any, b: Any) -> bool:
    """Exact equality for leaves: ``torch.equal`` for tensors (dtype too), ``==`` otherwise."""
    if isinstance(a, DTensor) or isinstance(b, DTensor):
        # a shard read from a rank file (an FSDP2-sharded optimizer in ``extra``), compared
        # outside any process group: torch.equal on a DTensor would run a collective
        return (
            isinstance(a, DTensor)
            and isinstance(b, DTensor)
            and a.placements == b.placements
            and values_equal(a.to_local(), b.to_local())
        )
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    return type(a) is type(b) and a == b
