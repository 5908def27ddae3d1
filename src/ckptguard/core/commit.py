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
      abandoned/branch-0001/      checkpoints a rollback set aside (``set_aside``), with a
        branch.json ...           record of why; never listed, loaded, pruned or deleted

A checkpoint is complete when, and only when, a directory named ``step-NNNNNNNN`` holds a
``ckptguard.json``. The manifest is written last inside the ``.partial`` directory, after every
data file has been fsynced; then the directory is renamed into place and the root is fsynced.
``rename(2)`` is atomic, so a crash at any instant leaves either the old set of complete
checkpoints or the old set plus the new one, never a half-written ``step-*``. Deletion runs the
protocol backwards: rename to ``.step-*.deleting`` first, then remove, so that a crash while
deleting cannot leave a ``step-*`` directory whose files are partly gone. ``overwrite=True``
swaps the new directory with the old ``step-*`` in one ``renameat2(RENAME_EXCHANGE)`` where the
file system allows it, so even a reader that never runs ``recover`` sees old or new, complete.

A rollback (``load(step=S)`` while newer checkpoints exist, then a save) moves every step after S
out of the root in one logical step: an intent file ``.set-aside.json`` naming them is written
first (atomically), and from then on ``complete_steps`` hides them; the renames follow, and the
intent is removed last. A crash in between is finished by ``recover``, so no instant lets the
abandoned branch be chosen as the latest checkpoint again, and S itself is never touched.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import gc
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
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
ABANDONED_DIR = "abandoned"
BRANCH_RECORD = "branch.json"
SET_ASIDE_INTENT = ".set-aside.json"
_BRANCH_RE = re.compile(r"^branch-(\d+)$")


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


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two directory entries in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    ``False`` where the platform or file system cannot, and nothing was changed.

    Why: replacing ``step-N`` with two renames leaves an instant with no ``step-N`` at all,
    which a reader that does not run ``recover`` (a job that only loads) would take for a
    missing checkpoint and resume from an older one, or from scratch.
    """
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


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


@dataclass
class AbandonedBranch:
    """Checkpoints a rollback set aside: ``ROOT/abandoned/<name>/step-*`` and its record."""

    name: str
    path: Path
    rolled_back_to: int | None  # the step the new branch started from
    steps: list[int] = field(default_factory=list)  # step directories present
    set_aside_unix: float | None = None
    reason: str = ""


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
        hidden = set(self._set_aside_intent().get("steps", []))  # a set-aside under way
        return sorted(s for s in steps if s not in hidden)

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
            fault_point("overwrite_replaced")
            if exchange_paths(partial, final):
                # overwrite=True in one atomic step: every instant shows a complete step-N, the
                # old one before the swap, the new one after. The old one now has the .partial
                # name; a crash before it is removed leaves it to recover().
                fault_point("renamed")
                fsync_dir(self.root)
                shutil.rmtree(partial, ignore_errors=True)
                return final
            # No atomic swap on this file system: move the old one aside first; until the
            # rename below it stays complete under its .replaced name (recover() puts it back
            # after a crash; a reader that does not recover misses the step in between).
            replaced = self.root / f".{step_dirname(step)}.replaced"
            if replaced.exists():
                shutil.rmtree(replaced)
            os.rename(final, replaced)
        try:
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

    def deleting_dir(self, step: int) -> Path:
        return self.root / f".{step_dirname(step)}.deleting"

    def delete(self, step: int) -> None:
        """Remove a complete checkpoint now, so that no crash can leave it half-deleted."""
        for doomed in self.doom([step]):
            self.remove_doomed(doomed)

    def doom(self, steps: list[int]) -> list[Path]:
        """Make complete checkpoints non-loadable in one atomic step each: rename ``step-N`` to
        ``.step-N.deleting``, then one fsync of the root for the batch. Returns the new paths,
        in the order given, for ``remove_doomed`` (which may run later, in any thread).

        Why split from the removal: the rename is cheap and is what makes the deletion safe (no
        instant shows a ``step-*`` with files missing); removing a GiB of files is slow and
        need not delay a save (see ``BackgroundDeleter``).
        """
        doomed = []
        for step in steps:
            target = self.deleting_dir(step)
            if target.exists():  # an earlier deletion of this step number never finished
                shutil.rmtree(target, onerror=_ignore_vanished)
            os.rename(self.step_dir(step), target)
            doomed.append(target)
        if doomed:
            fsync_dir(self.root)
            fault_point("prune_deleting")
        return doomed

    def remove_doomed(self, path: Path) -> None:
        """Remove a checkpoint that ``doom`` renamed (any thread; two removers of one path
        may race, e.g. a closed manager's deleter and the next writer's: neither fails).

        The manifest goes first, so a ``.deleting`` directory a crash leaves behind is not a
        checkpoint even if someone renames it back by hand. Raises ``OSError`` naming the first
        file that could not be removed (and how many more), after removing what it could."""
        try:
            os.unlink(path / MANIFEST_NAME)
        except FileNotFoundError:
            pass
        fault_point("prune_removing")
        failures: list[tuple[str, BaseException]] = []

        def collect(func: Any, failed: str, exc_info: Any) -> None:
            if not isinstance(exc_info[1], FileNotFoundError):
                failures.append((failed, exc_info[1]))

        shutil.rmtree(path, onerror=collect)
        if failures:
            failed, error = failures[0]
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise OSError(getattr(error, "errno", None), f"cannot remove {failed}{more}: {error}")

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

    def recover(self, *, defer_deleting: bool = False) -> list[Path]:
        """Finish or undo what a crash interrupted (rank 0, lock held).

        A ``.replaced`` directory whose ``step-*`` is missing is the old checkpoint of an
        overwrite killed between its two renames: it is complete, so it is put back. Every other
        leftover (``.partial``, ``.deleting``, a ``.replaced`` whose successor is in place) is
        removed. A set-aside that a crash interrupted is finished (``set_aside``).

        ``defer_deleting``: leave ``.deleting`` directories in place and return them (oldest
        step first), for the caller to remove in the background: they are no checkpoint
        already, and removing them here would put a whole checkpoint's deletion inside a save.
        """
        deferred: list[Path] = []
        intent = self._set_aside_intent()
        if intent:
            logger.warning("finishing the set-aside of steps %s interrupted by a crash", intent["steps"])
            self._finish_set_aside(intent)
        for path in self.transient_dirs():
            m = _TRANSIENT_RE.match(path.name)
            assert m is not None
            final = self.step_dir(int(m.group(1)))
            if m.group(2) == "replaced" and not final.exists() and (path / MANIFEST_NAME).is_file():
                logger.warning("restoring %s from %s (an overwrite was interrupted)", final, path)
                os.rename(path, final)
                fsync_dir(self.root)
                continue
            if m.group(2) == "deleting" and defer_deleting:
                deferred.append(path)
                continue
            logger.info("removing leftover %s", path)
            shutil.rmtree(path, ignore_errors=True)
        return deferred

    def clean_transient(self, keep: Path | None = None) -> None:
        """Remove leftovers of interrupted saves and deletions (rank 0, lock held)."""
        for path in self.transient_dirs():
            if keep is not None and path == keep:
                continue
            logger.info("removing leftover %s", path)
            shutil.rmtree(path, ignore_errors=True)

    def retention_doomed(self, keep_last: int | None, protect: int) -> list[int]:
        """The complete checkpoints beyond ``keep_last``, oldest first: never ``protect`` (the
        one just saved) and never the newest complete one, whatever ``keep_last`` says.
        Only the live branch counts: set-aside checkpoints are not among ``complete_steps``."""
        if keep_last is None:
            return []
        steps = self.complete_steps()
        if len(steps) <= max(keep_last, 1):
            return []
        return [s for s in steps[: -max(keep_last, 1)] if s != protect]

    def prune(self, keep_last: int | None, protect: int) -> list[int]:
        """Delete the oldest complete checkpoints beyond ``keep_last`` now (see
        ``retention_doomed``); the manager instead dooms them and removes them in the
        background (``BackgroundDeleter``)."""
        doomed = self.retention_doomed(keep_last, protect)
        for s in doomed:
            logger.info("retention: deleting %s", self.step_dir(s))
        for path in self.doom(doomed):
            self.remove_doomed(path)
        return doomed

    # ------------------------------------------------------------------ rollback branches

    def set_aside(self, after_step: int, reason: str) -> AbandonedBranch | None:
        """Move every checkpoint after ``after_step`` to ``abandoned/branch-NNNN/`` (rank 0,
        lock held); ``None`` if there is none.

        After a rollback to ``after_step`` the newer checkpoints belong to a run the user
        abandoned: left in place, "the highest step" would resume it. They are kept, since a
        person may want to look at them, under names that nothing here lists, loads, prunes or
        deletes. The intent file written first makes the move a single atomic step for every
        reader (see the module docstring); the caller must call this before it renames the new
        branch's first checkpoint into place.
        """
        steps = sorted({s for s in self.complete_steps() + self.steps_without_manifest() if s > after_step})
        if not steps:
            return None
        base = self.root / ABANDONED_DIR
        taken = [int(m.group(1)) for e in (os.scandir(base) if base.is_dir() else []) if (m := _BRANCH_RE.match(e.name))]
        intent = {
            "branch": f"branch-{max(taken, default=0) + 1:04d}", "rolled_back_to": after_step,
            "steps": steps, "set_aside_unix": time.time(), "reason": reason,
        }
        write_json_durably(self.root / SET_ASIDE_INTENT, intent)  # from here on, steps are hidden
        return self._finish_set_aside(intent)

    def _finish_set_aside(self, intent: dict[str, Any]) -> AbandonedBranch:
        """The renames of a set-aside whose intent is written; idempotent, so ``recover`` can
        finish one that a crash interrupted."""
        target = self.root / ABANDONED_DIR / intent["branch"]
        target.mkdir(parents=True, exist_ok=True)
        fsync_dir(target.parent)
        fsync_dir(self.root)
        if not (target / BRANCH_RECORD).is_file():
            write_json_durably(target / BRANCH_RECORD, intent)
        for step in intent["steps"]:
            src, dst = self.step_dir(step), target / step_dirname(step)
            if src.exists() and dst.exists():
                raise CheckpointFormatError(
                    f"cannot set {src} aside: {dst} exists already. Move one of them out of "
                    f"{self.root} by hand, then delete {self.root / SET_ASIDE_INTENT}."
                )
            if src.exists():
                os.rename(src, dst)
        fsync_dir(target)
        fsync_dir(self.root)
        os.unlink(self.root / SET_ASIDE_INTENT)
        fsync_dir(self.root)
        return self._branch_info(target)

    def _set_aside_intent(self) -> dict[str, Any]:
        try:
            with open(self.root / SET_ASIDE_INTENT, encoding="utf-8") as f:
                intent = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # written atomically: damaged after the fact
            raise CheckpointFormatError(
                f"cannot read {self.root / SET_ASIDE_INTENT} ({e}): it names the checkpoints a "
                "rollback is setting aside. Move the newer step-* directories it named out of the "
                "root by hand, then delete it."
            ) from e
        return intent

    def abandoned_branches(self) -> list[AbandonedBranch]:
        """Every set of checkpoints a rollback set aside, oldest first."""
        base = self.root / ABANDONED_DIR
        if not base.is_dir():
            return []
        return [
            self._branch_info(Path(e.path))
            for e in sorted(os.scandir(base), key=lambda e: e.name)
            if _BRANCH_RE.match(e.name) and e.is_dir()
        ]

    @staticmethod
    def _branch_info(path: Path) -> AbandonedBranch:
        try:
            record = json.loads((path / BRANCH_RECORD).read_text())
        except (OSError, ValueError):
            record = {}
        steps = sorted(int(m.group(1)) for e in os.scandir(path) if (m := _STEP_RE.match(e.name)) and e.is_dir())
        return AbandonedBranch(
            path.name, path, record.get("rolled_back_to"), steps, record.get("set_aside_unix"),
            record.get("reason", ""),
        )


def _ignore_vanished(func: Any, path: str, exc_info: Any) -> None:
    """``rmtree`` error handler: a file another remover took first is not an error."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


