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

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptguard.core import storage
from ckptguard.core.format import (
    ABANDONED_DIR,
    BRANCH_RE,
    BRANCH_RECORD,
    MANIFEST_NAME,
    SET_ASIDE_INTENT,
    STEP_RE,
    TRANSIENT_RE,
    step_dirname,
)
from ckptguard.core.storage import fsync_dir
from ckptguard.errors import CheckpointExistsError, CheckpointFormatError

logger = logging.getLogger(__name__)


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
            m = STEP_RE.match(entry.name)
            if m and entry.is_dir() and os.path.isfile(os.path.join(entry.path, MANIFEST_NAME)):
                steps.append(int(m.group(1)))
        hidden = set(self._set_aside_intent().get("steps", []))  # a set-aside under way
        return sorted(s for s in steps if s not in hidden)

    def transient_dirs(self) -> list[Path]:
        """Leftovers of saves or deletions that a crash interrupted."""
        if not self.root.is_dir():
            return []
        return sorted(self.root / e.name for e in os.scandir(self.root) if TRANSIENT_RE.match(e.name))

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
        storage.write_json_durably(partial / MANIFEST_NAME, manifest)
        final = self.step_dir(step)
        replaced = None
        if final.exists():
            if storage.exchange_paths(partial, final):
                # overwrite=True in one atomic step: every instant shows a complete step-N, the
                # old one before the swap, the new one after. The old one now has the .partial
                # name; a crash before it is removed leaves it to recover().
                fsync_dir(self.root)
                shutil.rmtree(partial, ignore_errors=True)
                return final
            # No atomic swap on this file system: move the old one aside first; until the
            # rename below it stays complete under its .replaced name (recover() puts it back
            # after a crash; a reader that does not recover misses the step in between).
            replaced = self.root / f".{step_dirname(step)}.replaced"
            if replaced.exists():
                shutil.rmtree(replaced)
            storage.rename(final, replaced)
        try:
            storage.rename(partial, final)
        except BaseException:
            # Put the old checkpoint back rather than leave the step missing until the next
            # recover(); a SIGKILL right here is what recover() handles.
            if replaced is not None and not final.exists():
                storage.rename(replaced, final)
            raise
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
                shutil.rmtree(target, onerror=storage.ignore_vanished)
            storage.rename(self.step_dir(step), target)
            doomed.append(target)
        if doomed:
            fsync_dir(self.root)
        return doomed

    def remove_doomed(self, path: Path) -> None:
        """Remove a checkpoint that ``doom`` renamed (any thread; two removers of one path
        may race, e.g. a closed manager's deleter and the next writer's: neither fails).

        The manifest goes first, so a ``.deleting`` directory a crash leaves behind is not a
        checkpoint even if someone renames it back by hand. Raises ``OSError`` naming the first
        file that could not be removed (and how many more), after removing what it could."""
        storage.unlink_if_exists(path / MANIFEST_NAME)
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
        storage.rename(final, target)
        fsync_dir(self.root)
        return target

    def steps_without_manifest(self) -> list[int]:
        """Steps whose ``step-*`` directory lacks a manifest: not checkpoints, never loaded."""
        if not self.root.is_dir():
            return []
        return sorted(
            int(m.group(1))
            for e in os.scandir(self.root)
            if (m := STEP_RE.match(e.name))
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
            m = TRANSIENT_RE.match(path.name)
            assert m is not None
            final = self.step_dir(int(m.group(1)))
            if m.group(2) == "replaced" and not final.exists() and (path / MANIFEST_NAME).is_file():
                logger.warning("restoring %s from %s (an overwrite was interrupted)", final, path)
                storage.rename(path, final)
                fsync_dir(self.root)
                continue
            if m.group(2) == "deleting" and defer_deleting:
                deferred.append(path)
                continue
            logger.info("removing leftover %s", path)
            shutil.rmtree(path, ignore_errors=True)
        return deferred

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
        taken = [int(m.group(1)) for e in (os.scandir(base) if base.is_dir() else []) if (m := BRANCH_RE.match(e.name))]
        intent = {
            "branch": f"branch-{max(taken, default=0) + 1:04d}", "rolled_back_to": after_step,
            "steps": steps, "set_aside_unix": time.time(), "reason": reason,
        }
        storage.write_json_durably(self.root / SET_ASIDE_INTENT, intent)  # from here on, steps are hidden
        return self._finish_set_aside(intent)

    def _finish_set_aside(self, intent: dict[str, Any]) -> AbandonedBranch:
        """The renames of a set-aside whose intent is written; idempotent, so ``recover`` can
        finish one that a crash interrupted."""
        target = self.root / ABANDONED_DIR / intent["branch"]
        target.mkdir(parents=True, exist_ok=True)
        fsync_dir(target.parent)
        fsync_dir(self.root)
        if not (target / BRANCH_RECORD).is_file():
            storage.write_json_durably(target / BRANCH_RECORD, intent)
        for step in intent["steps"]:
            src, dst = self.step_dir(step), target / step_dirname(step)
            if src.exists() and dst.exists():
                raise CheckpointFormatError(
                    f"cannot set {src} aside: {dst} exists already. Move one of them out of "
                    f"{self.root} by hand, then delete {self.root / SET_ASIDE_INTENT}."
                )
            if src.exists():
                storage.rename(src, dst)
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
            if BRANCH_RE.match(e.name) and e.is_dir()
        ]

    @staticmethod
    def _branch_info(path: Path) -> AbandonedBranch:
        try:
            record = json.loads((path / BRANCH_RECORD).read_text())
        except (OSError, ValueError):
            record = {}
        steps = sorted(int(m.group(1)) for e in os.scandir(path) if (m := STEP_RE.match(e.name)) and e.is_dir())
        return AbandonedBranch(
            path.name, path, record.get("rolled_back_to"), steps, record.get("set_aside_unix"),
            record.get("reason", ""),
        )

