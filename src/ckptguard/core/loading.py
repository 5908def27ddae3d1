"""The load of a checkpoint: which steps to try, reading and verifying one, restoring it, and
falling back past damaged ones.

``StepLoader`` holds what a load needs (layout, live states, this rank's place, the process
group, the resume checks) as explicit state. Each local step that can fail on one rank alone
(a read error on one host, a user's ``load_state_dict``, a template that cannot be built) is
agreed across ranks before the next collective (ours or DCP's), so that every rank raises the
same error instead of one waiting for the other until the process group times out.

The resume checks come in as an object (``LoadChecks``; the manager passes its
``ResumeGuard``), and so does the reader of DCP's saved keys: the core imports nothing above it.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch.distributed.checkpoint as dcp

from ckptguard.core import dist as _dist
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.dist import describe_error, quiet_no_dist
from ckptguard.core.format import MANIFEST_NAME, read_checked_manifest, step_dirname
from ckptguard.core.integrity import verify_files
from ckptguard.core.legacy import refuse_legacy_root
from ckptguard.core.lock import RootLock
from ckptguard.core.reader import DirectFileSystemReader
from ckptguard.core.restore import is_read_failure, load_rank_file
from ckptguard.core.safe_pickle import SafeLoadPlanner, unsafe_pickle_cause
from ckptguard.core.states import ModelOptimizerState
from ckptguard.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    StateMismatchError,
)

logger = logging.getLogger(__name__)


class LoadChecks(Protocol):
    """The resume checks around a load (``guard.ResumeGuard``)."""

    def before_load(
        self, step: int, step_dir: Path, manifest: dict[str, Any], template: dict[str, Any], *,
        strict_keys: bool, saved_keys: Any,
    ) -> Any: ...

    def after_load(self, report: Any, template: dict[str, Any], manifest: dict[str, Any]) -> Any: ...


@dataclass
class Loaded:
    """What ``StepLoader.load`` restored: the step and the resume checks' report."""

    step: int
    report: Any


