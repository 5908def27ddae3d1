"""Tensor-level checks: the checkpoint's keys, shapes and dtypes against the live objects before
``dcp.load``, and what the live objects hold after it.

Why before: DCP, asked for a key the checkpoint lacks or handed a tensor of another shape, fails
deep inside its planner with a message that names neither the key nor what to do. Why after:
``Optimizer.load_state_dict`` casts moments to the parameter's dtype and optimizer wrappers may
rebuild or drop their state, so "DCP loaded it" does not prove "the optimizer holds it".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ckptguard.core.nested import flatten
from ckptguard.core.safe_pickle import read_dcp_metadata
from ckptguard.guard.findings import Finding, Severity

_SHOWN = 8
# Hyperparameter names an optimizer class gains or loses between torch versions (e.g. AdamW's
# ``decoupled_weight_decay``): the live default is kept rather than refusing the checkpoint.
_GROUP_PREFIX = "optimizer.param_groups."


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (comparisons stay on this rank, with no collective)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _shown(keys: list[str]) -> str:
    head = ", ".join(keys[:_SHOWN])
    return head + (f" ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def _component(key: str) -> str:
    return key.split(".", 1)[0]


@dataclass
class KeyCheck:
    """Result of ``check_keys``: findings, the problems that make loading impossible (``fatal``),
    and template paths to drop so that DCP loads what it can (non-strict loads)."""

    findings: list[Finding] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)
    drop: list[tuple[Any, ...]] = field(default_factory=list)


def read_saved_keys(step_dir: str | Path) -> dict[str, Any]:
    """DCP's ``state_dict_metadata`` of a checkpoint: flattened key -> storage metadata."""
    return read_dcp_metadata(step_dir).state_dict_metadata  # checked, and no code run


def check_keys(saved: dict[str, Any], template: dict[str, Any], *, strict: bool) -> KeyCheck:
    """Compare a checkpoint's keys (``read_saved_keys``) with the live state dict ``template``.

    Missing keys (live, not saved) and unexpected keys (saved, not live) are fatal when
    ``strict``, and otherwise warnings (missing ones are dropped from the template so the live
    values stay). Shape mismatches are always fatal; dtype mismatches are fatal when ``strict``.
    """
    flat, mapping = flatten_state_dict(template)
    out = KeyCheck()

    missing = sorted(k for k in flat if k not in saved)
    # Whole components the live side lacks (a model-only manager) are check_components' business.
    unexpected = sorted(k for k in saved if k not in flat and _component(k) in template)
    # A hyperparameter name present on one side only, in a param group both sides have.
    groups_both = _group_indices(flat) & _group_indices(saved)
    soft_missing = [k for k in missing if _group_index(k) in groups_both and not isinstance(flat[k], torch.Tensor)]
    hard_missing = [k for k in missing if k not in soft_missing]
    soft_unexpected = [k for k in unexpected if _group_index(k) in groups_both and not isinstance(saved[k], TensorStorageMetadata)]
    hard_unexpected = [k for k in unexpected if k not in soft_unexpected]

    if soft_missing or soft_unexpected:
        out.drop += [mapping[k] for k in soft_missing]
        out.findings.append(Finding(
            "keys", "optimizer", Severity.WARNING,
            f"optimizer hyperparameter names differ between the checkpoint and the live optimizer "
            f"(usually a torch version change): not in the checkpoint: {_shown(soft_missing) or 'none'}; "
            f"only in the checkpoint: {_shown(soft_unexpected) or 'none'}. The live defaults are kept "
            "for the former and the latter are ignored; check they mean the same.",
            saved=soft_unexpected, current=soft_missing,
        ))
    for keys, what, fix in (
        (hard_missing, "missing from the checkpoint (the live objects have them)",
         "load with strict=False to keep their live values, or build the model/optimizer the way the checkpoint was saved"),
        (hard_unexpected, "in the checkpoint but not in the live objects (they would be dropped)",
         "load with strict=False to drop them on purpose, or build the model/optimizer the way the checkpoint was saved"),
    ):
        if not keys:
            continue
        for comp in sorted({_component(k) for k in keys}):
            ck = [k for k in keys if _component(k) == comp]
            msg = f"{len(ck)} {comp} key(s) {what}: {_shown(ck)}"
            if strict:
                out.fatal.append(f"{msg}. To fix: {fix}.")
            else:
                out.findings.append(Finding(
                    "keys", comp, Severity.WARNING, f"{msg}; loaded with strict=False, so "
                    + ("they keep their live values" if keys is hard_missing else "they are ignored"),
                    saved=None if keys is hard_missing else ck, current=ck if keys is hard_missing else None,
                ))
        if keys is hard_missing and not strict:
            out.drop += [mapping[k] for k in keys]

    shape_bad, dtype_bad = [], []
    for key in sorted(set(flat) & set(saved)):
        live, meta = flat[key], saved[key]
        live_is_tensor = isinstance(live, torch.Tensor)
        if live_is_tensor != isinstance(meta, TensorStorageMetadata):
            shape_bad.append(
                f"{key}: saved as {'a tensor' if not live_is_tensor else 'a non-tensor value'}, "
                f"live is {'a tensor' if live_is_tensor else type(live).__name__}"
            )
            continue
        if not live_is_tensor:
            continue
        if tuple(live.shape) != tuple(meta.size):
            shape_bad.append(f"{key}: saved shape {tuple(meta.size)}, live shape {tuple(live.shape)}")
        elif meta.properties.dtype != live.dtype:
            dtype_bad.append(f"{key}: saved {meta.properties.dtype}, live {live.dtype}")
    if shape_bad:
        out.fatal.append(
            f"{len(shape_bad)} tensor(s) differ in shape between checkpoint and live objects: "
            + "; ".join(shape_bad[:_SHOWN]) + (f" ... and {len(shape_bad) - _SHOWN} more" if len(shape_bad) > _SHOWN else "")
            + ". The model or optimizer is not built the way it was when the checkpoint was saved."
        )
    if dtype_bad:
        msg = (
            f"{len(dtype_bad)} tensor(s) differ in dtype between checkpoint and live objects: "
            + "; ".join(dtype_bad[:_SHOWN]) + (" ..." if len(dtype_bad) > _SHOWN else "")
            + ". Loading casts them to the live dtype, so the resumed values are not the saved ones"
        )
        if strict:
            out.fatal.append(msg + ". Build the model in the saved dtype, or load with strict=False to cast on purpose.")
        else:
            out.findings.append(Finding("keys", _component(dtype_bad[0]), Severity.WARNING, msg + " (strict=False: cast on purpose).",
                                        saved=dtype_bad, current=dtype_bad))
    return out


