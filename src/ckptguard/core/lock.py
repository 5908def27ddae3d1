"""``RootLock``: one writer per checkpoint root (an exclusive ``flock`` naming its holder)."""

from __future__ import annotations

import errno
import fcntl
import gc
import logging
import os
import re
import time
from pathlib import Path

from ckptguard.core.format import LOCK_NAME
from ckptguard.core.storage import open_no_follow
from ckptguard.errors import CheckpointLockedError

logger = logging.getLogger(__name__)

# Holder lines written into the lock file while the lock is held; a clean release empties the
# file, so a holder line found by the next acquirer means its writer was killed (or never
# released): that is what "a lock left by a dead process" is, since the kernel drops the flock
# itself when the process dies.
_HOLDER_RE = re.compile(r"pid=(\d+) host=(\S+)")
# File systems on which flock may not reach other hosts (or not at all): a holder line naming
# another host cannot be proven stale there, so it is refused with instructions.
_NETWORK_FS = (
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph",
    "9p", "afs", "ocfs2", "panfs", "wekafs", "fuse",
)


def _this_host() -> str:
    return os.uname().nodename


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def filesystem_type(path: str | os.PathLike) -> str:
    """The type (``ext4``, ``nfs4``, ``fuse.sshfs``...) of the mount holding ``path``; ``""``
    when /proc/self/mountinfo cannot tell (not Linux)."""
    target = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                mount = fields[4].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, fstype = mount, line.split(" - ", 1)[1].split()[0]
    except OSError:
        return ""
    return fstype


def _is_network_fs(path: str | os.PathLike) -> bool:
    fstype = filesystem_type(path)
    return any(fstype == n or fstype.startswith(n + ".") for n in _NETWORK_FS)



class RootLock:
    """An exclusive ``flock`` on ``ROOT/.ckptguard.lock``: one writer per root.

    Only writers take it (``CheckpointManager`` at its first save, ``migrate``); loading and the
    CLI's read-only tools never touch the file. flock locks belong to an open file description,
    so a second writer in the same process is refused too; before refusing a holder that is
    this very process, garbage is collected once, so that a manager which is unreachable but
    sits in a reference cycle (a notebook cell run twice) lets go first.

    While held, the file names its holder (``pid=... host=... since=...``); ``release`` empties
    it. The kernel drops the flock of a killed process, but not that line: a line found on
    acquiring names a holder that never released. On this host that is proven (we got the
    flock) and taken over with a warning; naming another host on a network file system, where
    flock may not reach across hosts, it is refused with how to clear it.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.path = Path(root) / LOCK_NAME
        self._fd: int | None = None
        self._owner_pid: int | None = None

    def acquire(self) -> None:
        """Take the lock (idempotent); ``CheckpointLockedError`` naming the holder if taken."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._try_flock()
        if fd is None:
            gc.collect()  # a dropped manager of this process, kept only by a reference cycle
            fd = self._try_flock()
        if fd is None:
            raise self._locked_error()
        try:
            self._take_over_if_stale(fd)
            line = f"pid={os.getpid()} host={_this_host()} since={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
            os.ftruncate(fd, 0)  # only now, with the lock held
            os.pwrite(fd, line.encode(), 0)
            os.fsync(fd)  # other hosts on a shared file system read the holder from here
        except BaseException:
            self._unlock(fd)
            raise
        self._fd, self._owner_pid = fd, os.getpid()

    def release(self) -> None:
        """Release the lock (idempotent; safe from a finalizer, in any thread).

        In a forked child (a DataLoader worker) only the child's descriptor is closed: the
        flock and the holder line belong to the parent, which still runs."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._owner_pid != os.getpid():
            os.close(fd)
            return
        try:
            os.ftruncate(fd, 0)  # a clean release leaves no holder line behind
        except OSError as e:
            logger.warning("could not clear the holder of %s: %s", self.path, e)
        self._unlock(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """The holder line in the file (``""`` if none or unreadable)."""
        try:
            fd = open_no_follow(self.path, os.O_RDONLY, "the root's lock file")
        except (OSError, CheckpointLockedError):
            return ""
        try:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ internals

    def _try_flock(self) -> int | None:
        fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, "the root's lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise CheckpointLockedError(
                f"cannot lock {self.path}: {e}. The file system of {self.path.parent} "
                f"({filesystem_type(self.path.parent) or 'unknown type'}) may not support flock "
                "(some NFS mounts use 'nolock'); put the checkpoint root on one that does."
            ) from e
        return fd

    def _locked_error(self) -> CheckpointLockedError:
        holder = self.holder()
        m = _HOLDER_RE.search(holder)
        hint = "close() the other manager (or leave its with block), or give each run its own root."
        if m and m.group(2) == _this_host():
            pid = int(m.group(1))
            if pid == os.getpid():
                hint = (
                    "It is another CheckpointManager of this process that is still reachable: "
                    "close() it (or leave its with block) before saving with a new one."
                )
            elif not _pid_alive(pid):
                hint = (
                    f"pid {pid} is no longer running, but a process that inherited the lock "
                    "(a DataLoader worker or another child it forked) still holds it; end that "
                    "process and retry."
                )
        return CheckpointLockedError(
            f"{self.path} is locked by another writer ({holder or 'holder unknown'}). Two jobs "
            f"writing one checkpoint root would interleave checkpoints. {hint} Loading from the "
            "root needs no lock: a manager that only calls load() is never refused."
        )

    def _take_over_if_stale(self, fd: int) -> None:
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if not previous:
            return
        if "since=" not in previous:  # ckptguard 0.1.0 never cleared its line: it proves nothing
            logger.info("%s: replacing the holder line of an older ckptguard (%s)", self.path, previous)
            return
        m = _HOLDER_RE.search(previous)
        host = m.group(2) if m else "?"
        if host != _this_host() and _is_network_fs(self.path.parent):
            raise CheckpointLockedError(
                f"{self.path} names a writer on another host ({previous}) that never released "
                f"it, and on this network file system ({filesystem_type(self.path.parent)}) "
                "this host cannot tell whether that job still runs. If it has ended, delete "
                f"{self.path} and retry; if it runs, give this job another root."
            )
        pid = int(m.group(1)) if m else -1
        state = (
            "was killed or exited without releasing it"
            if host != _this_host() or not _pid_alive(pid)
            else "no longer holds it (its process id now belongs to another process)"
        )
        logger.warning("taking over %s: its last holder (%s) %s", self.path, previous, state)

    @staticmethod
    def _unlock(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)
