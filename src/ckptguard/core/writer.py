"""A DCP ``FileSystemWriter`` that makes each file durable and checksums it in one overlapped step.

Why: the manifest needs a crc32 of every file. Hashing after the save is a second pass over all
the bytes, and on a 2-core machine crc32 runs at 1.5-4 GB/s, about as fast as a local disk writes:
a serial pass costs 20-60% of a save. But most of a save's time is the fsync, when the CPU waits
for the disk. So this writer asks DCP not to fsync (``sync_files=False`` underneath) and, as soon
as DCP closes a file, fsyncs it on the writing thread while another thread hashes it from the
page cache, which the write has just filled. The hash is then almost free, and every file is
still fsynced before ``dcp.save`` returns: durability and the commit protocol are unchanged.

What is hashed is the page cache, i.e. exactly the bytes the fsync sends to the disk, the same
bytes a second pass right after the save would have read. ``entries_for`` returns the manifest
entries; a file the writer did not see (rank file, or a future DCP that writes some other way)
is fsynced and hashed there, so no file escapes either step.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Generator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from ckptguard.core.integrity import HASH_ALGORITHM, crc32_file
from ckptguard.core.storage import fsync_file

logger = logging.getLogger(__name__)


class _Sealer:
    """fsync + crc32 of closed files, the two in parallel; entries kept by file name."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def seal(self, path: Path) -> None:
        result: dict[str, Any] = {}

        def hash_it() -> None:
            try:
                result["value"] = crc32_file(path)
            except BaseException as e:  # noqa: BLE001 - re-raised on the sealing thread
                result["error"] = e

        hasher = threading.Thread(target=hash_it, name="ckptguard-crc32", daemon=True)
        hasher.start()
        try:
            fsync_file(path)
        finally:
            hasher.join()
        if "error" in result:
            raise result["error"]
        nbytes, crc = result["value"]
        with self._lock:
            self.entries[path.name] = {"nbytes": nbytes, HASH_ALGORITHM: crc}

    def renamed(self, old: Path, new: Path) -> None:
        with self._lock:
            entry = self.entries.pop(old.name, None)
            if entry is not None and old.parent == new.parent:
                self.entries[new.name] = entry


class _SealingFileSystem(FileSystem):
    """DCP's local file system, sealing every file it writes once DCP has closed it."""

    def __init__(self, sealer: _Sealer) -> None:
        super().__init__()
        self._sealer = sealer

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[Any, None, None]:
        with super().create_stream(path, mode) as stream:
            yield stream
        # only reached when DCP finished writing without an error; the file is closed here
        if any(c in mode for c in "wax+"):
            self._sealer.seal(Path(path))

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        self._sealer.renamed(Path(path), Path(new_path))


class HashingFileSystemWriter(FileSystemWriter):
    """``FileSystemWriter`` whose files are fsynced and crc32-hashed as each one is closed.

    Same arguments as DCP's writer except ``sync_files``, which is always on in effect: the
    writer does the fsync itself, overlapped with hashing.
    """

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        if kwargs.pop("sync_files", True) is False:
            raise ValueError("HashingFileSystemWriter always fsyncs; sync_files=False is refused")
        super().__init__(path, sync_files=False, **kwargs)
        self._sealer = _Sealer()
        self.fs = _SealingFileSystem(self._sealer)

    def entries_for(self, directory: str | os.PathLike, names: list[str]) -> dict[str, dict]:
        """Manifest entries ``{name: {"nbytes", "crc32"}}`` of ``names`` in ``directory``.

        Files this writer sealed are taken from its record; any other is fsynced and hashed now.
        """
        directory = Path(directory)
        out: dict[str, dict] = {}
        for name in names:
            entry = self._sealer.entries.get(name)
            if entry is None or Path(self.path) != directory:
                self._sealer.seal(directory / name)
                entry = self._sealer.entries[name]
            out[name] = dict(entry)
        return out
