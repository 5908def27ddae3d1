"""Retention deletion in the background: ``BackgroundDeleter`` removes doomed checkpoints."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.dist import describe_error

logger = logging.getLogger(__name__)


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
        failure = DeletionFailure(Path(path), error if isinstance(error, str) else describe_error(error))
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