def _group_index(key: str) -> str | None:
    if not key.startswith(_GROUP_PREFIX):
        return None
    return key[len(_GROUP_PREFIX):].split(".", 1)[0]


def _group_indices(keys: Any) -> set[str]:
    return {i for i in map(_group_index, keys) if i is not None}


def drop_paths(template: dict[str, Any], paths: list[tuple[Any, ...]]) -> None:
    """Remove the entries at ``paths`` (from ``flatten_state_dict``'s mapping) from ``template``."""
    for path in paths:
        node: Any = template
        for part in path[:-1]:
            node = node[part]
        if isinstance(node, dict):
            node.pop(path[-1], None)


# ---------------------------------------------------------------------------- after load


def compare_nested(expected: Any, actual: Any, prefix: str = "") -> list[str]:
    """Every leaf of ``expected`` that ``actual`` lacks or holds differently, described.

    Tensors must be bitwise equal with the same dtype and shape (DTensors: the local shard).
    """
    exp = flatten(expected, prefix)
    act = flatten(actual, prefix)
    problems = []
    for key in exp:
        if key not in act:
            problems.append(f"{key}: missing after load")
            continue
        a, b = exp[key], act[key]
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                problems.append(f"{key}: {type(a).__name__} became {type(b).__name__}")
                continue
            a, b = _local(a), _local(b)
            if a.dtype != b.dtype:
                problems.append(f"{key}: dtype {a.dtype} became {b.dtype}")
            elif a.shape != b.shape:
                problems.append(f"{key}: shape {tuple(a.shape)} became {tuple(b.shape)}")
            elif a.numel() and b.numel() == 0:
                problems.append(f"{key}: empty after load")
            elif not _same_values(a.detach(), b.detach()):
                diff = ""
                if a.is_floating_point():
                    diff = f" (max abs diff {(a.detach().double() - b.detach().double()).abs().max().item():.3g})"
                problems.append(f"{key}: values differ{diff}")
        elif type(a) is not type(b) or a != b:
            problems.append(f"{key}: {a!r} became {b!r}")
    return problems


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality without copying: the same memory is equal by definition (a model's
    state dict often *is* its parameters), and tensors are compared on their own device."""
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    if a.device != b.device:
        b = b.to(a.device)
    return torch.equal(a, b)


def params_without_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[str], int]:
    """Names of the optimizer's parameters that hold no state now, and how many it has in all.

    Looks at ``optimizer.state`` directly: ``get_optimizer_state_dict`` would initialise an
    empty state with a zero-gradient step and hide the very loss we are looking for.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    empty = [names.get(id(p), f"<param {i}>") for i, p in enumerate(params) if not optimizer.state.get(p)]
    return empty, len(params)


def saved_params_with_state(saved: dict[str, Any]) -> int:
    """How many parameters have optimizer state in a checkpoint (``read_saved_keys``)."""
    return len({k.rsplit(".", 1)[0] for k in saved if k.startswith("optimizer.state.")})
