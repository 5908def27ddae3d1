"""What a ``CheckpointManager`` holds beyond its objects, and how it is freed.

The manager's lock, process groups, threads and async stager live here, apart from the manager,
so that a finalizer can release them without keeping the manager alive (see ``Resources``).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ckptguard.core import dist as _dist
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.dist import describe_error
from ckptguard.core.lock import RootLock
from ckptguard.core.retention import BackgroundDeleter
from ckptguard.core.staging import BackgroundStager
from ckptguard.errors import CheckpointLockedError

logger = logging.getLogger(__name__)


# Groups of managers that were garbage collected, destroyed by the next manager created or
# closed in this process: a finalizer may run in any thread, in the middle of
# torch.distributed's own bookkeeping, so it only queues them.
_dropped: list[Any] = []
_dropped_lock = threading.Lock()


# This process's writer of each root (rank 0), to let a temporary's async save finish first.
writers: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def become_writer(
    lock: RootLock | None, root: str | os.PathLike, owner: Any,
    commit_of: Callable[[Any], Future | None], linger_s: float = 2.0,
) -> None:
    """Take the root's writer lock for ``owner`` (rank 0, first save; idempotent; ``lock`` is
    ``None`` on the other ranks).

    Only a writer may remove leftovers (``recover``): a reader that did would delete the
    running writer's ``.partial`` directory under it. If this process's previous writer of the
    root holds the lock only because its async commit still runs (``CheckpointManager(...)
    .save(n, blocking=False)`` as a temporary: the commit thread holds it until the commit
    ends), wait for that commit (``commit_of(writer)``) and its collection; a writer the user
    still holds keeps the lock (``CheckpointLockedError``)."""
    if lock is None or lock.held:
        return
    try:
        lock.acquire()
    except CheckpointLockedError:
        if not _await_dropped_writer(root, owner, commit_of, linger_s):
            raise
        lock.acquire()
    writers[os.path.realpath(root)] = owner
    logger.info("%s: this process is now the writer of %s", lock.path, root)


def _await_dropped_writer(
    root: str | os.PathLike, owner: Any, commit_of: Callable[[Any], Future | None], linger_s: float,
) -> bool:
    """True once this process's previous writer of ``root`` is gone (see ``become_writer``)."""
    other = writers.get(os.path.realpath(root))
    future = commit_of(other) if other is not None and other is not owner else None
    if future is None:
        return False
    try:
        future.result()
    except BaseException:  # noqa: BLE001 - its own wait() (never called, if dropped) reports it
        pass
    ref = weakref.ref(other)
    del other, future
    deadline = time.monotonic() + linger_s  # the thread drops its reference just after
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    return ref() is None


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

    @classmethod
    def for_rank(cls, layout: CheckpointLayout, rank: int) -> Resources:
        """Rank 0 gets the root's writer lock (not taken yet: the first save takes it) and the
        retention deleter (no thread yet); the other ranks neither."""
        resources = cls(RootLock(layout.root) if rank == 0 else None)
        resources.deleter = BackgroundDeleter(layout) if rank == 0 else None
        return resources

    def new_groups(self, count: int) -> list[Any]:
        """``count`` new gloo groups, destroyed by ``release``; first destroys the groups of
        managers that were garbage collected (see ``destroy_dropped_groups``)."""
        destroy_dropped_groups()
        groups = [_dist.new_cpu_group() for _ in range(count)]
        self.groups += groups
        return groups

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

