"""The async save: stage in the background, let ``dcp.async_save`` write, commit in a thread.

``save(blocking=False)`` returns once DCP's write has started on a staged copy of the tensors;
``AsyncSaver`` keeps the one save in flight (``PendingSave``), runs ``finish_async`` on its
commit thread (wait for DCP, leave this rank's done record, rank 0 commits) and, in ``wait``,
agrees across ranks on how it ended. The records replace a collective, so the commit never
races the training process group (see ``dist.new_cpu_group``).

The stager and the commit thread live in ``lifecycle.Resources`` (created by the first async
save), so that a finalizer can free them without keeping the manager alive.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager

from ckptguard.core import dist as _dist
from ckptguard.core import records
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.dist import describe_error, free_space_hint, quiet_no_dist
from ckptguard.core.lifecycle import Resources
from ckptguard.core.staging import BackgroundStager
from ckptguard.core.writer import HashingFileSystemWriter
from ckptguard.errors import CheckpointError, CommitError

logger = logging.getLogger(__name__)


@dataclass
class PendingSave:
    """The async save in flight: its step, the commit thread's future, when it started."""

    step: int
    future: Future
    started: float


class Staged(AsyncStager):
    """Hands ``dcp.async_save`` the copy ``BackgroundStager.stage`` started before it.

    If the background part of that copy fails on one rank, DCP's background save still runs
    there, on the live state dict (same keys and shapes, so DCP's plan is valid; the values
    written are never committed): its collectives pair up with the other ranks' instead of
    leaving them waiting until the group times out, and ``finish_async`` then reports the
    copy's error (a failure record, so rank 0 does not commit, and ``wait`` on every rank).
    """

    _synchronize_after_execute = False

    def __init__(self, staging: Future | None, live: dict[str, Any]) -> None:
        assert staging is not None, "an async save stages before it starts"
        self._staging = staging
        self._live = live

    def stage(self, state_dict: dict[str, Any], **_: Any) -> Future:
        out: Future = Future()

        def hand_over(staging: Future) -> None:
            out.set_result(staging.result() if staging.exception() is None else self._live)

        self._staging.add_done_callback(hand_over)
        return out

    def synchronize_staging(self) -> None:
        pass


def finish_async(
    dcp_future: Future, partial: Path, rank: int, writer: HashingFileSystemWriter | None,
    staging: Future | None, commit: Callable[[], Path],
) -> Path | None:
    """The commit thread's work for one async save: wait for DCP, leave this rank's done record
    (or a failure record, so that rank 0 does not wait ``commit_timeout_s`` for it), and on
    rank 0 commit. ``testing.faults`` wraps this function (``async_commit_start``)."""
    try:
        dcp_future.exception()  # wait: DCP's save ran on every rank, even where staging failed
        if staging is not None:
            staging.result()  # this rank's background copy failed: the cause of any DCP error
        dcp_future.result()
        records.write_done_record(partial, rank, writer)
    except BaseException as e:
        records.write_failure_record(partial, rank, e)
        raise
    if rank != 0:
        return None
    return commit()


class AsyncSaver:
    """At most one async save in flight, and the machinery it needs (stager, commit thread)."""

    def __init__(
        self, layout: CheckpointLayout, resources: Resources, *, rank: int, group: Any,
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        self.layout = layout
        self.rank = rank
        self.pending: PendingSave | None = None
        self._resources = resources
        self._group = group
        self._optimizer = optimizer

    def stage(self, tensor_sd: dict[str, Any]) -> Future:
        """Start the copy of ``tensor_sd``: the bulk is copied in the background and
        ``optimizer.step()`` waits for it (see ``staging``); the buffers are kept for the next
        save."""
        if self._resources.stager is None:
            self._resources.stager = BackgroundStager(self._optimizer)
        return self._resources.stager.stage(tensor_sd)

    def start(
        self, step: int, tensor_sd: dict[str, Any], staging: Future, writer: HashingFileSystemWriter,
        dcp_kwargs: dict[str, Any], commit: Callable[[], Path], started: float,
    ) -> None:
        """Start DCP's background write of the staged copy and queue its commit.

        ``commit`` runs on rank 0's commit thread once every rank's files are durable; a bound
        method of the manager keeps the manager (and its lock) alive until it has run."""
        with quiet_no_dist():
            dcp_future = dcp.async_save(
                tensor_sd, storage_writer=writer, async_stager=Staged(staging, tensor_sd), **dcp_kwargs,
            )
        if not isinstance(dcp_future, Future):  # AsyncSaveResponse (async staging)
            dcp_future = dcp_future.upload_completion
        if self._resources.executor is None:
            self._resources.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptguard-commit")
        # finish_async is looked up at each submit, so that a wrapper installed later applies
        future = self._resources.executor.submit(
            finish_async, dcp_future, self.layout.partial_dir(step), self.rank, writer, staging, commit
        )
        self.pending = PendingSave(step, future, started)

    def wait(self) -> Path | None:
        """Finish the pending save, if any, on every rank; raise ``CommitError`` if any failed."""
        pending, self.pending = self.pending, None
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
                   f"{free_space_hint(self.layout.root)}. The checkpoint was not committed and the "
                   "previous ones are untouched; fix the cause (e.g. free disk space) and save again.")
            )
        logger.info("async save of step %d complete after %.2fs", pending.step, time.monotonic() - pending.started)
        return path if path is not None else self.layout.step_dir(pending.step)
