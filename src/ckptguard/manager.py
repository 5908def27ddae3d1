"""CheckpointManager: saves and restores the whole training state, durably and exactly.

The manager orchestrates; it holds no file format and no mechanics of its own. Tensors go
through DCP (``core.states.ModelOptimizerState``), everything else through per-rank files
(``core.records``); rank 0's phases of a save (partial directory, commit, set-aside, retention)
are ``core.saving.Committer``, an async save ``core.async_save.AsyncSaver``, a load
``core.loading.StepLoader``, the resume checks ``guard.ResumeGuard``. Every rank calls each
public method at the same point; a step that can fail on one rank alone is agreed across ranks
(``core.dist``). docs/architecture.md walks one save and one load through these pieces.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from ckptguard.core import dist as _dist
from ckptguard.core import records
from ckptguard.core.async_save import AsyncSaver
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.dist import quiet_no_dist
from ckptguard.core.format import ABANDONED_DIR
from ckptguard.core.lifecycle import Resources, become_writer, destroy_dropped_groups
from ckptguard.core.loading import StepLoader
from ckptguard.core.policy import RetentionPolicy, SaveDecision, SavePolicy, normalise_metrics
from ckptguard.core.retention import DeletionFailure
from ckptguard.core.saving import Committer, manifest_header_for
from ckptguard.core.staging import BackgroundStager
from ckptguard.core.states import ModelOptimizerState, build_rank_states
from ckptguard.core.writer import HashingFileSystemWriter
from ckptguard.errors import CheckpointError, CommitError
from ckptguard.guard import statecheck
from ckptguard.guard.resume_guard import GuardOptions, ResumeGuard
from ckptguard.guard.roundtrip import verify_roundtrip
from ckptguard.runcontrol import RunControl

logger = logging.getLogger(__name__)


def _read_saved_keys(step_dir: Path) -> Any:
    # looked up at each call, so that a test may replace statecheck.read_saved_keys
    return statecheck.read_saved_keys(step_dir)


def _commit_future(manager: CheckpointManager) -> Future | None:
    """The future of ``manager``'s async commit in flight (see ``lifecycle.become_writer``)."""
    pending = manager._async.pending
    return pending.future if pending is not None else None


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
        keep_every, keep_best, best_metric, best_mode: more retention rules; a checkpoint
            survives if any rule keeps it: every step that is a multiple of ``keep_every``,
            forever; the ``keep_best`` best by ``save(metrics={best_metric: ...})``, lowest
            first with ``best_mode="min"``. The newest complete checkpoint is never deleted.
            ``ckptguard inspect`` shows which rule keeps each one (docs/run-control.md).
        save_every_steps, save_every_seconds, save_on_signals: when ``should_save(step)`` says
            yes: every N steps; when ``save_every_seconds`` passed since the last save, by rank
            0's clock; when one of ``save_on_signals`` (e.g. ``signal.SIGTERM``,
            ``signal.SIGUSR1``) reached any rank. Handlers are installed only for those signals
            (construct the manager in the main thread then), chained to the previous ones, and
            put back by ``close()``. ``preempted`` is true once the checkpoint a signal asked
            for is durable. ``agree_every``: make the cross-rank agreement (one small gloo
            collective, ~0.5 ms) on every k-th ``should_save`` call only.
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
        keep_every: int | None = None,
        keep_best: int | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        save_every_steps: int | None = None,
        save_every_seconds: float | None = None,
        save_on_signals: tuple[Any, ...] = (),
        agree_every: int = 1,
    ) -> None:
        # validated first: a wrong setting fails before any group, thread or handler exists
        self.retention = RetentionPolicy(
            keep_last=keep_last, keep_every=keep_every, keep_best=keep_best,
            best_metric=best_metric, best_mode=best_mode,
        )
        save_policy = SavePolicy(save_every_steps, save_every_seconds)
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
        # rank 0: the root's writer lock, taken by the first save (see _become_writer), not
        # here, and the retention deleter (Committer.retain); groups and threads, all freed by
        # close() or, if the manager is dropped, by the finalizer
        self._resources = Resources.for_rank(self.layout, self.rank)
        self._lock = self._resources.lock
        self._finalizer = weakref.finalize(self, self._resources.release, dropped=True)
        self._group, self._dcp_group = self._resources.new_groups(2)
        self._dcp_kwargs = _dist.dcp_kwargs(self._dcp_group)
        self.guard = ResumeGuard(
            root=self.root, model=model, optimizer=optimizer, rank_states=self._rank_states,
            rank=self.rank, world_size=self.world_size,
            # no lambda over self: a reference cycle would keep a dropped manager (and the
            # root's lock) alive until the cyclic collector runs. The same holds for the
            # helpers below: none of them refers to the manager.
            agree=functools.partial(_dist.on_every_rank, group=self._group, root=self.root),
            options=GuardOptions(
                strict=strict, allow_lr_change=allow_lr_change, global_batch_size=global_batch_size,
                grad_accum_steps=grad_accum_steps, trace_rtol=trace_rtol,
            ),
        )
        self.last_report = None  # the GuardReport of the last load() that found a checkpoint
        self._resources.closers.append(self.guard.close)
        self._committer = Committer(
            self.layout, self._resources, world_size=self.world_size, retention=self.retention,
            commit_timeout_s=commit_timeout_s,
        )
        self._async = AsyncSaver(self.layout, self._resources, rank=self.rank, group=self._group, optimizer=optimizer)
        self._loader = StepLoader(
            self.layout, rank=self.rank, world_size=self.world_size, tensor_state=self._tensor_state,
            rank_states=self._rank_states, verify_on_load=verify_on_load, group=self._group,
            dcp_kwargs=self._dcp_kwargs, lock=self._lock, checks=self.guard,
            read_saved_keys=_read_saved_keys,
        )
        # last: it installs the signal handlers, which close() (or the finalizer) puts back
        self.run_control = RunControl(
            save_policy, signals=save_on_signals, group=self._group, agree_every=agree_every
        )
        self._resources.closers.append(self.run_control.close)

    # ------------------------------------------------------------------ lifecycle

    @property
    def _stager(self) -> BackgroundStager | None:
        """The async stager (created by the first async save; its buffers are kept)."""
        return self._resources.stager

    def _ensure_writer(self) -> None:
        """Every rank, at each save: the first makes rank 0 the root's writer (one broadcast),
        so that a refused writer fails before it writes anything, not even a trace line."""
        if not self._writing:
            self._on_rank0_then_all(self._become_writer)
            self._writing = True

    def _become_writer(self) -> None:
        """Take the root's writer lock (rank 0; idempotent; see ``lifecycle.become_writer``)."""
        become_writer(self._lock, self.root, self, _commit_future)

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
                self._committer.finish_deletions(timeout_s)
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

    def save(
        self, step: int, *, blocking: bool = True, overwrite: bool = False,
        micro_step: int = 0, allow_mid_accumulation: bool = False,
        metrics: dict[str, Any] | None = None,
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
        ``metrics``: numbers stored in the manifest (``keep_best`` ranks by ``best_metric``).

        After a preemption signal (``should_save`` said so), the save is durable when this
        returns, even with ``blocking=False``, and ``preempted`` turns true.
        """
        self._check_open()
        metrics = normalise_metrics(metrics)  # a bad value fails before anything is written
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
            return tensor_sd, None if blocking else self._async.stage(tensor_sd)

        tensor_sd, staging = self._on_every_rank(write_own_part, f"writing {partial}")
        # fsyncs each file while hashing it (see core.writer): the checksums cost almost nothing
        hashing_writer = HashingFileSystemWriter(
            partial, single_file_per_rank=True, thread_count=self.thread_count
        )
        manifest = manifest_header_for(
            step, "sync" if blocking else "async", world_size=self.world_size, model=self.model,
            optimizer=self.optimizer, rank_states=self._rank_states,
        )
        manifest["info"]["guard"] = guard_info
        manifest["metrics"] = metrics
        manifest["retention"] = dataclasses.asdict(self.retention)  # for inspect's "kept by"
        if blocking:

            def write_tensors_and_record() -> None:
                with quiet_no_dist():
                    dcp.save(tensor_sd, storage_writer=hashing_writer, **self._dcp_kwargs)
                records.write_done_record(partial, self.rank, hashing_writer)

            self._on_every_rank(write_tensors_and_record, f"writing {partial}")
            path = self._on_rank0_then_all(lambda: self._commit(step, manifest), error=CommitError)
            logger.info("saved %s in %.2fs", path, time.monotonic() - started)
            self.run_control.note_saved(durable=True)
            return path

        assert staging is not None
        # the commit thread holds this manager (a bound method) until the commit has run: a
        # dropped manager lets go of the root's lock only after its last save committed
        self._async.start(
            step, tensor_sd, staging, hashing_writer, self._dcp_kwargs,
            functools.partial(self._commit, step, manifest), started,
        )
        logger.info("async save of step %d started; caller blocked %.2fs", step, time.monotonic() - started)
        if self.run_control.preemption_requested:
            # the process is about to exit: the checkpoint the signal asked for must be
            # durable before preempted turns true
            self.wait()
        self.run_control.note_saved(durable=self.run_control.preemption_requested)
        return self.layout.step_dir(step)

    def wait(self) -> Path | None:
        """Finish the pending async save, if any, on every rank; raise if any rank failed."""
        return self._async.wait()

    # ------------------------------------------------------------------ run control

    def should_save(self, step: int) -> SaveDecision:
        """Whether to save at ``step``, the same answer on every rank: ``save_every_steps``,
        ``save_every_seconds`` by rank 0's clock, or one of ``save_on_signals`` received by any
        rank since the last call. Every rank must call it at the same steps. Truthy; its
        ``reasons`` say why. With signals or a clock it makes one small collective on the
        manager's gloo group (``agree_every`` spaces them out); a peer that died makes it raise
        ``CommitError`` at once instead of hanging."""
        self._check_open()
        return self.run_control.should_save(step)

    @property
    def preempted(self) -> bool:
        """A signal of ``save_on_signals`` arrived (on any rank) and the checkpoint it asked
        for is durable: leave the training loop, ``close()``, exit 0. Stays false if no save
        follows ``should_save``'s yes."""
        return self.run_control.preempted

    def request_preemption(self) -> None:
        """Ask for a preemption checkpoint as a signal would (from your own signal handler or
        a watchdog thread; no I/O): the next ``should_save`` says yes on every rank."""
        self.run_control.request_preemption()

    def _prepare_partial(self, step: int, overwrite: bool) -> Path:
        """Rank 0: become the root's writer, then create ``.step-N.partial/``."""
        self._become_writer()
        return self._committer.prepare_partial(step, overwrite)

    def _commit(self, step: int, manifest: dict[str, Any]) -> Path:
        """Rank 0: commit ``step`` once every rank's record is there, then retention."""
        return self._committer.commit(step, manifest)

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
        self._committer.rollback_from = None  # a rollback not followed by a save is forgotten
        loaded = self._loader.load(step, strict=strict, fallback=fallback)
        if loaded is None:
            logger.info("no complete checkpoint under %s; starting from step 0", self.root)
            return 0
        self.last_report = loaded.report
        if step is not None:
            self._start_branch_if_rollback(loaded.step)
        return loaded.step

    def _start_branch_if_rollback(self, loaded: int) -> None:
        """``load(step=S)`` while newer checkpoints exist is a rollback (e.g. after a loss
        spike): the training from S on is a new branch. Its first save sets the newer
        checkpoints aside (``Committer.set_aside_abandoned``) and the run trace stops comparing it with
        the abandoned run, whose steps after S it is expected to differ from."""
        newer = self._on_rank0_then_all(lambda: [s for s in self.layout.complete_steps() if s > loaded])
        if not newer:
            return
        self._committer.rollback_from = loaded
        self.guard.start_branch(loaded, newer)
        if self.rank == 0:
            logger.info(
                "loaded step %d although newer checkpoints exist (steps %s): a rollback. The next "
                "save starts a new branch from step %d and sets those aside under %s",
                loaded, ", ".join(map(str, newer)), loaded, self.root / ABANDONED_DIR,
            )

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
            group=self._group, dcp_kwargs=self._dcp_kwargs, tag=self.guard.segment,
        )

    # ------------------------------------------------------------------ helpers

    def _on_rank0_then_all(self, fn: Any, error: type[CheckpointError] = CheckpointError) -> Any:
        """Run ``fn`` on rank 0 and hand its result, or its error, to every rank."""
        return _dist.on_rank0_then_all(fn, self._group, error)

    def _on_every_rank(self, fn: Any, what: str, error: type[CheckpointError] = CommitError) -> Any:
        """Run ``fn`` on every rank; if it fails on any rank, raise ``error`` on every rank."""
        return _dist.on_every_rank(fn, self._group, what, error, self.root)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"CheckpointManager for {self.root} is closed")
