"""Load a ckptguard checkpoint into plain tensors and values, with no model code.

DCP's ``_EmptyStateDictLoadPlanner`` rebuilds the saved state dict from ``.metadata`` alone,
with every sharded tensor gathered to its full shape, so checkpoints written by different world
sizes compare key for key. The per-rank files are read with ``weights_only=True``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.format import MANIFEST_NAME, rank_filename, read_checked_manifest, read_manifest
from ckptguard.core.legacy import detect_legacy, find_legacy_checkpoints
from ckptguard.core.nested import flatten, values_equal  # noqa: F401 - part of the tools API
from ckptguard.core.records import read_rank_file
from ckptguard.core.safe_pickle import (
    SafeEmptyStateDictLoadPlanner,
    SafeFileSystemReader,
    read_dcp_metadata,
    unsafe_pickle_cause,
)
from ckptguard.errors import CheckpointFormatError, CheckpointNotFoundError


def load_tensor_state(step_dir: str | Path, keys: set[str] | None = None) -> dict[str, Any]:
    """The DCP part (model, optimizer) as a nested dict of full tensors and values.

    ``keys`` restricts the load to those top-level (or dotted) keys, e.g. ``{"model"}`` reads
    the weights and never touches the optimizer's bytes.
    """
    step_dir = Path(step_dir)
    if not (step_dir / ".metadata").is_file():
        raise CheckpointFormatError(f"{step_dir} has no DCP .metadata file: not a checkpoint")
    metadata = read_dcp_metadata(step_dir)  # checked, through the allowlist: raises ours
    sd: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _load_state_dict(
                sd,
                storage_reader=SafeFileSystemReader(step_dir, metadata=metadata),
                planner=SafeEmptyStateDictLoadPlanner(keys=keys),  # weights_only for values
                no_dist=True,
            )
        except (Exception, CheckpointException) as e:  # the latter is a BaseException
            if (refused := unsafe_pickle_cause(e)) is not None:
                raise refused from e
            raise
    return sd


def load_rank_states(step_dir: str | Path) -> list[dict[str, Any]]:
    """Each rank's ``rank-NNNNN.pt`` payload, in rank order."""
    step_dir = Path(step_dir)
    manifest = read_manifest(step_dir) if (step_dir / MANIFEST_NAME).is_file() else {}
    world = manifest.get("world_size")
    if world is None:
        world = len(list(step_dir.glob("rank-*.pt")))
    return [read_rank_file(step_dir / rank_filename(r)) for r in range(world)]


def load_checkpoint(step_dir: str | Path) -> dict[str, Any]:
    """Everything in a checkpoint, flattened: ``model.*``, ``optimizer.*`` (full tensors) and
    ``rank{R}.{component}.*`` from the per-rank files."""
    flat = flatten(load_tensor_state(step_dir))
    for r, payload in enumerate(load_rank_states(step_dir)):
        flat.update(flatten(payload.get("states", {}), f"rank{r}"))
    return flat


# ---------------------------------------------------------------------- finding a checkpoint


def is_root(path: str | Path) -> bool:
    """Whether ``path`` looks like a checkpoint root (holds step directories or their leftovers)."""
    layout = CheckpointLayout(path)
    return bool(
        layout.complete_steps()
        or layout.transient_dirs()
        or any(Path(path).glob("step-*"))
        or (Path(path) / ".ckptguard.lock").exists()
    )


def find_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """The complete checkpoint directory ``path`` names: itself, or the newest (or ``step``)
    of the root it names. Raises an error that says what was found instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} does not exist")
    if (path / MANIFEST_NAME).is_file():
        if step is not None and read_checked_manifest(path).get("step") != step:
            raise CheckpointNotFoundError(
                f"{path} is the checkpoint of step {read_checked_manifest(path).get('step')}, not "
                f"of step {step}; pass its root to choose a step"
            )
        return path
    if path.is_dir() and is_root(path):
        layout = CheckpointLayout(path)
        steps = layout.complete_steps()
        if step is None and steps:
            return layout.step_dir(steps[-1])
        if step is not None and step in steps:
            return layout.step_dir(step)
        others = [p.name for p in layout.transient_dirs()]
        others += [p.name for p in path.glob("step-*") if not (p / MANIFEST_NAME).is_file()]
        want = f"checkpoint of step {step}" if step is not None else "complete checkpoint"
        old = find_legacy_checkpoints(path)
        if old and step is None:
            raise CheckpointFormatError(old[-1].message(path, [c.path for c in old[:-1]]))
        raise CheckpointNotFoundError(
            f"{path} holds no {want}; complete steps: {steps or 'none'}"
            + (f"; incomplete (never loaded): {sorted(others)}" if others else "")
        )
    raise CheckpointFormatError(describe_non_checkpoint(path))


def describe_non_checkpoint(path: str | Path) -> str:
    """Why ``path`` is not a complete ckptguard checkpoint, and what to do about it."""
    path = Path(path)
    legacy = detect_legacy(path)
    if legacy is not None:
        return legacy.message()
    inside = find_legacy_checkpoints(path) if path.is_dir() else []
    if inside:
        return f"{path} holds no ckptguard checkpoint. " + inside[0].message()
    if path.is_file():
        return (
            f"{path} is a file, not a ckptguard checkpoint (a step-NNNNNNNN directory with a "
            f"{MANIFEST_NAME} manifest, or a root holding such directories)"
        )
    if path.name.startswith(".step-") or (path / ".metadata").is_file():
        return (
            f"{path} is an incomplete checkpoint: it has no {MANIFEST_NAME}, which ckptguard "
            "writes last, so the save that made it was interrupted or is still running. "
            "CheckpointManager.load() never uses it; load an earlier complete step."
        )
    return (
        f"{path} is not a checkpoint: no {MANIFEST_NAME}, no DCP .metadata, and no step-NNNNNNNN "
        "directories"
    )
