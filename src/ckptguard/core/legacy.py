"""Old-format (index-keyed) checkpoints: recognise them without reading tensors.

The old format is what most trainers wrote before ckptguard: ``model.state_dict()`` next to the
raw ``optimizer.state_dict()``, whose ``state`` is keyed by each parameter's integer position in
the optimizer's ``param_groups``, saved with ``dcp.save`` (DCP stores those keys as strings) or
``torch.save``, often with ``step`` and ``lr_scheduler`` beside them. ``detect_legacy`` tells
such a checkpoint apart without reading tensors, so ``CheckpointManager.load()`` and the tools
can point at ``ckptguard migrate`` instead of starting fresh. Detection is part of the core
because ``load()`` needs it; reading and converting one is ``ckptguard.tools.legacy`` and
``ckptguard.tools.migrate``.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptguard.core.format import MANIFEST_NAME
from ckptguard.core.safe_pickle import (
    UnsafePickleError,
    read_dcp_metadata,
    unsafe_pickle_allowed,
)
from ckptguard.errors import CheckpointFormatError

_MODEL_KEYS = ("model", "model_state_dict", "state_dict", "module", "net")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt")
_SCHEDULER_KEYS = ("lr_scheduler", "scheduler", "lr_scheduler_state_dict", "scheduler_state_dict")
_STEP_KEYS = ("step", "global_step", "iteration", "iter")
_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin", ".pkl")


# ---------------------------------------------------------------------- detecting the old format


@dataclass
class LegacyCheckpoint:
    """An old-format checkpoint found on disk: where, how written, where its optimizer is."""

    path: Path
    kind: str  # "dcp" | "torch.save"
    optimizer_key: str

    def message(self, root: Path | None = None, others: list[Path] | None = None) -> str:
        target = root if root is not None else self.path.parent / (self.path.name + "-ckptguard")
        if target == self.path.parent and re.match(r"^step-\d{8}$", self.path.name):
            target = target.parent / (target.name + "-ckptguard")  # would collide with our name
        cmd = (
            f"ckptguard migrate {shlex.quote(str(self.path))} {shlex.quote(str(target))} "
            "--factory YOUR_MODULE:YOUR_FN"
        )
        where = f"{root} holds no ckptguard checkpoint, but " if root is not None else ""
        return (
            f"{where}{self.path} is an old-format checkpoint ({self.kind}): its optimizer state "
            f"'{self.optimizer_key}' is keyed by integer position in the optimizer's param_groups, "
            "not by parameter name, so ckptguard cannot restore it without knowing how the "
            "optimizer was built (starting fresh would silently drop the optimizer moments). "
            f"Convert it once with:\n    {cmd}\nwhere YOUR_FN builds the model and the optimizer "
            "the way the old trainer did and returns (model, optimizer); or pass --param-names "
            "FILE (parameter names in optimizer order) instead of --factory. See "
            "docs/cli-migrate.md."
            + (f" Other old-format checkpoints there: {[str(p) for p in others]}." if others else "")
        )


def _is_index_keyed_optimizer(obj: Any) -> bool:
    if not isinstance(obj, dict) or not isinstance(obj.get("param_groups"), list):
        return False
    if not isinstance(obj.get("state"), dict):
        return False
    groups = obj["param_groups"]
    return bool(groups) and all(
        isinstance(g, dict) and isinstance(g.get("params"), list)
        and all(isinstance(p, int) for p in g["params"])
        for g in groups
    )


def _find_optimizers(sd: Any, prefix: str = "", depth: int = 0) -> list[str]:
    """Dotted keys of every index-keyed optimizer state dict in ``sd`` (two levels deep)."""
    if not isinstance(sd, dict):
        return []
    if _is_index_keyed_optimizer(sd):
        return [prefix]
    if depth >= 2:
        return []
    found = []
    for k, v in sd.items():
        found += _find_optimizers(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
    return found


def _load_torch_file(path: Path, unsafe_pickle: bool = False) -> Any:
    unsafe_pickle = unsafe_pickle or unsafe_pickle_allowed()
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle, mmap=True)
    except RuntimeError:  # not a zip-format file: cannot mmap it
        return torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)


def detect_legacy(path: str | os.PathLike) -> LegacyCheckpoint | None:
    """``path`` as an old index-keyed checkpoint, or ``None`` if it is not one.

    A DCP directory is recognised from its ``.metadata`` alone (no tensor is read); a file is
    opened with ``weights_only=True`` and memory-mapped, so no tensor data is read either.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file() or (path / MANIFEST_NAME).is_file():
            return None
        try:
            metadata = read_dcp_metadata(path)  # through the allowlist: detection runs no code
        except UnsafePickleError:
            raise  # a crafted file: say so, instead of treating the root as empty
        except Exception:  # noqa: BLE001 - unreadable metadata: not ours to judge here
            return None
        for fqn_path in (metadata.planner_data or {}).values():
            parts = list(fqn_path)
            for i in range(1, len(parts) - 1):
                if parts[i] == "state" and str(parts[i + 1]).isdigit():
                    return LegacyCheckpoint(path, "dcp", ".".join(str(p) for p in parts[:i]))
        return None
    if path.is_file() and path.suffix in _FILE_SUFFIXES:
        try:
            obj = _load_torch_file(path)
        except Exception:  # noqa: BLE001 - not a torch file, or needs full unpickling
            return None
        found = _find_optimizers(obj)
        if found:
            return LegacyCheckpoint(path, "torch.save", found[0] or "<top level>")
    return None


def find_legacy_checkpoints(root: str | os.PathLike) -> list[LegacyCheckpoint]:
    """Old-format checkpoints at ``root`` or directly inside it."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [c for c in [detect_legacy(root)] if c is not None]
    for entry in sorted(root.iterdir(), key=_natural_key):
        if entry.name.startswith("."):
            continue
        legacy = detect_legacy(entry)
        if legacy is not None:
            found.append(legacy)
    return found


def _natural_key(path: Path) -> list:
    """``step_99`` before ``step_100``: digit runs compare as numbers."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", path.name) if t]


def refuse_legacy_root(root: str | os.PathLike) -> None:
    """Raise if ``root`` holds an old-format checkpoint (called by ``CheckpointManager.load``
    when the root has no ckptguard checkpoint, instead of silently starting from step 0).
    The command offered migrates the newest by name; the others are listed."""
    found = find_legacy_checkpoints(root)
    if found:
        newest = found[-1]
        others = [c.path for c in found if c is not newest]
        raise CheckpointFormatError(newest.message(Path(root), others))
