"""Old-format (index-keyed) checkpoints: read one without model code, for ``migrate``.

Recognising one is ``ckptguard.core.legacy`` (``load()`` needs it); its names are re-exported here
for the tools.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckptguard.core.format import MANIFEST_NAME
from ckptguard.core.legacy import (  # noqa: F401 - detection, re-exported for the tools
    _MODEL_KEYS,
    _OPTIMIZER_KEYS,
    _SCHEDULER_KEYS,
    _STEP_KEYS,
    LegacyCheckpoint,
    _find_optimizers,
    _load_torch_file,
    detect_legacy,
    find_legacy_checkpoints,
    refuse_legacy_root,
)
from ckptguard.core.safe_pickle import allow_unsafe_pickle
from ckptguard.errors import CheckpointFormatError
from ckptguard.tools.reader import load_tensor_state

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