@dataclass
class DeletionFailure:
    """A retention deletion that failed: what, why, when. The directory stays (it is no
    checkpoint: its name is ``.step-N.deleting``, or it was never renamed); the next writer
    retries it."""

    path: Path
    error: str
    unix: float = field(default_factory=time.time)


class BackgroundDeleter:
    """Removes doomed checkpoints (``CheckpointLayout.doom``) in one background thread, in the
    order submitted, one checkpoint at a time, so that ``rmtree`` of a GiB never delays a
    ``save()`` or a training step.

    The thread exists only while there is work: it starts on ``submit`` and ends when the
    queue is empty (or after the current checkpoint once ``stop`` is called), so an idle or
    dropped manager holds no thread. It is a daemon thread: a process that exits without
    ``close()`` does not wait for it; what it leaves is a ``.deleting`` directory, which no
    load considers and the next writer removes (``recover(defer_deleting=True)``).

    Failures never raise into training: each is logged when it happens, kept in ``failures``
    and handed once to ``take_unreported`` (the manager reports them at the next save or close).
    A path that failed is not retried by this deleter (it would fail at every save); the next
    writer retries it.
    """

    def __init__(self, layout: CheckpointLayout) -> None:
        self._layout = layout  # never the manager: the thread must not keep it alive
        self._cond = threading.Condition()
        self._queue: deque[Path] = deque()
        self._busy: Path | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.failures: list[DeletionFailure] = []
        self._unreported: list[DeletionFailure] = []

    def submit(self, paths: list[Path], *, retry_failed: bool = False) -> None:
        """Queue ``.deleting`` directories for removal (skipping those queued or in progress,
        and unless ``retry_failed``, those that failed here before)."""
        with self._cond:
            failed = {f.path for f in self.failures}
            if self._stopped:
                return
            for path in paths:
                if path in self._queue or path == self._busy or (path in failed and not retry_failed):
                    continue
                self._queue.append(path)
            if self._queue and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ckptguard-delete", daemon=True)
                self._thread.start()

    def record_failure(self, path: Path, error: BaseException | str) -> DeletionFailure:
        failure = DeletionFailure(Path(path), error if isinstance(error, str) else _describe(error))
        with self._cond:
            self.failures.append(failure)
            self._unreported.append(failure)
        return failure

    def take_unreported(self) -> list[DeletionFailure]:
        """Failures not yet reported to the user; each is handed out once."""
        with self._cond:
            out, self._unreported = self._unreported, []
        return out

    def pending(self) -> list[Path]:
        """Directories still to remove: the one in progress first, then the queue."""
        with self._cond:
            return ([self._busy] if self._busy is not None else []) + list(self._queue)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued deletion is done (or failed); ``False`` on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy is None and not self._queue, timeout_s)

    def stop(self) -> list[Path]:
        """Accept no more work and drop the queue; the checkpoint in progress is finished by
        the thread, which then ends. Never waits. Returns what is left to the next writer."""
        with self._cond:
            self._stopped = True
            left = ([self._busy] if self._busy is not None else []) + list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        return left

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = None
                if self._stopped or not self._queue:
                    self._thread = None
                    self._cond.notify_all()
                    return
                path = self._busy = self._queue.popleft()
                self._cond.notify_all()
            started = time.monotonic()
            try:
                self._layout.remove_doomed(path)
            except Exception as e:  # noqa: BLE001 - never into training; reported at next save/close
                failure = self.record_failure(path, e)
                logger.warning(
                    "retention: could not remove %s: %s. It is no longer a checkpoint (nothing "
                    "loads a .deleting directory) but still takes disk space; the next writer of "
                    "%s retries it. Fix the cause (permissions, I/O errors) or remove it by hand.",
                    path, failure.error, self._layout.root,
                )
            else:
                logger.info("retention: removed %s in %.2fs (background)", path, time.monotonic() - started)


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# Holder lines written into the lock file while the lock is held; a clean release empties the
# file, so a holder line found by the next acquirer means its writer was killed (or never
# released): that is what "a lock left by a dead process" is, since the kernel drops the flock
# itself when the process dies.
_HOLDER_RE = re.compile(r"pid=(\d+) host=(\S+)")
# File systems on which flock may not reach other hosts (or not at all): a holder line naming
# another host cannot be proven stale there, so it is refused with instructions.
_NETWORK_FS = (
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph",
    "9p", "afs", "ocfs2", "panfs", "wekafs", "fuse",
)


