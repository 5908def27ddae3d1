"""``ckptguard inspect``: what a checkpoint (or a root of them) holds, without the model code.

Tensor keys, shapes and dtypes come from DCP's ``.metadata`` alone, so even a checkpoint of a
model too large for this machine is listed without reading a shard. The per-rank files (small:
RNG, dataloader position, scheduler, extras) are opened with ``weights_only=True``. Everything
is grouped by component: model, optimizer (moments per parameter, hyperparameters), and each
per-rank state.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.format import ABANDONED_DIR, MANIFEST_NAME, rank_filename, step_dirname
from ckptguard.core.policy import RetentionPolicy
from ckptguard.core.records import read_rank_file
from ckptguard.core.safe_pickle import honours_unsafe_pickle, read_dcp_metadata
from ckptguard.core.states import MODEL, OPTIMIZER, RNG
from ckptguard.tools._progress import progress
from ckptguard.tools.legacy import detect_legacy
from ckptguard.tools.reader import find_checkpoint, flatten, is_root, read_checked_manifest


def format_nbytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class TensorInfo:
    key: str
    shape: list[int]
    dtype: str
    nbytes: int


@dataclass
class ComponentInfo:
    """One kind of state. ``tensors`` for model and per-rank states; ``per_parameter`` for the
    optimizer's moments; ``values`` counts non-tensor leaves (hyperparameters, counters)."""

    name: str
    stored_in: str  # "dcp" (sharded, reshardable) | "rank files"
    tensors: list[TensorInfo] = field(default_factory=list)
    per_parameter: dict[str, list[TensorInfo]] = field(default_factory=dict)
    values: int = 0
    ranks: list[int] = field(default_factory=list)
    sample_values: dict[str, Any] = field(default_factory=dict)  # lowest rank's plain values

    @property
    def num_tensors(self) -> int:
        return len(self.tensors) + sum(len(v) for v in self.per_parameter.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors) + sum(
            t.nbytes for ts in self.per_parameter.values() for t in ts
        )


@dataclass
class CheckpointInfo:
    path: str
    step: int | None
    world_size: int | None
    format_version: int | None
    ckptguard_version: str | None
    torch_version: str | None
    save_mode: str | None
    created_unix: float | None
    files: int
    disk_nbytes: int
    components: list[ComponentInfo]
    optimizer_class: str | None = None
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    migrated_from: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for d, c in zip(out["components"], self.components, strict=True):
            d["num_tensors"], d["nbytes"] = c.num_tensors, c.nbytes
        out["total_tensors"] = sum(c.num_tensors for c in self.components)
        out["total_tensor_nbytes"] = sum(c.nbytes for c in self.components)
        return out

    def format(self) -> str:
        when = (
            datetime.datetime.fromtimestamp(self.created_unix).strftime("%Y-%m-%d %H:%M:%S")
            if self.created_unix else "?"
        )
        lines = [
            f"checkpoint {self.path}",
            f"  step {self.step} | world size {self.world_size} | format {self.format_version} | "
            f"ckptguard {self.ckptguard_version} | torch {self.torch_version} | "
            f"saved {self.save_mode} {when}",
            f"  {self.files} files, {format_nbytes(self.disk_nbytes)} on disk",
        ]
        if self.migrated_from:
            lines.append(f"  migrated from {self.migrated_from.get('path')} ({self.migrated_from.get('format')})")
        for c in self.components:
            extra = ""
            if c.name == OPTIMIZER:
                extra = f" {self.optimizer_class or '?'}, {len(self.param_groups)} param group(s),"
            where = c.stored_in if c.stored_in == "dcp" else f"rank files {_ranges(c.ranks)}"
            lines.append(
                f"{c.name} [{where}]{extra} {c.num_tensors} tensors, {format_nbytes(c.nbytes)}"
                + (f", {c.values} other values" if c.values else "")
            )
            shown = c.tensors
            if len(c.ranks) > 1:  # the same keys on every rank: list the first rank's
                shown = [t for t in c.tensors if t.key.split(".")[0] == f"rank{c.ranks[0]}"]
                lines.append(f"  (per rank; rank {c.ranks[0]} shown, {len(c.ranks)} ranks in all)")
            width = max([len(t.key) for t in shown] + [len(k) for k in c.per_parameter] + [0])
            if c.sample_values:
                items = list(c.sample_values.items())
                text = ", ".join(f"{k}={v!r}" for k, v in items[:8])
                lines.append(f"  {text}" + (f", ... ({len(items) - 8} more)" if len(items) > 8 else ""))
            for t in shown:
                lines.append(f"  {t.key:<{width}}  {_shape(t.shape):<12} {t.dtype:<9} {format_nbytes(t.nbytes):>10}")
            for param, ts in c.per_parameter.items():
                parts = ", ".join(f"{t.key} {_shape(t.shape)} {t.dtype}" for t in ts)
                lines.append(f"  {param:<{width}}  {parts}  ({format_nbytes(sum(t.nbytes for t in ts))})")
        total = sum(c.nbytes for c in self.components)
        count = sum(c.num_tensors for c in self.components)
        lines.append(f"total: {count} tensors, {format_nbytes(total)}")
        return "\n".join(lines)


