"""``ckptguard diff A B``: compare two checkpoints value by value, exactly unless told otherwise.

Model and optimizer tensors are read whole (``tools.reader``), so checkpoints written by
different world sizes compare key for key. The per-rank files need a rule:

* same world size: rank ``r`` of A is compared with rank ``r`` of B, every component;
* different world sizes: the replicated components (``lr_scheduler``, ``extra.*``: every rank
  holds the same copy) are compared on rank 0; the per-rank ones (``rng``, ``dataloader``)
  describe a different set of processes and are *not comparable*: they are listed as skipped
  and do not affect the verdict.

Tolerance follows ``torch.isclose``: ``|a - b| <= atol + rtol * |b|`` elementwise, NaN equal to
NaN; the default ``atol = rtol = 0`` means bit-for-bit equal values. A dtype or shape
difference is always a difference.
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckptguard.core.safe_pickle import honours_unsafe_pickle
from ckptguard.core.states import DATALOADER, RNG
from ckptguard.tools._progress import progress
from ckptguard.tools.reader import (
    find_checkpoint,
    flatten,
    load_rank_states,
    load_tensor_state,
    read_checked_manifest,
)
from ckptguard.tools.verify import require_intact

PER_RANK_COMPONENTS = (RNG, DATALOADER)


@dataclass
class ValueDiff:
    key: str
    kind: str  # "values" | "dtype" | "shape" | "type"
    detail: str
    max_abs: float | None = None
    max_rel: float | None = None
    num_different: int | None = None
    numel: int | None = None


@dataclass
class DiffReport:
    a: str
    b: str
    world_sizes: tuple[int, int]
    steps: tuple[int | None, int | None]
    atol: float
    rtol: float
    compared: int = 0
    identical: int = 0
    within_tolerance: list[str] = field(default_factory=list)
    differing: list[ValueDiff] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)
    ignored: int = 0

    @property
    def equal(self) -> bool:
        return not (self.differing or self.only_a or self.only_b)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["equal"] = self.equal
        return out

    def format(self, limit: int = 50) -> str:
        lines = [
            f"A: {self.a} (step {self.steps[0]}, world size {self.world_sizes[0]})",
            f"B: {self.b} (step {self.steps[1]}, world size {self.world_sizes[1]})",
            f"tolerance: atol={self.atol:g} rtol={self.rtol:g}"
            + (" (exact)" if self.atol == 0 and self.rtol == 0 else ""),
            f"compared {self.compared} values: {self.identical} identical, "
            f"{len(self.within_tolerance)} within tolerance, {len(self.differing)} differ; "
            f"{len(self.only_a)} only in A, {len(self.only_b)} only in B"
            + (f"; {self.ignored} ignored" if self.ignored else ""),
        ]
        for title, keys in (("only in A", self.only_a), ("only in B", self.only_b)):
            if keys:
                lines.append(f"{title}:")
                lines += [f"  {k}" for k in keys[:limit]]
                if len(keys) > limit:
                    lines.append(f"  ... {len(keys) - limit} more")
        if self.differing:
            lines.append("differ:")
            for d in self.differing[:limit]:
                lines.append(f"  {d.key}  {d.detail}")
            if len(self.differing) > limit:
                lines.append(f"  ... {len(self.differing) - limit} more")
        if self.not_compared:
            lines.append(
                f"not compared (per-rank state; world sizes differ {self.world_sizes[0]} vs "
                f"{self.world_sizes[1]}): {', '.join(self.not_compared)}"
            )
        lines.append("result: " + ("EQUAL" if self.equal else "DIFFERENT"))
        return "\n".join(lines)


def _flat_checkpoint(step_dir: Path, world: int, other_world: int, skipped: set[str]) -> dict[str, Any]:
    """``model.*``, ``optimizer.*`` and ``rank{R}.{component}.*`` leaves under the rule above."""
    flat = flatten(load_tensor_state(step_dir))
    for r, payload in enumerate(load_rank_states(step_dir)):
        for name, state in payload.get("states", {}).items():
            if world != other_world and (name in PER_RANK_COMPONENTS or r > 0):
                if name in PER_RANK_COMPONENTS:
                    skipped.add(name)
                continue
            flat.update(flatten({name: state}, f"rank{r}"))
    return flat


def _numbers_close(a: float, b: float, atol: float, rtol: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return abs(a - b) <= atol + rtol * abs(b)


def compare_values(key: str, a: Any, b: Any, atol: float = 0.0, rtol: float = 0.0) -> ValueDiff | None | str:
    """``None`` if identical, ``"close"`` if equal within tolerance, else a ``ValueDiff``."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return _compare_tensors(key, a, b, atol, rtol)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return ValueDiff(key, "type", f"{type(a).__name__} vs {type(b).__name__}")
    if a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)):
        return None
    if isinstance(a, (list, tuple)) and len(a) == len(b) and all(
        isinstance(x, float) and isinstance(y, float) for x, y in zip(a, b, strict=True)
    ):
        if all(_numbers_close(x, y, atol, rtol) for x, y in zip(a, b, strict=True)):
            return "close"
        worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
        return ValueDiff(key, "values", f"{a!r} vs {b!r}", worst)
    if isinstance(a, float) and _numbers_close(a, b, atol, rtol):
        return "close"
    if isinstance(a, float):
        rel = abs(a - b) / abs(b) if b else math.inf
        return ValueDiff(key, "values", f"{a!r} vs {b!r}", abs(a - b), rel)
    return ValueDiff(key, "values", f"{a!r} vs {b!r}")


