"""What a ``CheckpointManager`` holds beyond its objects, and how it is freed.

The manager's lock, process groups, threads and async stager live here, apart from the manager,
so that a finalizer can release them without keeping the manager alive (see ``Resources``).
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from torch.distributed.checkpoint.staging import AsyncStager

from ckptguard.core import dist as _dist
from ckptguard.core.dist import describe_error
from ckptguard.core.lock import RootLock
from ckptguard.core.retention import BackgroundDeleter
from ckptguard.core.staging import BackgroundStager

logger = logging.getLogger(__name__)


# Groups of managers that were garbage collected, destroyed by the next manager created or
# closed in this process: a finalizer may run in any thread, in the middle of
# torch.distributed's own bookkeeping, so it only queues them.
_dropped: list[Any] = []
_dropped_lock = threading.Lock()


# This process's writer of each root (rank 0), to let a temporary's async save finish first.
writers: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def destroy_dropped_groups() -> None:
    with _dropped_lock:
        groups = list(_dropped)
        _dropped.clear()
    for group in groups:
        _dist.destroy_group(group)


class Resources:
    """What a manager holds that reference counting alone does not free: the root's writer
    lock (rank 0), its two gloo groups, the commit thread, the async stager (threads, an
    optimizer hook, a host copy of the state), the retention deleter's thread (rank 0) and the
    trace file.

    Kept apart from the manager so that ``weakref.finalize`` can release them when the manager
    is garbage collected without keeping it alive: a notebook cell run twice, or
    ``CheckpointManager(...).save(n)`` as a temporary, must not leave the root locked. No
    ``__del__``: a finalizer that waits or runs collectives could deadlock.
    """

    def __init__(self, lock: RootLock | None) -> None:
        self.lock = lock
        self.groups: list[Any] = []
        self.executor: ThreadPoolExecutor | None = None
        self.stager: BackgroundStager | None = None
        self.deleter: BackgroundDeleter | None = None
        self.closers: list[Callable[[], None]] = []

    def release(self, *, dropped: bool) -> None:
        """Free everything. ``dropped`` (garbage collected, or alive at exit): wait for no thread
        and queue the groups for the next manager, since this may run in any thread. Pending
        retention deletions are not waited for here (``close`` waits, bounded, before this):
        the deleter stops after its current checkpoint and the next writer removes the rest."""
        steps: list[tuple[str, Callable[[], None]]] = [(f"closing {c}", c) for c in self.closers]
        if self.deleter is not None:
            steps.insert(0, ("stopping the retention deleter", self._stop_deleter))
        on_stager_thread = threading.current_thread().name.startswith("ckptguard-stage")
        if self.stager is not None and not (dropped and on_stager_thread):
            # (collected on the stager's own thread, close() would wait for itself)
            steps.append(("closing the async stager", self.stager.close))
        if self.executor is not None:
            steps.append(("stopping the commit thread",
                          functools.partial(self.executor.shutdown, wait=not dropped)))
        if self.lock is not None:
            steps.append((f"releasing {self.lock.path}", self.lock.release))
        for what, step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - free the rest; a finalizer cannot raise
                logger.warning("%s failed: %s", what, describe_error(e))
        self.closers, self.stager, self.executor, self.deleter = [], None, None, None
        groups, self.groups = self.groups, []
        if dropped:
            with _dropped_lock:
                _dropped.extend(groups)
        else:
            for group in groups:
                _dist.destroy_group(group)

    def _stop_deleter(self) -> None:
        assert self.deleter is not None
        left = self.deleter.stop()
        if left:
            logger.info(
                "retention: %d checkpoint(s) still being deleted (%s) are left to the next "
                "writer; they are .deleting directories, which no load considers",
                len(left), ", ".join(str(p) for p in left),
            )


class Staged(AsyncStager):
    """Hands ``dcp.async_save`` the copy ``BackgroundStager.stage`` started before it.

    If the background part of that copy fails on one rank, DCP's background save still runs
    there, on the live state dict (same keys and shapes, so DCP's plan is valid; the values
    written are never committed): its collectives pair up with the other ranks' instead of
    leaving them waiting until the group times out, and ``_finish_async`` then reports the
    copy's error (a failure record, so rank 0 does not commit, and ``wait`` on every rank).
    """

    _synchronize_after_execute = False

    def __init__(self, staging: Future | None, live: dict[str, Any]) -> None:
        assert staging is not None, "an async save stages in write_own_part"
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