@dataclass
class StepSummary:
    name: str
    step: int | None
    complete: bool
    world_size: int | None = None
    format_version: int | None = None
    ckptguard_version: str | None = None
    disk_nbytes: int = 0
    note: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # given to save(metrics=...)
    kept_by: str = ""  # the retention rules that keep it (those of the newest save)


def _format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in metrics.items())


@dataclass
class RootInfo:
    root: str
    steps: list[StepSummary]
    selected: CheckpointInfo | None
    branches: list[BranchSummary] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "steps": [asdict(s) for s in self.steps],
            "selected": self.selected.to_dict() if self.selected else None,
            "branches": [asdict(b) for b in self.branches],
        }

    def format(self) -> str:
        rules = any(s.kept_by for s in self.steps)
        lines = [f"root {self.root}", f"  {'checkpoint':<28} {'status':<11} {'world':>5} {'format':>6}  {'ckptguard':<9} {'size':>10}"
                 + (f"  {'kept by':<32}" if rules else "")
                 + ("  metrics" if any(s.metrics for s in self.steps) else "")]
        for s in self.steps:
            status = "complete" if s.complete else "INCOMPLETE"
            lines.append(
                f"  {s.name:<28} {status:<11} {s.world_size if s.world_size is not None else '-':>5} "
                f"{s.format_version if s.format_version is not None else '-':>6}  "
                f"{s.ckptguard_version or '-':<9} {format_nbytes(s.disk_nbytes):>10}"
                + (f"  {s.kept_by or '-':<32}" if rules else "")
                + (f"  {_format_metrics(s.metrics)}" if s.metrics else "")
                + (f"  {s.note}" if s.note else "")
            )
        if self.branches:
            lines.append("  set aside by rollbacks (never loaded, pruned or deleted by ckptguard):")
        for b in self.branches:
            when = (
                datetime.datetime.fromtimestamp(b.set_aside_unix).strftime("%Y-%m-%d %H:%M:%S")
                if b.set_aside_unix else "?"
            )
            lines.append(
                f"  {ABANDONED_DIR}/{b.name:<18} rolled back to step {b.rolled_back_to} at {when}: "
                f"steps {', '.join(map(str, b.steps)) or 'none'} ({format_nbytes(b.disk_nbytes)})"
            )
        if self.selected is not None:
            lines += ["", self.selected.format()]
        return "\n".join(lines)


