"""Names and schema of the on-disk format: step directory and rank file names, the manifest.

Kept apart from the code that moves directories (``commit``) so that every reader (the manager's
load, the tools, the guard) agrees with the writer on one set of names and checks.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from ckptguard._version import FORMAT_VERSION, __version__
from ckptguard.errors import CheckpointFormatError

MANIFEST_NAME = "ckptguard.json"
LOCK_NAME = ".ckptguard.lock"
STEP_DIGITS = 8
STEP_RE = re.compile(r"^step-(\d+)$")
TRANSIENT_RE = re.compile(r"^\.step-(\d+)\.(partial|deleting|replaced)$")
ABANDONED_DIR = "abandoned"
BRANCH_RECORD = "branch.json"
SET_ASIDE_INTENT = ".set-aside.json"
BRANCH_RE = re.compile(r"^branch-(\d+)$")


def step_dirname(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:0{STEP_DIGITS}d}"


def rank_filename(rank: int) -> str:
    return f"rank-{rank:05d}.pt"



def manifest_header(
    *, step: int, world_size: int, save_mode: str, components: list[str], info: dict[str, Any]
) -> dict[str, Any]:
    """The manifest's metadata fields; ``files`` and ``committed_unix`` are added at commit.

    One builder for every writer of checkpoints (the manager, ``migrate``), so the fields a
    reader relies on cannot drift apart.
    """
    return {
        "format": "ckptguard",
        "format_version": FORMAT_VERSION,
        "ckptguard_version": __version__,
        "torch_version": torch.__version__,
        "step": step,
        "world_size": world_size,
        "created_unix": time.time(),
        "save_mode": save_mode,
        "components": components,
        "info": info,
    }


def read_manifest(step_dir: str | os.PathLike) -> dict[str, Any]:
    with open(Path(step_dir) / MANIFEST_NAME, encoding="utf-8") as f:
        return json.load(f)


def read_checked_manifest(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint; refused, naming the file, if it is unreadable,
    lacks the fields a load needs, or has a format newer than this ckptguard reads."""
    path = Path(step_dir) / MANIFEST_NAME
    try:
        manifest = read_manifest(step_dir)
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(
            f"cannot read the manifest {path}: {type(e).__name__}: {e}. It is written last "
            "and atomically, so the file was damaged after the save."
        ) from e
    problems = [
        f"'{key}' is missing or not {kind.__name__}"
        for key, kind in (("files", dict), ("world_size", int), ("format_version", int))
        if not isinstance(manifest.get(key) if isinstance(manifest, dict) else None, kind)
    ]
    if problems:
        raise CheckpointFormatError(f"the manifest {path} is damaged: {'; '.join(problems)}")
    version = manifest["format_version"]
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{step_dir} has format_version={version!r}; this ckptguard ({__version__}) reads "
            f"format versions up to {FORMAT_VERSION}. Upgrade ckptguard to read it."
        )
    return manifest

