"""Deterministic fault injection: crash or fail a save at a named phase, for reliability tests.

A preempted job dies at an arbitrary instant; to prove that no instant loses the last good
checkpoint, the tests need to stop a save at *every* phase, reproducibly. Sleeping and sending a
signal hits a different phase on every run of a loaded machine, so instead a fault spec names
the phase, and this module, installed by the test, wraps the core function that ends (or
starts) that phase, from outside: the production write path has no hooks. ::

    CKPTGUARD_FAULT="dcp_write:rank=1:hit=3:action=kill"

* ``<point>``: one of ``POINTS`` (a typo is an error, not a fault that silently never fires);
* ``action``: ``kill`` (SIGKILL this process, like a preemption; the default) or ``raise``
  (``OSError(ENOSPC)``, like a full disk);
* ``rank``: fire only on this rank (default: any rank);
* ``hit``: fire the N-th time this process reaches the point (default 1), e.g. the third save.

A process that should honour the variable calls ``install()`` first (the kill tests' trainers
do); in-process tests use ``injected(spec)``, or ``hooked(callback)`` to run their own code at
each point. ``_WRAPPERS`` lists which function each point wraps.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptguard.core import async_save, commit, policy, records, storage, writer
from ckptguard.core import dist as _dist
from ckptguard.core.format import MANIFEST_NAME, STEP_RE

logger = logging.getLogger(__name__)

ENV_VAR = "CKPTGUARD_FAULT"

# Every phase of a save, in the order a save reaches them (see _WRAPPERS for where each fires).
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


class _Callback:
    """A spec that hands every point reached to a test's function (``hooked``)."""

    def __init__(self, callback: Callable[[str], None]) -> None:
        self.point = None
        self._callback = callback

    def reached(self, point: str) -> None:
        self._callback(point)


def _from_env() -> FaultSpec | None:
    text = os.environ.get(ENV_VAR, "").strip()
    return FaultSpec.parse(text) if text else None


_active: FaultSpec | _Callback | None = None


def fault_point(name: str) -> None:
    """A phase boundary of a save was reached; fires the armed fault if it names this point."""
    if _active is not None:
        _active.reached(name)


def _around(fn: Callable[..., Any], before: str | None = None, after: str | None = None) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            fault_point(before)
        out = fn(*args, **kwargs)
        if after is not None:
            fault_point(after)
        return out

    return wrapped


def _write_json_durably(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(path: Any, obj: Any) -> None:
        fn(path, obj)
        if Path(path).name == MANIFEST_NAME:
            fault_point("manifest_written")

    return wrapped


def _exchange_paths(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(a: Any, b: Any) -> bool:
        fault_point("overwrite_replaced")  # only an overwrite's commit swaps directories
        swapped = fn(a, b)
        if swapped:
            fault_point("renamed")
        return swapped

    return wrapped


def _rename(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(src: Any, dst: Any) -> None:
        fn(src, dst)
        if str(src).endswith(".partial") and STEP_RE.match(Path(dst).name):
            fault_point("renamed")  # the commit's rename of .partial into place

    return wrapped


def _unlink_if_exists(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(path: Any) -> None:
        fn(path)
        path = Path(path)
        if path.name == MANIFEST_NAME and path.parent.name.endswith(".deleting"):
            fault_point("prune_removing")  # remove_doomed: manifest gone, shards not yet

    return wrapped


def _doom(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(self: Any, steps: list[int]) -> list[Path]:
        doomed = fn(self, steps)
        if doomed:
            fault_point("prune_deleting")
        return doomed

    return wrapped


def _writer_init(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        fn(self, *args, **kwargs)
        if _active is not None and _active.point in ("dcp_write", "dcp_metadata"):
            self.fs = _FaultyFileSystem(self.fs)

    return wrapped


# (owner, attribute, wrapper factory): each phase of a save is the start or the end of one call.
_WRAPPERS: list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
    # partial_created / rank_file_written: around this rank's rank file, the first write
    (records, "write_rank_file", lambda f: _around(f, "partial_created", "rank_file_written")),
    # dcp_write / dcp_metadata: a file system wrapper on DCP's writer (see _FaultyFileSystem)
    (writer.HashingFileSystemWriter, "__init__", _writer_init),
    # dcp_done / done_record_written: around the done record, written once DCP returned
    (records, "write_done_record", lambda f: _around(f, "dcp_done", "done_record_written")),
    (async_save, "finish_async", lambda f: _around(f, "async_commit_start")),
    # commit_start: rank 0 has every record (and set aside a rollback's branch), before the manifest
    (commit.CheckpointLayout, "commit", lambda f: _around(f, "commit_start")),
    (storage, "write_json_durably", _write_json_durably),
    (storage, "exchange_paths", _exchange_paths),
    (storage, "rename", _rename),
    # prune_start: retention begins by choosing what to delete (the policy's one decision point)
    (policy.RetentionPolicy, "decide", lambda f: _around(f, "prune_start")),
    (commit.CheckpointLayout, "doom", _doom),
    (storage, "unlink_if_exists", _unlink_if_exists),
]


@contextlib.contextmanager
def _wrapped() -> Iterator[None]:
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in _WRAPPERS]
    for owner, name, wrap in _WRAPPERS:
        setattr(owner, name, wrap(getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


_installed: contextlib.ExitStack | None = None


def install() -> FaultSpec | None:
    """Arm the fault ``CKPTGUARD_FAULT`` names, for the rest of this process (a test's trainer
    calls this first). Without the variable nothing is wrapped."""
    global _active, _installed
    spec = _from_env()
    if spec is None or _installed is not None:
        return spec
    _installed = contextlib.ExitStack()
    _installed.enter_context(_wrapped())
    _active = spec
    return spec


@contextlib.contextmanager
def _armed(spec: FaultSpec | _Callback) -> Iterator[Any]:
    global _active
    previous, _active = _active, spec
    try:
        if _installed is not None:
            yield spec
        else:
            with _wrapped():
                yield spec
    finally:
        _active = previous


def injected(spec: str) -> contextlib.AbstractContextManager[FaultSpec]:
    """Arm a fault for the duration of a ``with`` block (in-process tests)."""
    return _armed(FaultSpec.parse(spec))


def hooked(callback: Callable[[str], None]) -> contextlib.AbstractContextManager[Any]:
    """Call ``callback(point)`` at every phase of a save inside the ``with`` block (a test that
    simulates a crash with its own exception)."""
    return _armed(_Callback(callback))


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