@dataclass
class BranchSummary:
    """Checkpoints a rollback set aside (``ROOT/abandoned/branch-NNNN``, see ``layout.set_aside``)."""

    name: str
    path: str
    rolled_back_to: int | None
    steps: list[int]
    set_aside_unix: float | None
    disk_nbytes: int


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _ranges(ranks: list[int]) -> str:
    if not ranks:
        return "-"
    return f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"


def _tensor_info(key: str, t: Any) -> TensorInfo:
    if isinstance(t, TensorStorageMetadata):
        shape, dtype = list(t.size), t.properties.dtype
    else:
        shape, dtype = list(t.shape), t.dtype
    numel = 1
    for d in shape:
        numel *= d
    return TensorInfo(key, shape, str(dtype).removeprefix("torch."), numel * dtype.itemsize)


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) <= 16 and all(isinstance(v, (int, float, bool, str)) for v in value)
    return isinstance(value, (int, float, bool, str, type(None)))


def _dir_nbytes(path: Path) -> tuple[int, int]:
    files = [e for e in os.scandir(path) if e.is_file()]
    return len(files), sum(e.stat().st_size for e in files)


def _dcp_components(step_dir: Path) -> tuple[ComponentInfo, ComponentInfo | None, list[ComponentInfo]]:
    metadata = read_dcp_metadata(step_dir)  # checked against the manifest; no code run
    model = ComponentInfo(MODEL, "dcp")
    optimizer: ComponentInfo | None = None
    others: dict[str, ComponentInfo] = {}
    planner = metadata.planner_data or {}
    for key, md in metadata.state_dict_metadata.items():
        path = [str(p) for p in planner.get(key, key.split("."))]
        is_tensor = isinstance(md, TensorStorageMetadata)
        if path[0] == MODEL:
            comp = model
        elif path[0] == OPTIMIZER:
            optimizer = optimizer or ComponentInfo(OPTIMIZER, "dcp")
            if is_tensor and len(path) >= 4 and path[1] == "state":
                optimizer.per_parameter.setdefault(path[2], []).append(
                    _tensor_info(".".join(path[3:]), md)
                )
            else:
                optimizer.values += 1
            continue
        else:
            comp = others.setdefault(path[0], ComponentInfo(path[0], "dcp"))
        if is_tensor:
            comp.tensors.append(_tensor_info(".".join(path[1:]) or path[0], md))
        else:
            comp.values += 1
    return model, optimizer, list(others.values())


def _rank_components(step_dir: Path, world_size: int) -> list[ComponentInfo]:
    comps: dict[str, ComponentInfo] = {}
    for rank in progress(range(world_size), desc="rank files", unit="file"):
        path = step_dir / rank_filename(rank)
        if not path.is_file():
            continue
        payload = read_rank_file(path)
        for name, state in payload.get("states", {}).items():
            comp = comps.setdefault(name, ComponentInfo(name, "rank files"))
            comp.ranks.append(rank)
            for key, value in flatten(state).items():
                if isinstance(value, torch.Tensor):
                    comp.tensors.append(_tensor_info(f"rank{rank}.{key}" if key else f"rank{rank}", value))
                    continue
                comp.values += 1
                if comp.ranks == [rank] and name != RNG and _is_plain(value):
                    comp.sample_values[key] = list(value) if isinstance(value, tuple) else value
    return list(comps.values())


def inspect_checkpoint(step_dir: str | os.PathLike) -> CheckpointInfo:
    """Everything a complete checkpoint holds, from its manifest, .metadata and rank files."""
    step_dir = Path(step_dir)
    manifest = read_checked_manifest(step_dir)
    model, optimizer, others = _dcp_components(step_dir)
    world = manifest.get("world_size") or 1
    components = [model] + ([optimizer] if optimizer else []) + others
    components += _rank_components(step_dir, world)
    files, nbytes = _dir_nbytes(step_dir)
    info = manifest.get("info") or {}
    return CheckpointInfo(
        path=str(step_dir), step=manifest.get("step"), world_size=manifest.get("world_size"),
        format_version=manifest.get("format_version"), ckptguard_version=manifest.get("ckptguard_version"),
        torch_version=manifest.get("torch_version"), save_mode=manifest.get("save_mode"),
        created_unix=manifest.get("created_unix"), files=files, disk_nbytes=nbytes,
        components=components, optimizer_class=info.get("optimizer_class"),
        param_groups=info.get("param_groups") or [], migrated_from=manifest.get("migrated_from"),
    )


