"""On-disk layout of a checkpoint root and the commit protocol that makes a save all-or-nothing.

::

    ROOT/
      .ckptguard.lock             flock held by rank 0 of the job that writes here
      trace.jsonl                 run trace of rank 0 (ckptguard.guard.trace, mgr.record)
      trace-rank-00001.jsonl ...  the other ranks' run traces
      step-00000500/              one complete checkpoint
        __0_0.distcp ...          DCP shards of model and optimizer (one file per rank)
        .metadata                 DCP's index of the shards (pickle; written by DCP)
        rank-00000.pt ...         per-rank state: RNG, dataloader, scheduler, extras
        ckptguard.json            manifest: metadata and a checksum of every file above
      .step-00000600.partial/     a save in progress (or one killed mid-way): never loaded

A checkpoint is complete when, and only when, a directory named ``step-NNNNNNNN`` holds a
``ckptguard.json``. The manifest is written last inside the ``.partial`` directory, after every
data file has been fsynced; then the directory is renamed into place and the root is fsynced.
``rename(2)`` is atomic, so a crash at any instant leaves either the old set of complete
checkpoints or the old set plus the new one, never a half-written ``step-*``. Deletion runs the
protocol backwards: rename to ``.step-*.deleting`` first, then remove, so that a crash while
deleting cannot leave a ``step-*`` directory whose files are partly gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ckptguard._faults import fault_point
from ckptguard._version import FORMAT_VERSION, __version__
from ckptguard.errors import CheckpointExistsError, CheckpointFormatError, CheckpointLockedError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "ckptguard.json"
LOCK_NAME = ".ckptguard.lock"
STEP_DIGITS = 8
_STEP_RE = re.compile(r"^step-(\d+)$")
_TRANSIENT_RE = re.compile(r"^\.step-(\d+)\.(partial|deleting|replaced)$")


def step_dirname(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:0{STEP_DIGITS}d}"


def rank_filename(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync it, and rename it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_durably(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_durably(path, json.dumps(obj, indent=1, sort_keys=True).encode())


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


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return bool(_STEP_RE.match(path.name)) and (path / MANIFEST_NAME).is_file()


class CheckpointLayout:
    """Names and moves directories under one checkpoint root; knows nothing of tensors."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def step_dir(self, step: int) -> Path:
        return self.root / step_dirname(step)

    def partial_dir(self, step: int) -> Path:
        return self.root / f".{step_dirname(step)}.partial"

    def complete_steps(self) -> list[int]:
        """Steps of complete checkpoints, oldest first. Partial and deleting ones are skipped."""
        if not self.root.is_dir():
            return []
        steps = []
        for entry in os.scandir(self.root):
            m = _STEP_RE.match(entry.name)
            if m and entry.is_dir() and os.path.isfile(os.path.join(entry.path, MANIFEST_NAME)):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def transient_dirs(self) -> list[Path]:
        """Leftovers of saves or deletions that a crash interrupted."""
        if not self.root.is_dir():
            return []
        return sorted(self.root / e.name for e in os.scandir(self.root) if _TRANSIENT_RE.match(e.name))

    def prepare_partial(self, step: int, overwrite: bool) -> Path:
        """Create an empty ``.partial`` directory for ``step`` (rank 0 only)."""
        final = self.step_dir(step)
        if final.exists() and not overwrite:
            raise CheckpointExistsError(
                f"{final} already holds a checkpoint for step {step}. Pass overwrite=True to "
                "replace it, or save under another step."
            )
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.partial_dir(step)
        if partial.exists():
            logger.warning("removing %s left by an interrupted save", partial)
            shutil.rmtree(partial)
        partial.mkdir()
        fsync_dir(self.root)
        return partial

    def commit(self, step: int, manifest: dict[str, Any]) -> Path:
        """Write the manifest and atomically publish ``.partial`` as ``step-*`` (rank 0 only).

        Every data file must already be fsynced by whoever wrote it.
        """
        partial = self.partial_dir(step)
        write_json_durably(partial / MANIFEST_NAME, manifest)
        fault_point("manifest_written")
        final = self.step_dir(step)
        replaced = None
        if final.exists():
            # overwrite=True: move the old one aside first; until the rename below the old
            # checkpoint stays complete under its .replaced name and is deleted only after.
            replaced = self.root / f".{step_dirname(step)}.replaced"
            if replaced.exists():
                shutil.rmtree(replaced)
            os.rename(final, replaced)
        try:
            if replaced is not None:
                fault_point("overwrite_replaced")
            os.rename(partial, final)
        except BaseException:
            # Put the old checkpoint back rather than leave the step missing until the next
            # recover(); a SIGKILL right here is what recover() handles.
            if replaced is not None and not final.exists():
                os.rename(replaced, final)
            raise
        fault_point("renamed")
        fsync_dir(self.root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        return final

    def delete(self, step: int) -> None:
        """Remove a complete checkpoint so that no crash can leave it half-deleted."""
        final = self.step_dir(step)
        doomed = self.root / f".{step_dirname(step)}.deleting"
        if doomed.exists():
            shutil.rmtree(doomed)
        os.rename(final, doomed)
        fsync_dir(self.root)
        fault_point("prune_deleting")
        shutil.rmtree(doomed, ignore_errors=True)

    def quarantine(self, step: int) -> Path:
        """Move a damaged checkpoint out of the set of complete ones, keeping its files.

        ``step-N.damaged`` matches neither the complete nor the transient pattern, so nothing
        lists, loads, prunes or removes it: it waits for a person to look at it.
        """
        final = self.step_dir(step)
        target = self.root / f"{final.name}.damaged"
        n = 1
        while target.exists():
            n += 1
            target = self.root / f"{final.name}.damaged{n}"
        os.rename(final, target)
        fsync_dir(self.root)
        return target

    def steps_without_manifest(self) -> list[int]:
        """Steps whose ``step-*`` directory lacks a manifest: not checkpoints, never loaded."""
        if not self.root.is_dir():
            return []
        return sorted(
            int(m.group(1))
            for e in os.scandir(self.root)
            if (m := _STEP_RE.match(e.name))
            and e.is_dir()
            and not os.path.isfile(os.path.join(e.path, MANIFEST_NAME))
        )

    def recover(self) -> None:
        """Finish or undo what a crash interrupted (rank 0, lock held).

        A ``.replaced`` directory whose ``step-*`` is missing is the old checkpoint of an
        overwrite killed between its two renames: it is complete, so it is put back. Every other
        leftover (``.partial``, ``.deleting``, a ``.replaced`` whose successor is in place) is
        removed.
        """
        for path in self.transient_dirs():
            m = _TRANSIENT_RE.match(path.name)
            assert m is not None
            final = self.step_dir(int(m.group(1)))
            if m.group(2) == "replaced" and not final.exists() and (path / MANIFEST_NAME).is_file():
                logger.warning("restoring %s from %s (an overwrite was interrupted)", final, path)
                os.rename(path, final)
                fsync_dir(self.root)
                continue
            logger.info("removing leftover %s", path)
            shutil.rmtree(path, ignore_errors=True)

    def clean_transient(self, keep: Path | None = None) -> None:
        """Remove leftovers of interrupted saves and deletions (rank 0, lock held)."""
        for path in self.transient_dirs():
            if keep is not None and path == keep:
                continue
            logger.info("removing leftover %s", path)
            shutil.rmtree(path, ignore_errors=True)

    def prune(self, keep_last: int | None, protect: int) -> list[int]:
        """Delete the oldest complete checkpoints beyond ``keep_last``; never ``protect``."""
        if keep_last is None:
            return []
        steps = self.complete_steps()
        doomed = [s for s in steps[:-keep_last] if s != protect] if len(steps) > keep_last else []
        for s in doomed:
            logger.info("retention: deleting %s", self.step_dir(s))
            self.delete(s)
        return doomed


class RootLock:
    """An exclusive ``flock`` on ``ROOT/.ckptguard.lock``, so two jobs never write one root.

    flock locks belong to an open file description, so a second manager in the same process is
    refused too. On file systems without flock support (some NFS setups) the lock is advisory
    at best; the message says so when acquiring fails for that reason.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = Path(root) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            holder = ""
            try:
                holder = self.path.read_text().strip()
            except OSError:
                pass
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise CheckpointLockedError(
                    f"{self.path} is locked by another CheckpointManager ({holder or 'unknown holder'}). "
                    "Two jobs writing one checkpoint root would interleave checkpoints: give each "
                    "run its own root, or close() the other manager first."
                ) from e
            raise CheckpointLockedError(f"cannot lock {self.path}: {e}") from e
        os.ftruncate(fd, 0)
        os.write(fd, f"pid={os.getpid()} host={os.uname().nodename}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