class StepLoader:
    """Loads one complete checkpoint into the live objects, on every rank together."""

    def __init__(
        self, layout: CheckpointLayout, *, rank: int, world_size: int,
        tensor_state: ModelOptimizerState, rank_states: dict[str, Any], verify_on_load: bool,
        group: Any, dcp_kwargs: dict[str, Any], lock: RootLock | None, checks: LoadChecks,
        read_saved_keys: Callable[[Path], Any],
    ) -> None:
        self.layout = layout
        self.root = layout.root
        self.rank = rank
        self.world_size = world_size
        self.verify_on_load = verify_on_load
        self._tensor_state = tensor_state
        self._rank_states = rank_states
        self._group = group
        self._dcp_kwargs = dcp_kwargs
        self._lock = lock  # rank 0: borrowed to move a damaged checkpoint aside
        self._checks = checks
        self._read_saved_keys = read_saved_keys

    def load(self, step: int | None, *, strict: bool, fallback: bool) -> Loaded | None:
        """Load ``step`` (or the newest complete checkpoint; with ``fallback`` the previous
        ones in turn while they are damaged). ``None`` when the root holds no checkpoint."""
        started = time.monotonic()
        candidates = _dist.on_rank0_then_all(
            lambda: self.candidate_steps(step, fallback), self._group, CheckpointNotFoundError
        )
        if not candidates:
            return None
        damaged: list[str] = []
        for chosen in candidates:
            step_dir = self.layout.step_dir(chosen)
            try:
                report = self.load_complete_step(step_dir, strict)
            except (CheckpointCorruptError, CheckpointFormatError) as e:
                damaged.append(str(e))
                if chosen == candidates[-1]:
                    if len(damaged) == 1:
                        raise
                    raise type(e)(
                        f"no complete checkpoint under {self.root} could be loaded:\n"
                        + "\n".join(damaged)
                    ) from e
                moved = _dist.on_rank0_then_all(
                    lambda s=chosen: self.quarantine_damaged(s), self._group, CheckpointError
                )
                logger.warning(
                    "fallback: %s is damaged and was moved aside to %s; loading the previous "
                    "complete checkpoint instead. The damage: %s", step_dir,
                    moved or "nowhere (another process writes this root)", e,
                )
                continue
            logger.info("loaded %s in %.2fs", step_dir, time.monotonic() - started)
            return Loaded(chosen, report)
        raise AssertionError("unreachable")  # the loop returns or raises

    def candidate_steps(self, step: int | None, fallback: bool) -> list[int]:
        """The steps ``load`` may try, in order (rank 0)."""
        if step is not None:
            return [self.choose_step(step)]
        steps = self.layout.complete_steps()
        for bad in self.layout.steps_without_manifest():
            if not steps or bad > steps[-1]:
                logger.warning(
                    "%s has no %s, so it is not a complete checkpoint (damaged, or not written by "
                    "ckptguard); it is skipped", self.layout.step_dir(bad), MANIFEST_NAME,
                )
        if not steps:
            # An old index-keyed checkpoint here means the user expects a resume: refuse
            # instead of starting from step 0 with a fresh optimizer (see ckptguard.tools.migrate).
            refuse_legacy_root(self.root)
        steps.reverse()
        return steps if fallback else steps[:1]

    def choose_step(self, step: int) -> int:
        """``step`` if it is a complete checkpoint; else an error listing the complete ones."""
        steps = self.layout.complete_steps()
        if step not in steps:
            why = (
                f" ({self.layout.step_dir(step)} exists but has no {MANIFEST_NAME}: its save never "
                "committed, or it was damaged)"
                if step in self.layout.steps_without_manifest() else ""
            )
            aside = [str(b.path / step_dirname(step)) for b in self.layout.abandoned_branches() if step in b.steps]
            if aside:
                why += (
                    f" (a rollback set it aside as {aside[-1]}: it belongs to an abandoned branch; "
                    f"to resume it, move it back to {self.layout.step_dir(step)} by hand)"
                )
            raise CheckpointNotFoundError(
                f"no complete checkpoint for step {step} under {self.root}{why}; complete steps: "
                f"{steps or 'none'}"
            )
        return step

    def quarantine_damaged(self, step: int) -> Path | None:
        """Move a damaged checkpoint aside for ``load(fallback=True)`` (rank 0): a write, so
        done as the root's writer. A reader takes the lock only for the rename and, if a
        writer runs, leaves the checkpoint in place (``None``) rather than wait or fail."""
        assert self._lock is not None
        borrowed = not self._lock.held
        if borrowed:
            try:
                self._lock.acquire()
            except CheckpointLockedError as e:
                logger.warning("%s is damaged; left in place: %s", self.layout.step_dir(step), e)
                return None
        try:
            return self.layout.quarantine(step)
        finally:
            if borrowed:
                self._lock.release()

    def load_complete_step(self, step_dir: Path, strict: bool) -> Any:
        """``load_step``, naming a checkpoint that the writer's retention deleted while this
        process read it (a reader beside a running trainer with ``keep_last``).

        Retention renames ``step-N`` to ``.step-N.deleting`` and then removes it: files already
        open stay readable, files opened later are missing. What was read is never garbage,
        but the load is incomplete; this says so instead of reporting damage."""
        try:
            return self.load_step(step_dir, strict)
        except (CheckpointError, OSError) as e:
            # Every rank gets here together (load_step agrees on its errors); rank 0 decides,
            # since with fallback it may move the step aside right after, before a slower rank
            # looked: the ranks would raise different errors and part ways.
            if _dist.on_rank0_then_all(lambda: (step_dir / MANIFEST_NAME).is_file(), self._group, CheckpointError):
                raise
            raise CheckpointNotFoundError(
                f"step {step_dir.name} ({step_dir}) was deleted while it was being loaded, by the "
                f"retention (keep_last) of the process writing {self.root}. The live objects may "
                "be partly restored from it: call load() again, which loads the newest complete "
                "checkpoint."
            ) from e

    def load_step(self, step_dir: Path, strict: bool) -> Any:
        """Read, check and restore one checkpoint on every rank; the resume checks' report."""
        manifest, saved_keys = self._on_every_rank(
            lambda: self.read_step(step_dir), f"reading {step_dir}", CheckpointCorruptError
        )

        def prepare() -> tuple[dict[str, Any], Any]:
            # Asks for exactly the optimizer state the checkpoint holds, gradients or not (see
            # ModelOptimizerState.load_template); the user's .grad stay as they were.
            template = self._tensor_state.load_template(saved_keys)
            report = self._checks.before_load(
                manifest["step"], step_dir, manifest, template, strict_keys=strict,
                saved_keys=saved_keys,
            )
            return template, report

        template, report = self._on_every_rank(
            prepare, f"preparing to load {step_dir}", StateMismatchError
        )
        try:
            with quiet_no_dist():
                # reads each tensor straight into the live one (see reader): the files were
                # just read to verify them, so this is one copy from the page cache
                dcp.load(template, storage_reader=DirectFileSystemReader(step_dir),
                         planner=SafeLoadPlanner(), **self._dcp_kwargs)  # values: weights_only
        except (Exception, dcp.CheckpointException) as e:  # the latter is a BaseException
            if (refused := unsafe_pickle_cause(e)) is not None:
                raise refused from e  # a value in the shards that only plain pickle would read
            if is_read_failure(e):
                raise self._unreadable(step_dir, e) from e
            raise StateMismatchError(
                f"cannot load the model/optimizer of {step_dir} into the live objects: {e}"
            ) from e

        # Agreed across ranks: a state that fails to restore on one rank only must not leave the
        # others waiting, nor let them go on with a state their peer could not restore.
        def restore() -> None:
            self._tensor_state.load_state_dict(template, strict=strict)
            load_rank_file(step_dir, manifest, self.rank, self.world_size, self._rank_states)

        self._on_every_rank(restore, f"loading {step_dir}", StateMismatchError)
        return self._checks.after_load(report, template, manifest)

    def read_step(self, step_dir: Path) -> tuple[dict[str, Any], Any]:
        """This rank's reads before a load: the manifest, its share of the checksums, DCP's
        ``.metadata`` keys. Local: ``load_step`` agrees on the outcome."""
        manifest = read_checked_manifest(step_dir)
        if self.verify_on_load:
            self.verify(step_dir, manifest)
        try:
            return manifest, self._read_saved_keys(step_dir)  # DCP's .metadata
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            raise self._unreadable(step_dir, e) from e

    def verify(self, step_dir: Path, manifest: dict[str, Any]) -> None:
        """Check this rank's share of the files against the manifest (``read_step``)."""
        names = sorted(manifest["files"])
        mine = names[self.rank :: self.world_size]
        problems = sorted(str(p) for p in verify_files(step_dir, manifest["files"], mine))
        if problems:
            raise CheckpointCorruptError(
                f"{step_dir} does not match its manifest; refusing to load it:\n  "
                + "\n  ".join(problems)
            )

    def _unreadable(self, step_dir: Path, e: BaseException) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"cannot read the model/optimizer files of {step_dir}: {describe_error(e)}. "
            + ("" if self.verify_on_load else "verify_on_load=False: the files were not "
               "checked against the manifest, which would name the damaged one. ")
            + "Load another step, or use load(fallback=True)."
        )

    def _on_every_rank(self, fn: Callable[[], Any], what: str, error: type[CheckpointError]) -> Any:
        return _dist.on_every_rank(fn, self._group, what, error, self.root)