def summarize_root(root: str | os.PathLike) -> list[StepSummary]:
    """Every checkpoint directory under ``root``, complete or not, oldest first."""
    root = Path(root)
    layout = CheckpointLayout(root)
    out = []
    rules: Any = None
    for step in layout.complete_steps():
        d = layout.step_dir(step)
        try:
            m = read_checked_manifest(d)
            note = ""
        except Exception as e:  # noqa: BLE001 - listed, not fatal: the other steps still show
            m, note = {}, str(e).split(";")[0]
        out.append(StepSummary(
            d.name, step, True, m.get("world_size"), m.get("format_version"),
            m.get("ckptguard_version"), _dir_nbytes(d)[1], note, m.get("metrics") or {},
        ))
        rules = m.get("retention")  # the newest save's rules are the ones that apply next
    _explain_retention([s for s in out if s.complete], rules)
    for d in sorted(root.glob("step-*")):
        if d.is_dir() and not (d / MANIFEST_NAME).is_file():
            note = "no manifest: never loaded"
            if detect_legacy(d) is not None:
                note = "old index-keyed format: convert with ckptguard migrate (docs/cli-migrate.md)"
            out.append(StepSummary(d.name, None, False, disk_nbytes=_dir_nbytes(d)[1], note=note))
    for d in layout.transient_dirs():
        kind = d.name.rsplit(".", 1)[-1]
        note = {"partial": "save interrupted or in progress", "deleting": "deletion interrupted"}.get(kind, kind)
        out.append(StepSummary(d.name, None, False, disk_nbytes=_dir_nbytes(d)[1], note=note + ": never loaded"))
    return out


def _explain_retention(complete: list[StepSummary], rules: Any) -> None:
    """Fill ``kept_by``: which of the writer's retention rules (stored in each manifest since
    issue 15) keeps each complete checkpoint. Nothing for roots written before, or migrated."""
    if not isinstance(rules, dict):
        return
    try:
        policy = RetentionPolicy(**rules)
    except (TypeError, ValueError):
        return
    decision = policy.decide([s.step for s in complete], {s.step: s.metrics for s in complete})
    for s in complete:
        s.kept_by = decision.explain(s.step)


def summarize_branches(root: str | os.PathLike) -> list[BranchSummary]:
    """The checkpoints rollbacks set aside under ``root``, oldest branch first."""
    return [
        BranchSummary(
            b.name, str(b.path), b.rolled_back_to, b.steps, b.set_aside_unix,
            sum(_dir_nbytes(b.path / step_dirname(s))[1] for s in b.steps),
        )
        for b in CheckpointLayout(root).abandoned_branches()
    ]


@honours_unsafe_pickle
def inspect_path(
    path: str | os.PathLike, step: int | None = None, *, unsafe_pickle: bool = False
) -> CheckpointInfo | RootInfo:
    """A root's list of checkpoints plus the newest (or ``step``) in detail, or one checkpoint.

    ``.metadata`` is unpickled through an allowlist (``ckptguard.core.safe_pickle``);
    ``unsafe_pickle=True`` lifts it, for checkpoints you trust only.
    """
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST_NAME).is_file() and is_root(path):
        steps = summarize_root(path)
        complete = [s.step for s in steps if s.complete]
        selected = None
        if step is not None or complete:
            selected = inspect_checkpoint(find_checkpoint(path, step))
        return RootInfo(str(path), steps, selected, summarize_branches(path))
    return inspect_checkpoint(find_checkpoint(path, step))