def _compare_tensors(key: str, a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> ValueDiff | None | str:
    if a.dtype != b.dtype:
        return ValueDiff(key, "dtype", f"dtype {a.dtype} vs {b.dtype}")
    if a.shape != b.shape:
        return ValueDiff(key, "shape", f"shape {list(a.shape)} vs {list(b.shape)}")
    if torch.equal(a, b):
        return None
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.is_floating_point():
        x, y = a.double(), b.double()
        both_nan = torch.isnan(x) & torch.isnan(y)
        if bool((both_nan | (x == y)).all()):
            return None  # NaN in the same places, all else equal
        diff = (x - y).abs().masked_fill(both_nan, 0)
        bad = ~(both_nan | (diff <= atol + rtol * y.abs()))
        rel = (diff / y.abs()).nan_to_num(nan=0.0, posinf=math.inf)
    else:
        diff = (a.long() - b.long()).abs().double()
        bad = diff > atol + rtol * b.double().abs()
        rel = (diff / b.double().abs()).nan_to_num(nan=0.0, posinf=math.inf)
    nbad = int(bad.sum())
    if nbad == 0:
        return "close"
    max_abs, max_rel = float(diff.max()), float(rel.masked_fill(diff == 0, 0).max())
    return ValueDiff(
        key, "values",
        f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}  max abs {max_abs:.3g}  "
        f"max rel {max_rel:.3g}  ({nbad}/{a.numel()} elements beyond tolerance)",
        max_abs, max_rel, nbad, a.numel(),
    )


@honours_unsafe_pickle
def diff_checkpoints(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    ignore: list[str] | None = None,
    step_a: int | None = None,
    step_b: int | None = None,
    verify: bool = True,
    unsafe_pickle: bool = False,
) -> DiffReport:
    """Compare two checkpoints (or the newest of two roots); ``ignore`` takes key globs.
    ``unsafe_pickle=True`` unpickles ``.metadata`` without the allowlist (trusted files only).

    With ``verify`` (default) both are checked against their manifests first: a damaged shard
    would otherwise read as garbage and be reported as a difference instead of as damage.
    """
    if atol < 0 or rtol < 0:
        raise ValueError(f"tolerances must be >= 0, got atol={atol} rtol={rtol}")
    dir_a, dir_b = find_checkpoint(a, step_a), find_checkpoint(b, step_b)
    man_a, man_b = read_checked_manifest(dir_a), read_checked_manifest(dir_b)
    if verify:
        require_intact(dir_a, "not comparing it")
        require_intact(dir_b, "not comparing it")
    wa, wb = int(man_a.get("world_size") or 1), int(man_b.get("world_size") or 1)
    skipped: set[str] = set()
    flat_a = _flat_checkpoint(dir_a, wa, wb, skipped)
    flat_b = _flat_checkpoint(dir_b, wb, wa, skipped)
    report = DiffReport(
        str(dir_a), str(dir_b), (wa, wb), (man_a.get("step"), man_b.get("step")), atol, rtol,
        not_compared=sorted(skipped),
    )
    patterns = ignore or []
    keys = sorted(set(flat_a) | set(flat_b))
    kept = [k for k in keys if not any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    report.ignored = len(keys) - len(kept)
    for key in progress(kept, desc="diff", unit="key"):
        if key not in flat_b:
            report.only_a.append(key)
        elif key not in flat_a:
            report.only_b.append(key)
        else:
            report.compared += 1
            result = compare_values(key, flat_a[key], flat_b[key], atol, rtol)
            if result is None:
                report.identical += 1
            elif isinstance(result, str):  # "close"
                report.within_tolerance.append(key)
            else:
                report.differing.append(result)
    return report
