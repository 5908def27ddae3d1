"""CheckpointManager: saves and restores the whole training state, durably and exactly.

The manager orchestrates; it holds no file format of its own. Tensors go through DCP
(``states.ModelOptimizerState``), everything else through per-rank files (``states``), the
directory dance lives in ``layout``, checksums in ``integrity``.

A save, on every rank, in order:

1. rank 0 creates ``.step-N.partial/`` (removing what a crash left); all ranks wait for it;
2. each rank writes and fsyncs its ``rank-R.pt`` (RNG, dataloader, scheduler, extras);
3. DCP writes the model and optimizer shards (``sync_files=True``) and rank 0 its ``.metadata``;
4. each rank hashes the files it wrote and leaves a small ``.done-R.json`` record;
5. rank 0 waits for every rank's record, writes the manifest, renames the directory into place,
   fsyncs the root, and only then renames the checkpoints beyond ``keep_last`` to
   ``.step-N.deleting`` (no longer loadable); a background thread removes their files.

With ``blocking=False`` step 3 is ``dcp.async_save`` and steps 4-5 run in a background thread;
the records in step 4 replace a collective so that the commit never races the training
process group (see ``_dist.new_cpu_group``).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import pickle
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from ckptguard.core import dist as _dist
from ckptguard.core import records
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.dist import describe_error, free_space_hint, quiet_no_dist
from ckptguard.core.format import (
    ABANDONED_DIR,
    MANIFEST_NAME,
    manifest_header,
    read_checked_manifest,
    step_dirname,
)
from ckptguard.core.integrity import verify_files
from ckptguard.core.legacy import refuse_legacy_root
from ckptguard.core.lifecycle import Resources, Staged, destroy_dropped_groups, writers
from ckptguard.core.lock import RootLock
from ckptguard.core.reader import DirectFileSystemReader
from ckptguard.core.restore import is_read_failure, load_rank_file
from ckptguard.core.retention import BackgroundDeleter, DeletionFailure
from ckptguard.core.safe_pickle import SafeLoadPlanner, unsafe_pickle_cause
from ckptguard.core.staging import BackgroundStager
from ckptguard.core.states import (
    MODEL,
    OPTIMIZER,
    ModelOptimizerState,
    build_rank_states,
    model_device_type,
    optimizer_hyperparameters,
)
from ckptguard.core.writer import HashingFileSystemWriter
from ckptguard.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CommitError,
    StateMismatchError,
)
from ckptguard.guard import statecheck
from ckptguard.guard.resume_guard import GuardOptions, ResumeGuard
from ckptguard.guard.roundtrip import verify_roundtrip

logger = logging.getLogger(__name__)


@dataclass
class _PendingSave:
    step: int
    future: Future
    started: float


class CheckpointManager:
    """Save and restore model, optimizer, LR scheduler, dataloader, RNG and extras.

    Args:
        root: directory holding one ``step-NNNNNNNN`` directory per checkpoint.
        model: ``nn.Module`` (plain, DDP or FSDP2 ``fully_shard``).
        optimizer: its optimizer; ``None`` for model-only checkpoints.
        lr_scheduler, dataloader: optional; the dataloader must be able to report its position
            (torchdata ``StatefulDataLoader``); a plain ``DataLoader`` is refused.
        extra: more objects with ``state_dict()``/``load_state_dict()``, e.g. a ``GradScaler``.
        keep_last: complete checkpoints to keep; older ones are deleted only after a newer one
            is committed. ``None`` keeps all.
        verify_on_load: check every file against the manifest's checksums before loading.
        thread_count: DCP writer threads per rank.
        commit_timeout_s: how long rank 0 waits for the other ranks' files before giving up.
        strict: raise ``ResumeError`` when a resume check finds an error (see ``ckptguard.guard``;
            by default findings are logged and kept in ``last_report``). Not to be confused with
            ``load(strict=...)``, which is about missing/unexpected keys.
        allow_lr_change: accept an LR at resume that differs from the saved one (reported as
            info, with the distance).
        global_batch_size, grad_accum_steps: the trainer's declarations, saved and compared at
            resume; ``save(micro_step=...)`` is refused mid accumulation.
        trace_rtol: relative tolerance when ``record``'s losses and LRs are compared with the
            earlier run's (0: exact).

    Every rank must construct the manager and call ``save``/``load``/``wait`` at the same points.

    Lifecycle: constructing a manager writes nothing and takes no lock, so a process that only
    loads (an eval job beside the trainer, a notebook) is never refused and never blocks the
    writer. The first ``save`` makes it the root's writer: rank 0 takes the root's lock
    (``CheckpointLockedError`` if another live writer has it) and removes what interrupted
    saves left. ``close()``, leaving the ``with`` block, garbage collection of the manager and
    process exit release the lock, the process groups and the threads.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any | None = None,
        dataloader: Any | None = None,
        extra: dict[str, Any] | None = None,
        keep_last: int | None = 3,
        verify_on_load: bool = True,
        thread_count: int = 1,
        commit_timeout_s: float = 600.0,
        strict: bool = False,
        allow_lr_change: bool = False,
        global_batch_size: int | None = None,
        grad_accum_steps: int | None = None,
        trace_rtol: float = 0.0,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.layout = CheckpointLayout(root)
        self.root = self.layout.root
        self.keep_last = keep_last
        self.verify_on_load = verify_on_load
        self.thread_count = thread_count
        self.commit_timeout_s = commit_timeout_s
        self._tensor_state = ModelOptimizerState(model, optimizer)
        self._rank_states = build_rank_states(lr_scheduler, dataloader, extra)
        self.model = model
        self.optimizer = optimizer
        self.rank = _dist.get_rank()
        self.world_size = _dist.get_world_size()
        self._closed = False
        self._writing = False  # became the root's writer (first save); same on every rank
        # The root's writer lock, taken by the first save (see _become_writer), not here.
        self._lock = RootLock(self.root) if self.rank == 0 else None
        self._resources = Resources(self._lock)
        # rank 0 removes what retention dooms, in the background (see _retain); no thread yet
        self._resources.deleter = BackgroundDeleter(self.layout) if self.rank == 0 else None
        self._finalizer = weakref.finalize(self, self._resources.release, dropped=True)
        destroy_dropped_groups()
        self._group = _dist.new_cpu_group()
        self._dcp_group = _dist.new_cpu_group()
        self._resources.groups += [self._group, self._dcp_group]
        self.guard = ResumeGuard(
            root=self.root, model=model, optimizer=optimizer, rank_states=self._rank_states,
            rank=self.rank, world_size=self.world_size,
            # no lambda over self: a reference cycle would keep a dropped manager (and the
            # root's lock) alive until the cyclic collector runs
            agree=functools.partial(_dist.on_every_rank, group=self._group, root=self.root),
            options=GuardOptions(
                strict=strict, allow_lr_change=allow_lr_change, global_batch_size=global_batch_size,
                grad_accum_steps=grad_accum_steps, trace_rtol=trace_rtol,
            ),
        )
        self.last_report = None  # the GuardReport of the last load() that found a checkpoint
        self._resources.closers.append(self.guard.close)
        self._pending: _PendingSave | None = None

    # ------------------------------------------------------------------ lifecycle

    # The async stager (its buffers are kept between saves) and the commit thread are created
    # by the first async save; they live in _resources so that a finalizer can free them.
    @property
    def _stager(self) -> BackgroundStager | None:
        return self._resources.stager

    @_stager.setter
    def _stager(self, stager: BackgroundStager | None) -> None:
        self._resources.stager = stager

    @property
    def _executor(self) -> ThreadPoolExecutor | None:
        return self._resources.executor

    @_executor.setter
    def _executor(self, executor: ThreadPoolExecutor | None) -> None:
        self._resources.executor = executor

    def _ensure_writer(self) -> None:
        """Every rank, at each save: the first makes rank 0 the root's writer (one broadcast),
        so that a refused writer fails before it writes anything, not even a trace line."""
        if not self._writing:
            self._on_rank0_then_all(self._become_writer)
            self._writing = True

    def _become_writer(self) -> None:
        """Take the root's writer lock (rank 0, first save; idempotent).

        Only a writer may remove leftovers (``recover``): a reader that did would delete the
        running writer's ``.partial`` directory under it."""
        if self._lock is None or self._lock.held:  # not rank 0, or the writer already
            return
        try:
            self._lock.acquire()
        except CheckpointLockedError:
            if not self._await_dropped_writer():
                raise
            self._lock.acquire()
        writers[os.path.realpath(self.root)] = self
        logger.info("%s: this process is now the writer of %s", self._lock.path, self.root)

    def _await_dropped_writer(self, linger_s: float = 2.0) -> bool:
        """True once this process's previous writer of the root is gone.

        ``CheckpointManager(...).save(n, blocking=False)`` as a temporary: the manager lives
        until its background commit ends (the commit thread holds it), then is collected and
        lets go of the lock. Wait for that commit; a writer the user still holds stays."""
        other = writers.get(os.path.realpath(self.root))
        if other is None or other is self or other._pending is None:
            return False
        try:
            other._pending.future.result()
        except BaseException:  # noqa: BLE001 - its own wait() (never called, if dropped) reports it
            pass
        ref = weakref.ref(other)
        del other
        deadline = time.monotonic() + linger_s  # the thread drops its reference just after
        while ref() is not None and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        return ref() is None

    def _quarantine_damaged(self, step: int) -> Path | None:
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

    def _load_complete_step(self, step_dir: Path, strict: bool) -> None:
        """``_load_step``, naming a checkpoint that the writer's retention deleted while this
        process read it (a reader beside a running trainer with ``keep_last``).

        Retention renames ``step-N`` to ``.step-N.deleting`` and then removes it: files already
        open stay readable, files opened later are missing. What was read is never garbage,
        but the load is incomplete; this says so instead of reporting damage."""
        try:
            self._load_step(step_dir, strict)
        except (CheckpointError, OSError) as e:
            # Every rank gets here together (_load_step agrees on its errors); rank 0 decides,
            # since with fallback it may move the step aside right after, before a slower rank
            # looked: the ranks would raise different errors and part ways.
            if self._on_rank0_then_all(lambda: (step_dir / MANIFEST_NAME).is_file()):
                raise
            raise CheckpointNotFoundError(
                f"step {step_dir.name} ({step_dir}) was deleted while it was being loaded, by the "
                f"retention (keep_last) of the process writing {self.root}. The live objects may "
                "be partly restored from it: call load() again, which loads the newest complete "
                "checkpoint."
            ) from e

    def close(self, timeout_s: float = 60.0) -> None:
        """Finish a pending async save, then release the root's lock (if this manager saved),
        its process groups and threads. Idempotent; every rank must call it.

        Old checkpoints that retention doomed are removed in the background; ``close`` waits up
        to ``timeout_s`` for that, then leaves the rest to the next writer (they are
        ``.deleting`` directories, which no load considers) and logs which it did. Deletions
        that failed are logged again here if no save has reported them yet."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._finalizer.detach()
            try:
                self._finish_deletions(timeout_s)
            finally:
                self._resources.release(dropped=False)
                destroy_dropped_groups()

    @property
    def retention_errors(self) -> list[DeletionFailure]:
        """Every retention deletion that failed in this manager (rank 0; empty elsewhere): the
        path and the error. Each is also logged as a WARNING when it happens and again at the
        next ``save()`` or ``close()``; none fails training."""
        deleter = self._resources.deleter
        return list(deleter.failures) if deleter is not None else []

    def _finish_deletions(self, timeout_s: float) -> None:
        """``close``: wait, bounded, for the background deletions, and say what happened."""
        deleter = self._resources.deleter
        if deleter is None:
            return
        pending = deleter.pending()
        if pending:
            started = time.monotonic()
            if deleter.wait(timeout_s):
                logger.info(
                    "retention: close() waited %.2fs for the deletion of %d old checkpoint(s)",
                    time.monotonic() - started, len(pending),
                )
            else:
                left = deleter.stop()
                logger.warning(
                    "retention: close() waited %.0fs (timeout_s) and leaves %d old checkpoint(s) "
                    "to the next writer of %s, which removes them: %s. They are .deleting "
                    "directories: no load considers them.",
                    timeout_s, len(left), self.root, ", ".join(str(p) for p in left),
                )
        self._report_retention_failures()

    def _report_retention_failures(self) -> None:
        """Log, once each, the retention deletions that failed since the last report (rank 0)."""
        deleter = self._resources.deleter
        for failure in deleter.take_unreported() if deleter is not None else []:
            logger.warning(
                "retention: an earlier deletion failed: %s: %s. Training went on and no load "
                "considers what was left (a .deleting directory, or an old checkpoint still "
                "complete), but it takes disk space; the next writer retries. See "
                "mgr.retention_errors.",
                failure.path, failure.error,
            )

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ queries

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints under the root, oldest first."""
        return self.layout.complete_steps()

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ save

    # The step S of a rollback: set by load(step=S) when newer complete checkpoints exist; the
    # next save's commit sets those aside (rank 0 acts on it; see _set_aside_abandoned).
    _rollback_from: int | None = None

    def save(
        self, step: int, *, blocking: bool = True, overwrite: bool = False,
        micro_step: int = 0, allow_mid_accumulation: bool = False,
    ) -> Path:
        """Write a checkpoint of the current state as ``step``; returns its final path.

        With ``blocking=False`` the call returns almost at once; ``wait()`` (or the next
        ``save``/``load``/``close``) finishes it. At most one save is in flight. The parameters and
        optimizer state are copied in the background and the next ``optimizer.step()`` waits for
        that copy; until then do not write them in place by other means (an EMA or a clamp into
        the live weights): such a write is detected and fails the save with ``CommitError``
        rather than commit a mix of two steps. Async saves keep one host copy of the model and
        optimizer state between saves (pinned on CUDA), freed by ``close()``.
        ``micro_step``: micro-batches accumulated since the last optimizer step; a save with
        ``micro_step > 0`` is refused (``ResumeError``) unless ``allow_mid_accumulation``.
        """
        self._check_open()
        self.wait()
        self._ensure_writer()
        # Each local step of a save that can fail on one rank alone is agreed across ranks
        # (one small all_gather) before the next collective, so that every rank raises the same
        # error instead of one waiting for the other until the process group times out.
        guard_info = self._on_every_rank(
            lambda: self.guard.before_save(
                step, micro_step=micro_step, allow_mid_accumulation=allow_mid_accumulation
            ),
            f"checking step {step} before saving it",
        )
        started = time.monotonic()
        partial = self.layout.partial_dir(step)
        self._on_rank0_then_all(lambda: self._prepare_partial(step, overwrite), error=CommitError)

        # A rank that fails alone (full disk, a user's state_dict() or state_dict hook, staging)
        # must not leave the others waiting in DCP's collectives: every rank learns of the
        # failure and raises the same CommitError. Staging is done here, not inside
        # dcp.async_save: a rank whose staging failed there would never join the collectives
        # of the background save that the other ranks had already started.
        def write_own_part() -> tuple[dict[str, Any], Future | None]:
            records.write_rank_file(partial, step, self.rank, self.world_size, self._rank_states)
            tensor_sd = self._tensor_state.state_dict()
            return tensor_sd, None if blocking else self._async_stager().stage(tensor_sd)

        tensor_sd, staging = self._on_every_rank(write_own_part, f"writing {partial}")
        # fsyncs each file while hashing it (see _writer): the checksums cost almost nothing
        hashing_writer = HashingFileSystemWriter(
            partial, single_file_per_rank=True, thread_count=self.thread_count
        )
        manifest = self._manifest_header(step, mode="sync" if blocking else "async")
        manifest["info"]["guard"] = guard_info
        if blocking:

            def write_tensors_and_record() -> None:
                with quiet_no_dist():
                    dcp.save(tensor_sd, storage_writer=hashing_writer, **self._dcp_kwargs())
                records.write_done_record(partial, self.rank, hashing_writer)

            self._on_every_rank(write_tensors_and_record, f"writing {partial}")
            path = self._on_rank0_then_all(lambda: self._commit(step, manifest), error=CommitError)
            logger.info("saved %s in %.2fs", path, time.monotonic() - started)
            return path

        with quiet_no_dist():
            dcp_future = dcp.async_save(
                tensor_sd, storage_writer=hashing_writer, async_stager=Staged(staging, tensor_sd),
                **self._dcp_kwargs(),
            )
        if not isinstance(dcp_future, Future):  # AsyncSaveResponse (async staging)
            dcp_future = dcp_future.upload_completion
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptguard-commit")
        future = self._executor.submit(
            self._finish_async, dcp_future, step, manifest, hashing_writer, staging
        )
        self._pending = _PendingSave(step, future, started)
        logger.info("async save of step %d started; caller blocked %.2fs", step, time.monotonic() - started)
        return self.layout.step_dir(step)

    def wait(self) -> Path | None:
        """Finish the pending async save, if any, on every rank; raise if any rank failed."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        error = None
        path = None
        try:
            path = pending.future.result()
        except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - reported on every rank below
            # DCP's CheckpointException derives from BaseException: name it, or a failed write
            # skips the all_gather below on this rank and the other ranks hang in it.
            error = (isinstance(e, CheckpointError), f"rank {self.rank}: {describe_error(e)}")
        errors = [e for e in _dist.all_gather_object(error, self._group) if e]
        if errors:
            partial = self.layout.partial_dir(pending.step)
            raise CommitError(
                f"async save of step {pending.step} to {partial} failed: "
                + "; ".join(text for _, text in errors)
                + ("" if all(ours for ours, _ in errors) else
                   f"{free_space_hint(self.root)}. The checkpoint was not committed and the previous "
                   "ones are untouched; fix the cause (e.g. free disk space) and save again.")
            )
        logger.info("async save of step %d complete after %.2fs", pending.step, time.monotonic() - pending.started)
        return path if path is not None else self.layout.step_dir(pending.step)

    def _finish_async(
        self, dcp_future: Future, step: int, manifest: dict[str, Any],
        writer: HashingFileSystemWriter | None = None, staging: Future | None = None,
    ) -> Path | None:
        partial = self.layout.partial_dir(step)
        try:
            dcp_future.exception()  # wait: DCP's save ran on every rank, even where staging failed
            if staging is not None:
                staging.result()  # this rank's background copy failed: the cause of any DCP error
            dcp_future.result()
            records.write_done_record(partial, self.rank, writer)
        except BaseException as e:
            # Tell rank 0, which polls for done records, not to wait commit_timeout_s for ours.
            records.write_failure_record(partial, self.rank, e)
            raise
        if self.rank != 0:
            return None
        return self._commit(step, manifest)

    def _async_stager(self) -> BackgroundStager:
        """Stages async saves: the bulk is copied in the background and ``optimizer.step()``
        waits for it (see ``_staging``); its buffers are kept for the next save."""
        if self._stager is None:
            self._stager = BackgroundStager(self.optimizer)
        return self._stager

    def _prepare_partial(self, step: int, overwrite: bool) -> Path:
        # Leftovers of a save that failed in this process (e.g. on a full disk) go now, not at
        # the next start; recover() also puts back a checkpoint an interrupted overwrite moved.
        self._become_writer()
        try:
            # leftover .deleting directories go to the background deleter, not into this save
            self._delete_in_background(self.layout.recover(defer_deleting=True))
            # after a rollback, a step the abandoned run saved is set aside at commit, not replaced
            rollback = self._rollback_from is not None and step > self._rollback_from
            return self.layout.prepare_partial(step, overwrite or rollback)
        except OSError as e:
            raise CommitError(
                f"cannot create {self.layout.partial_dir(step)}: {e}. Nothing was written; the "
                "previous checkpoints are untouched."
            ) from e

    def _commit(self, step: int, manifest: dict[str, Any]) -> Path:
        partial = self.layout.partial_dir(step)
        try:
            manifest["files"] = records.collect_done_records(partial, self.world_size, self.commit_timeout_s)
            manifest["committed_unix"] = time.time()
            self._set_aside_abandoned(step)  # before the rename: a crash then resumes from S
            path = self.layout.commit(step, manifest)
        except OSError as e:
            final = self.layout.step_dir(step)
            if not partial.exists() and (final / MANIFEST_NAME).is_file():
                raise CommitError(
                    f"{final} was renamed into place but {self.root} could not be fsynced: {e}. "
                    "It loads now but might not survive a power loss; save a later step to be sure."
                ) from e
            raise CommitError(
                f"could not commit {partial} as {self.layout.step_dir(step).name}: {e}. The "
                "checkpoint was not committed and the previous ones are untouched; fix the cause "
                "(e.g. free disk space) and save again."
            ) from e
        self._retain(step)
        return path

    def _retain(self, step: int) -> None:
        """Retention after the commit of ``step`` (rank 0): the checkpoints beyond
        ``keep_last`` are made non-loadable now, in one atomic rename each and one fsync
        (``layout.doom``), and removed by the background deleter, so a save costs no
        ``rmtree``. Never fails the save: the new checkpoint is committed, and an error here
        would make the caller think it was lost."""
        self._report_retention_failures()
        try:
            doomed = self.layout.retention_doomed(self.keep_last, protect=step)
            if doomed:
                logger.info("retention: deleting steps %s under %s (in the background)", doomed, self.root)
            self._delete_in_background(self.layout.doom(doomed), retry_failed=True)
        except OSError as e:
            # Leftover .deleting directories are removed after the next save's recover().
            logger.warning("retention: could not delete old checkpoints under %s: %s", self.root, e)
            if self._resources.deleter is not None:
                self._resources.deleter.record_failure(self.root, e)

    def _delete_in_background(self, paths: list[Path], *, retry_failed: bool = False) -> None:
        deleter = self._resources.deleter
        if deleter is None:  # not rank 0: never reached (recover and retention run there)
            for path in paths:
                self.layout.remove_doomed(path)
            return
        deleter.submit(paths, retry_failed=retry_failed)

    def _set_aside_abandoned(self, step: int) -> None:
        """The first commit after a rollback to S moves every checkpoint after S out of the
        root (rank 0), so that "the latest checkpoint" is the new branch's from now on.

        It runs once the new checkpoint's files are durable and before its rename: a crash in
        between leaves S as the latest, never the abandoned branch (``layout.set_aside``).
        """
        start = self._rollback_from
        if start is None:
            return
        try:
            branch = self.layout.set_aside(
                start, reason=f"load(step={start}) then save({step}): a new branch from step {start}"
            )
        except OSError as e:
            raise CommitError(
                f"could not set aside the checkpoints after step {start} under {self.root} "
                f"(a rollback to step {start}): {e}. Step {step} was not committed; the next "
                "save, or the next start, finishes the set-aside."
            ) from e
        self._rollback_from = None
        if branch is not None:
            logger.warning(
                "rollback: set aside steps %s of the abandoned run under %s, because the run "
                "went back to step %d (load(step=%d)) and saved step %d; load() resumes the new "
                "branch from now on, and ckptguard never loads, prunes or deletes them",
                ", ".join(map(str, branch.steps)), branch.path, start, start, step,
            )

    def _manifest_header(self, step: int, mode: str) -> dict[str, Any]:
        opt = self.optimizer
        return manifest_header(
            step=step,
            world_size=self.world_size,
            save_mode=mode,
            components=[MODEL] + ([OPTIMIZER] if opt is not None else []) + list(self._rank_states),
            info={
                "model_training": self.model.training,
                "optimizer_class": type(opt).__name__ if opt is not None else None,
                "param_groups": optimizer_hyperparameters(opt) if opt is not None else [],
                "device_type": model_device_type(self.model),
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            },
        )

    # ------------------------------------------------------------------ load

    def load(self, step: int | None = None, *, strict: bool = True, fallback: bool = False) -> int:
        """Restore the newest complete checkpoint (or ``step``); returns its step, 0 if none.

        Incomplete checkpoints are never considered. With ``verify_on_load`` every file is
        checked against the manifest first and a damaged checkpoint is refused by name.

        ``fallback=True`` (only with ``step=None``): if the newest checkpoint is damaged, log a
        WARNING naming it and its damage, move it aside to ``step-N.damaged`` (kept for
        inspection; it would otherwise block a new save of that step) and load the previous
        complete one, and so on. Without it a damaged checkpoint raises.

        ``step=S`` while newer complete checkpoints exist is a rollback (e.g. after a loss
        spike): the next ``save`` starts a new branch from S. Its commit first moves every
        checkpoint after S to ``ROOT/abandoned/branch-NNNN/`` (kept; never loaded, pruned or
        deleted), so it may reuse their step numbers and a later plain ``load()`` resumes the new
        branch; the run trace treats the steps after S as a new branch, not a divergence. A
        rollback followed by another ``load`` instead of a save changes nothing on disk.
        """
        if fallback and step is not None:
            raise ValueError(
                f"load(step={step}, fallback=True): fallback applies to the latest checkpoint "
                "only; an explicitly requested step is loaded or refused, never replaced"
            )
        self._check_open()
        self.wait()
        self._rollback_from = None  # a rollback not followed by a save is forgotten
        started = time.monotonic()
        candidates = self._on_rank0_then_all(
            lambda: self._candidate_steps(step, fallback), error=CheckpointNotFoundError
        )
        if not candidates:
            logger.info("no complete checkpoint under %s; starting from step 0", self.root)
            return 0
        damaged: list[str] = []
        for chosen in candidates:
            step_dir = self.layout.step_dir(chosen)
            try:
                self._load_complete_step(step_dir, strict)
            except (CheckpointCorruptError, CheckpointFormatError) as e:
                damaged.append(str(e))
                if chosen == candidates[-1]:
                    if len(damaged) == 1:
                        raise
                    raise type(e)(
                        f"no complete checkpoint under {self.root} could be loaded:\n"
                        + "\n".join(damaged)
                    ) from e
                moved = self._on_rank0_then_all(lambda s=chosen: self._quarantine_damaged(s))
                logger.warning(
                    "fallback: %s is damaged and was moved aside to %s; loading the previous "
                    "complete checkpoint instead. The damage: %s", step_dir,
                    moved or "nowhere (another process writes this root)", e,
                )
                continue
            logger.info("loaded %s in %.2fs", step_dir, time.monotonic() - started)
            if step is not None:
                self._start_branch_if_rollback(chosen)
            return chosen
        raise AssertionError("unreachable")  # the loop returns or raises

    def _start_branch_if_rollback(self, loaded: int) -> None:
        """``load(step=S)`` while newer checkpoints exist is a rollback (e.g. after a loss
        spike): the training from S on is a new branch. Its first save sets the newer
        checkpoints aside (``_set_aside_abandoned``) and the run trace stops comparing it with
        the abandoned run, whose steps after S it is expected to differ from."""
        newer = self._on_rank0_then_all(lambda: [s for s in self.layout.complete_steps() if s > loaded])
        if not newer:
            return
        self._rollback_from = loaded
        self.guard.start_branch(loaded, newer)
        if self.rank == 0:
            logger.info(
                "loaded step %d although newer checkpoints exist (steps %s): a rollback. The next "
                "save starts a new branch from step %d and sets those aside under %s",
                loaded, ", ".join(map(str, newer)), loaded, self.root / ABANDONED_DIR,
            )

    def _candidate_steps(self, step: int | None, fallback: bool) -> list[int]:
        """The steps ``load`` may try, in order (rank 0)."""
        if step is not None:
            return [self._choose_step(step)]
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

    def _load_step(self, step_dir: Path, strict: bool) -> None:
        # Each local step that can fail on one rank alone (a read error on one host, a user's
        # load_state_dict, a template that cannot be built) is agreed across ranks before the
        # next collective (ours or DCP's), so that every rank raises the same error instead of
        # one waiting for the other until the process group times out. DCP agrees on its own.
        manifest, saved_keys = self._on_every_rank(
            lambda: self._read_step(step_dir), f"reading {step_dir}", error=CheckpointCorruptError
        )

        def prepare() -> tuple[dict[str, Any], Any]:
            # Asks for exactly the optimizer state the checkpoint holds, gradients or not (see
            # ModelOptimizerState.load_template); the user's .grad stay as they were.
            template = self._tensor_state.load_template(saved_keys)
            report = self.guard.before_load(
                manifest["step"], step_dir, manifest, template, strict_keys=strict,
                saved_keys=saved_keys,
            )
            return template, report

        template, report = self._on_every_rank(
            prepare, f"preparing to load {step_dir}", error=StateMismatchError
        )
        try:
            with quiet_no_dist():
                # reads each tensor straight into the live one (see _reader): the files were
                # just read to verify them, so this is one copy from the page cache
                dcp.load(template, storage_reader=DirectFileSystemReader(step_dir),
                         planner=SafeLoadPlanner(), **self._dcp_kwargs())  # values: weights_only
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

        self._on_every_rank(restore, f"loading {step_dir}", error=StateMismatchError)
        self.last_report = self.guard.after_load(report, template, manifest)

    def _read_step(self, step_dir: Path) -> tuple[dict[str, Any], Any]:
        """This rank's reads before a load: the manifest, its share of the checksums, DCP's
        ``.metadata`` keys. Local: ``_load_step`` agrees on the outcome."""
        manifest = read_checked_manifest(step_dir)
        if self.verify_on_load:
            self._verify(step_dir, manifest)

        try:
            return manifest, statecheck.read_saved_keys(step_dir)  # DCP's .metadata
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            raise self._unreadable(step_dir, e) from e

    def _unreadable(self, step_dir: Path, e: BaseException) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"cannot read the model/optimizer files of {step_dir}: {describe_error(e)}. "
            + ("" if self.verify_on_load else "verify_on_load=False: the files were not "
               "checked against the manifest, which would name the damaged one. ")
            + "Load another step, or use load(fallback=True)."
        )

    def _choose_step(self, step: int) -> int:
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

    def _verify(self, step_dir: Path, manifest: dict[str, Any]) -> None:
        """Check this rank's share of the files against the manifest (``_read_step``)."""
        names = sorted(manifest["files"])
        mine = names[self.rank :: self.world_size]
        problems = sorted(str(p) for p in verify_files(step_dir, manifest["files"], mine))
        if problems:
            raise CheckpointCorruptError(
                f"{step_dir} does not match its manifest; refusing to load it:\n  "
                + "\n  ".join(problems)
            )

    # ------------------------------------------------------------------ resume guard

    def record(self, step: int, *, loss: Any, batch: Any = None) -> Any:
        """Append ``step`` to this rank's run trace beside the checkpoints (see
        ``ckptguard.guard.trace``): the exact loss, the LR, a CRC of ``batch`` and of the RNG
        streams. After a resume, steps the earlier run reached are compared with it; returns the
        first ``Divergence`` when this step is it (also in ``last_report``), else ``None``.
        """
        return self.guard.record(step, loss=loss, batch=batch)

    def verify_roundtrip(self) -> Any:
        """Save to a hidden directory, restore into the live objects, compare every tensor and
        value bitwise; returns a ``RoundtripResult`` naming the components that changed. The
        dataloader is not touched. Every rank must call it."""
        self.wait()
        return verify_roundtrip(
            root=self.root, tensor_state=self._tensor_state, rank_states=self._rank_states,
            group=self._group, dcp_kwargs=self._dcp_kwargs(), tag=self.guard.segment,
        )

    # ------------------------------------------------------------------ helpers

    def _dcp_kwargs(self) -> dict[str, Any]:
        if _dist.is_distributed():
            return {"process_group": self._dcp_group}
        return {"no_dist": True}

    def _on_rank0_then_all(self, fn: Any, error: type[CheckpointError] = CheckpointError) -> Any:
        """Run ``fn`` on rank 0 and hand its result, or its error, to every rank."""
        return _dist.on_rank0_then_all(fn, self._group, error)

    def _on_every_rank(self, fn: Any, what: str, error: type[CheckpointError] = CommitError) -> Any:
        """Run ``fn`` on every rank; if it fails on any rank, raise ``error`` on every rank."""
        return _dist.on_every_rank(fn, self._group, what, error, self.root)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"CheckpointManager for {self.root} is closed")
