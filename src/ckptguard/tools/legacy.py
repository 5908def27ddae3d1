"""Old-format (index-keyed) checkpoints: recognise them, and read them without model code.

The old format is what most trainers wrote before ckptguard: ``model.state_dict()`` next to the
raw ``optimizer.state_dict()``, whose ``state`` is keyed by each parameter's integer position in
the optimizer's ``param_groups``, saved with ``dcp.save`` (DCP stores those keys as strings) or
``torch.save``, often with ``step`` and ``lr_scheduler`` beside them. ``detect_legacy`` tells
such a checkpoint apart without reading tensors, so ``CheckpointManager.load()`` and the tools
can point at ``ckptguard migrate`` instead of starting fresh; ``read_legacy`` loads one for
``ckptguard.migrate``.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptguard.errors import CheckpointFormatError
from ckptguard.layout import MANIFEST_NAME
from ckptguard.safe_pickle import (
    UnsafePickleError,
    allow_unsafe_pickle,
    read_dcp_metadata,
    unsafe_pickle_allowed,
)

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


# ---------------------------------------------------------------------- reading the old format


@dataclass
class LegacyState:
    """The parts of an old checkpoint that migrate uses, and the keys it leaves behind."""

    source: Path
    kind: str
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    step: int | None
    lr_scheduler: Any | None
    keys: dict[str, str | None]  # which key held what
    unused_keys: list[str]


def _get(sd: dict, dotted: str) -> Any:
    obj: Any = sd
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(dotted)
        obj = obj[part]
    return obj


def _pick(sd: dict, given: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str | None:
    if given is not None:
        try:
            _get(sd, given)
        except KeyError:
            raise CheckpointFormatError(
                f"{path} has no key '{given}' (asked for as the {what}); top-level keys: {sorted(sd)}"
            ) from None
        return given
    for name in candidates:
        if name in sd:
            return name
    return None


def read_legacy(
    path: str | os.PathLike,
    *,
    model_key: str | None = None,
    optimizer_key: str | None = None,
    scheduler_key: str | None = None,
    unsafe_pickle: bool = False,
) -> LegacyState:
    """Load an old checkpoint (DCP directory or ``torch.save`` file) and find its parts."""
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        raise CheckpointFormatError(f"{path} is already a ckptguard checkpoint; nothing to migrate")
    if path.is_dir():
        from ckptguard.tools.reader import load_tensor_state

        with allow_unsafe_pickle(unsafe_pickle):
            kind, sd = "dcp", load_tensor_state(path)
    elif path.is_file():
        kind = "torch.save"
        try:
            sd = _load_torch_file(path, unsafe_pickle)
        except Exception as e:
            hint = "" if unsafe_pickle else (
                " If it holds pickled objects beyond tensors and plain values and you trust the "
                "file, pass --unsafe-pickle (Python: unsafe_pickle=True)."
            )
            raise CheckpointFormatError(f"cannot read {path} with torch.load: {e}.{hint}") from e
    else:
        raise CheckpointFormatError(f"{path} does not exist")
    if not isinstance(sd, dict):
        raise CheckpointFormatError(f"{path} holds a {type(sd).__name__}, not a dict of states")

    opt_key = _pick(sd, optimizer_key, _OPTIMIZER_KEYS, "optimizer", path)
    if opt_key is None:
        found = _find_optimizers(sd)
        if len(found) != 1:
            raise CheckpointFormatError(
                f"{path}: found {len(found)} index-keyed optimizer state dicts ({found or 'none'}) "
                f"among keys {sorted(sd)}; name the right one with --optimizer-key"
            )
        opt_key = found[0]
    optimizer = _normalise_optimizer(_get(sd, opt_key) if opt_key else sd, path, opt_key)

    parent = sd if "." not in opt_key else _get(sd, opt_key.rsplit(".", 1)[0])
    mdl_key = _pick(sd, model_key, _MODEL_KEYS, "model", path)
    if mdl_key is None and parent is not sd:
        mdl_key = next((f"{opt_key.rsplit('.', 1)[0]}.{k}" for k in _MODEL_KEYS if k in parent), None)
    if mdl_key is None:
        raise CheckpointFormatError(
            f"{path}: no model state dict under any of {list(_MODEL_KEYS)} (keys: {sorted(sd)}); "
            "name it with --model-key"
        )
    model = _get(sd, mdl_key)
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointFormatError(f"{path}: '{mdl_key}' is not a model state dict of tensors")

    sched_key = _pick(sd, scheduler_key, _SCHEDULER_KEYS, "LR scheduler", path)
    step_key = next((k for k in _STEP_KEYS if k in sd), None)
    step = _as_step(sd[step_key], path, step_key) if step_key else None
    used = {k.split(".")[0] for k in (opt_key, mdl_key, sched_key, step_key) if k}
    return LegacyState(
        source=path, kind=kind, model=dict(model), optimizer=optimizer, step=step,
        lr_scheduler=_get(sd, sched_key) if sched_key else None,
        keys={"model": mdl_key, "optimizer": opt_key, "lr_scheduler": sched_key, "step": step_key},
        unused_keys=sorted(str(k) for k in sd if str(k) not in used),
    )


def _as_step(value: Any, path: Path, key: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointFormatError(f"{path}: '{key}' = {value!r} is not a step number; pass --step")
    return value


def _normalise_optimizer(osd: Any, path: Path, key: str) -> dict[str, Any]:
    """Integer keys everywhere (DCP stores ``state`` keys as strings) and a checked structure."""
    if not isinstance(osd, dict) or not isinstance(osd.get("param_groups"), list):
        raise CheckpointFormatError(f"{path}: '{key}' is not an optimizer state dict (no param_groups)")
    state: dict[int, dict] = {}
    for k, v in (osd.get("state") or {}).items():
        if not str(k).isdigit():
            raise CheckpointFormatError(
                f"{path}: optimizer state key {k!r} is not an integer position; this checkpoint is "
                "not in the index-keyed format (if it is keyed by name, it needs no migration)"
            )
        state[int(k)] = dict(v)
    groups = []
    for i, g in enumerate(osd["param_groups"]):
        params = g.get("params") if isinstance(g, dict) else None
        if not isinstance(params, list) or not all(isinstance(p, int) for p in params):
            raise CheckpointFormatError(f"{path}: param_groups[{i}]['params'] is not a list of integer positions")
        groups.append(dict(g))
    return {"state": state, "param_groups": groups}
