"""The one place that touches files for the commit protocol: durable writes, renames, removal.

Every step of a save that must survive a crash goes through these few functions, so that the
rules (fsync the file, then rename, then fsync the directory; never follow a link for our own
files) live in one module, and so that tests can reach each phase of a save from outside by
wrapping one of them (``ckptguard.testing.faults``).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import stat
from pathlib import Path
from typing import Any

from ckptguard.errors import CheckpointLockedError


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or create inside ``path`` durable (a directory is fsynced like a file)."""
    fsync_file(path)


def write_bytes_durably(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync it, and rename it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_file(path: str | os.PathLike) -> None:
    """Make a file's bytes durable (``fsync`` through a read-only descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` in place and fsync it (for files inside a ``.partial``
    directory, which only becomes visible by the rename of the whole directory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two directory entries in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``);
    ``False`` where the platform or file system cannot, and nothing was changed.

    Why: replacing ``step-N`` with two renames leaves an instant with no ``step-N`` at all,
    which a reader that does not run ``recover`` (a job that only loads) would take for a
    missing checkpoint and resume from an older one, or from scratch.
    """
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def write_json_durably(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_durably(path, json.dumps(obj, indent=1, sort_keys=True).encode())



def rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.rename``; the commit protocol's renames go through here (one seam for tests)."""
    os.rename(src, dst)


def unlink_if_exists(path: str | os.PathLike) -> None:
    """Remove a file; one that is already gone is not an error."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def ignore_vanished(func: Any, path: str, exc_info: Any) -> None:
    """``rmtree`` error handler: a file another remover took first is not an error."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def open_no_follow(path: str | os.PathLike, flags: int, what: str) -> int:
    """``os.open`` for ckptguard's own lock and marker files: never through a symbolic link
    (someone else's link would make us write, or truncate, the file it points to), never a
    FIFO or device (opening one blocks or does worse), created with mode ``0o666 & ~umask``
    like any file the user creates (no world-writable files: the kernel applies the umask)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointLockedError(
                f"{path} ({what}) is a symbolic link; ckptguard does not follow links for its "
                "own files. Remove the link (it is not created by ckptguard) and retry."
            ) from e
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointLockedError(
            f"{path} ({what}) is not a regular file; remove it (ckptguard creates a plain file) "
            "and retry."
        )
    return fd