def _this_host() -> str:
    return os.uname().nodename


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def filesystem_type(path: str | os.PathLike) -> str:
    """The type (``ext4``, ``nfs4``, ``fuse.sshfs``...) of the mount holding ``path``; ``""``
    when /proc/self/mountinfo cannot tell (not Linux)."""
    target = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                mount = fields[4].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, line.split(" - ", 1)[1].split()[0]
    except OSError:
        return ""
    return fstype


def _is_network_fs(path: str | os.PathLike) -> bool:
    fstype = filesystem_type(path)
    return any(fstype == n or fstype.startswith(n + ".") for n in _NETWORK_FS)


def open_no_follow(path: str | os.PathLike, flags: int, what: str) -> int:
    """``os.open`` for ckptguard's own lock and marker files: never through a symbolic link
    (someone else's link would make us write, or truncate, the file it points to), never a
    FIFO or device (opening one blocks or does worse), created with mode ``0o666 & ~umask``
    like any file the user creates (no world-writable files: the kernel applies the umask)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointLockedError(
                f"{path} ({what}) is a symbolic link; ckptguard does not follow links for its "
                "own files. Remove the link (it is not created by ckptguard) and retry."
            ) from e
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointLockedError(
            f"{path} ({what}) is not a regular file; remove it (ckptguard creates a plain file) "
            "and retry."
        )
    return fd


class RootLock:
    """An exclusive ``flock`` on ``ROOT/.ckptguard.lock``: one writer per root.

    Only writers take it (``CheckpointManager`` at its first save, ``migrate``); loading and the
    CLI's read-only tools never touch the file. flock locks belong to an open file description,
    so a second writer in the same process is refused too; before refusing a holder that is
    this very process, garbage is collected once, so that a manager which is unreachable but
    sits in a reference cycle (a notebook cell run twice) lets go first.

    While held, the file names its holder (``pid=... host=... since=...``); ``release`` empties
    it. The kernel drops the flock of a killed process, but not that line: a line found on
    acquiring names a holder that never released. On this host that is proven (we got the
    flock) and taken over with a warning; naming another host on a network file system, where
    flock may not reach across hosts, it is refused with how to clear it.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = Path(root) / LOCK_NAME
        self._fd: int | None = None
        self._owner_pid: int | None = None

    def acquire(self) -> None:
        """Take the lock (idempotent); ``CheckpointLockedError`` naming the holder if taken."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._try_flock()
        if fd is None:
            gc.collect()  # a dropped manager of this process, kept only by a reference cycle
            fd = self._try_flock()
        if fd is None:
            raise self._locked_error()
        try:
            self._take_over_if_stale(fd)
            line = f"pid={os.getpid()} host={_this_host()} since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
            os.ftruncate(fd, 0)  # only now, with the lock held
            os.pwrite(fd, line.encode(), 0)
            os.fsync(fd)  # other hosts on a shared file system read the holder from here
        except BaseException:
            self._unlock(fd)
            raise
        self._fd, self._owner_pid = fd, os.getpid()

    def release(self) -> None:
        """Release the lock (idempotent; safe from a finalizer, in any thread).

        In a forked child (a DataLoader worker) only the child's descriptor is closed: the
        flock and the holder line belong to the parent, which still runs."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._owner_pid != os.getpid():
            os.close(fd)
            return
        try:
            os.ftruncate(fd, 0)  # a clean release leaves no holder line behind
        except OSError as e:
            logger.warning("could not clear the holder of %s: %s", self.path, e)
        self._unlock(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """The holder line in the file (``""`` if none or unreadable)."""
        try:
            fd = open_no_follow(self.path, os.O_RDONLY, "the root's lock file")
        except (OSError, CheckpointLockedError):
            return ""
        try:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ internals

    def _try_flock(self) -> int | None:
        fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, "the root's lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise CheckpointLockedError(
                f"cannot lock {self.path}: {e}. The file system of {self.path.parent} "
                f"({filesystem_type(self.path.parent) or 'unknown type'}) may not support flock "
                "(some NFS mounts use 'nolock'); put the checkpoint root on one that does."
            ) from e
        return fd

    def _locked_error(self) -> CheckpointLockedError:
        holder = self.holder()
        m = _HOLDER_RE.search(holder)
        hint = "close() the other manager (or leave its with block), or give each run its own root."
        if m and m.group(2) == _this_host():
            pid = int(m.group(1))
            if pid == os.getpid():
                hint = (
                    "It is another CheckpointManager of this process that is still reachable: "
                    "close() it (or leave its with block) before saving with a new one."
                )
            elif not _pid_alive(pid):
                hint = (
                    f"pid {pid} is no longer running, but a process that inherited the lock "
                    "(a DataLoader worker or another child it forked) still holds it; end that "
                    "process and retry."
                )
        return CheckpointLockedError(
            f"{self.path} is locked by another writer ({holder or 'holder unknown'}). Two jobs "
            f"writing one checkpoint root would interleave checkpoints. {hint} Loading from the "
            "root needs no lock: a manager that only calls load() is never refused."
        )

    def _take_over_if_stale(self, fd: int) -> None:
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if not previous:
            return
        if "since=" not in previous:  # ckptguard 0.1.0 never cleared its line: it proves nothing
            logger.info("%s: replacing the holder line of an older ckptguard (%s)", self.path, previous)
            return
        m = _HOLDER_RE.search(previous)
        host = m.group(2) if m else "?"
        if host != _this_host() and _is_network_fs(self.path.parent):
            raise CheckpointLockedError(
                f"{self.path} names a writer on another host ({previous}) that never released "
                f"it, and on this network file system ({filesystem_type(self.path.parent)}) "
                "this host cannot tell whether that job still runs. If it has ended, delete "
                f"{self.path} and retry; if it runs, give this job another root."
            )
        pid = int(m.group(1)) if m else -1
        state = (
            "was killed or exited without releasing it"
            if host != _this_host() or not _pid_alive(pid)
            else "no longer holds it (its process id now belongs to another process)"
        )
        logger.warning("taking over %s: its last holder (%s) %s", self.path, previous, state)

    @staticmethod
    def _unlock(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)
