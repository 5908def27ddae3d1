"""Content checksums: a manifest entry for every file of a checkpoint, checked before loading.

DCP itself records no checksums, so a flipped bit or a truncated shard would load as garbage or
fail deep inside unpickling. Each rank hashes the files it wrote; rank 0 puts the entries in the
manifest; ``verify_files`` reports every missing, truncated or corrupted file by name.

CRC-32 (zlib) is used: it detects the accidental damage we guard against (bit rot, truncation,
torn writes) at several GB/s, and zlib releases the GIL so files are hashed in parallel.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ckptguard.core.crc import crc32_fd, crc_threads, is_large

HASH_ALGORITHM = "crc32"


def crc32_file(path: str | os.PathLike, threads: int | None = None) -> tuple[int, str]:
    """(size in bytes, crc32 as 8 hex digits) of a file. A large file is cut into segments
    hashed on up to ``threads`` threads (default: this rank's share of the cores) and combined
    (``ckptguard.core.crc``): the same value as one pass, in less time."""
    fd = os.open(path, os.O_RDONLY)
    try:
        nbytes, crc = crc32_fd(fd, threads if threads is not None else crc_threads())
    finally:
        os.close(fd)
    return nbytes, f"{crc & 0xFFFFFFFF:08x}"


def hash_files(directory: str | os.PathLike, names: list[str], threads: int = 4) -> dict[str, dict]:
    """Manifest entries ``{name: {"nbytes": int, "crc32": str}}`` for files in ``directory``."""
    directory = Path(directory)

    def one(name: str) -> tuple[str, dict]:
        nbytes, crc = crc32_file(directory / name)
        return name, {"nbytes": nbytes, HASH_ALGORITHM: crc}

    # a large file is hashed on several threads already: one at a time, not the cores twice over
    if len(names) <= 1 or any(is_large(_size(directory / n)) for n in names):
        return dict(one(n) for n in names)
    with ThreadPoolExecutor(max_workers=min(threads, len(names))) as pool:
        return dict(pool.map(one, names))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # reported by whoever opens it


@dataclass
class FileProblem:
    name: str
    kind: str  # "missing" | "truncated" | "size" | "corrupted"
    detail: str

    def __str__(self) -> str:
        return f"{self.name}: {self.kind} ({self.detail})"


def verify_files(
    directory: str | os.PathLike, entries: dict[str, dict], names: list[str] | None = None
) -> list[FileProblem]:
    """Check files against their manifest entries; ``names`` restricts the check to a subset."""
    directory = Path(directory)
    problems: list[FileProblem] = []
    todo = []
    for name in names if names is not None else sorted(entries):
        entry = entries[name]
        path = directory / name
        if not path.is_file():
            problems.append(FileProblem(name, "missing", f"expected {entry['nbytes']} bytes"))
            continue
        size = path.stat().st_size
        if size != entry["nbytes"]:
            kind = "truncated" if size < entry["nbytes"] else "size"
            problems.append(FileProblem(name, kind, f"{size} bytes on disk, manifest says {entry['nbytes']}"))
            continue
        todo.append(name)
    actual = hash_files(directory, todo)
    for name in todo:
        want = entries[name][HASH_ALGORITHM]
        got = actual[name][HASH_ALGORITHM]
        if got != want:
            problems.append(FileProblem(name, "corrupted", f"crc32 {got}, manifest says {want}"))
    return problems
