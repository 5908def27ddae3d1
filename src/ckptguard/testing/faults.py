"""Deterministic fault injection: crash or fail a save at a named phase, for reliability tests.

A preempted job dies at an arbitrary instant; to prove that no instant loses the last good
checkpoint, the tests need to stop a save at *every* phase, reproducibly. Sleeping and sending a
signal hits a different phase on every run of a loaded machine, so instead the save path calls
``fault_point(name)`` at each phase boundary and a fault spec says which one fires::

    CKPTGUARD_FAULT="dcp_write:rank=1:hit=3:action=kill"

* ``<point>``: one of ``POINTS`` (a typo is an error, not a fault that silently never fires);
* ``action``: ``kill`` (SIGKILL this process, like a preemption; the default) or ``raise``
  (``OSError(ENOSPC)``, like a full disk);
* ``rank``: fire only on this rank (default: any rank);
* ``hit``: fire the N-th time this process reaches the point (default 1), e.g. the third save.

The variable is read once, at import. Unset, ``fault_point`` is a global lookup and a return,
and ``instrument_writer`` hands DCP's writer back untouched. In-process tests use ``injected``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptguard import _dist

logger = logging.getLogger(__name__)

ENV_VAR = "CKPTGUARD_FAULT"

# Every phase of a save, in the order a save reaches them (the manager and layout call these).
POINTS: dict[str, str] = {
    "partial_created": "the .partial directory exists on every rank; nothing written yet",
    "rank_file_written": "this rank's rank-NNNNN.pt is written and fsynced",
    "dcp_write": "a DCP shard (.distcp) is partly written: first bytes on disk, no fsync yet",
    "dcp_metadata": "every shard is written; DCP's .metadata.tmp is about to be renamed (rank 0)",
    "dcp_done": "DCP finished; this rank has not yet hashed its files / left its done record",
    "async_commit_start": "the background commit thread of an async save has started",
    "done_record_written": "this rank's .done-R.json is written: its files are durable and hashed",
    "commit_start": "rank 0 has every done record; the manifest is not written yet",
    "manifest_written": "ckptguard.json is in the .partial directory; not renamed yet",
    "overwrite_replaced": "overwrite: the old step-N was moved to .replaced; new one not in place",
    "renamed": ".partial was renamed to step-N; the root is not fsynced yet",
    "prune_start": "the new checkpoint is committed; retention has not started",
    "prune_deleting": "an old checkpoint was renamed to .deleting; its files are not removed yet",
    "prune_removing": "the background deleter is removing a .deleting checkpoint: manifest gone, shards not",
}
ACTIONS = ("kill", "raise")


@dataclass
class FaultSpec:
    """One fault: which point, on which rank, at which visit, and what happens."""

    point: str
    action: str = "kill"
    rank: int | None = None
    hit: int = 1
    _count: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        point, *options = text.strip().split(":")
        if point not in POINTS:
            raise ValueError(
                f"{ENV_VAR}={text!r}: unknown fault point {point!r}; known points: {', '.join(POINTS)}"
            )
        spec = cls(point)
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in ("action", "rank", "hit"):
                raise ValueError(
                    f"{ENV_VAR}={text!r}: bad option {option!r}; expected action=kill|raise, "
                    "rank=N or hit=N"
                )
            if key == "action":
                if value not in ACTIONS:
                    raise ValueError(f"{ENV_VAR}={text!r}: action must be one of {ACTIONS}, got {value!r}")
                spec.action = value
            else:
                setattr(spec, key, int(value))
        if spec.hit < 1:
            raise ValueError(f"{ENV_VAR}={text!r}: hit must be >= 1, got {spec.hit}")
        return spec

    def reached(self, point: str) -> None:
        if point != self.point or (self.rank is not None and _dist.get_rank() != self.rank):
            return
        with self._lock:
            self._count += 1
            fire = self._count == self.hit
        if fire:
            self.fire()

    def fire(self) -> None:
        where = f"fault point {self.point!r} (visit {self.hit}, rank {_dist.get_rank()})"
        if self.action == "kill":
            # stderr, unbuffered: the test reads it to confirm the fault fired where planned.
            sys.stderr.write(f"ckptguard-fault: SIGKILL at {where}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        logger.warning("injecting ENOSPC at %s", where)
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV_VAR} at {where})")


def _from_env() -> FaultSpec | None:
    text = os.environ.get(ENV_VAR, "").strip()
    return FaultSpec.parse(text) if text else None


_active: FaultSpec | None = _from_env()


def fault_point(name: str) -> None:
    """Mark a phase boundary of a save; fires the configured fault if it names this point."""
    if _active is None:
        return
    _active.reached(name)


@contextlib.contextmanager
def injected(spec: str) -> Iterator[FaultSpec]:
    """Arm a fault for the duration of a ``with`` block (in-process tests)."""
    global _active
    previous, _active = _active, FaultSpec.parse(spec)
    try:
        yield _active
    finally:
        _active = previous


def instrument_writer(writer: Any) -> Any:
    """Give a DCP ``FileSystemWriter`` the ``dcp_write`` and ``dcp_metadata`` points.

    DCP writes each shard in one pass with no callback between bytes, so the points live in a
    file system wrapper: ``dcp_write`` fires after the first write to a ``.distcp`` file has
    reached the OS (a torn shard), ``dcp_metadata`` just before ``.metadata`` is renamed in.
    """
    if _active is None or _active.point not in ("dcp_write", "dcp_metadata"):
        return writer
    writer.fs = _FaultyFileSystem(writer.fs)
    return writer


class _FaultyFileSystem:
    """Wraps the writer's own file system (whatever it does on close stays as it is)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with self._inner.create_stream(path, mode) as stream:
            if "w" in mode and str(path).endswith(".distcp"):
                yield _FaultyStream(stream)
            else:
                yield stream

    def rename(self, path: Any, new_path: Any) -> None:
        if Path(new_path).name == ".metadata":
            fault_point("dcp_metadata")
        self._inner.rename(path, new_path)


class _FaultyStream(io.RawIOBase):
    """A write stream that reaches ``dcp_write`` once its first bytes are on disk."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self._raw = raw
        self._reached = False

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self._raw.write(b)
        if not self._reached:
            self._reached = True
            self._raw.flush()
            fault_point("dcp_write")
        return n

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        # The raw file belongs to create_stream's context manager, which closes it.
        super().close()
