"""CRC-32 of a large file on several cores: segments hashed in parallel, then combined.

zlib's crc32 runs at 1.5-4 GB/s on one core, about the speed of a local disk, so a checkpoint's
checksum pass is CPU-bound on one thread. CRC-32 is linear: the CRC of ``A + B`` follows from
``crc(A)``, ``crc(B)`` and ``len(B)`` (zlib's ``crc32_combine``, which Python's ``zlib`` does not
expose; it is implemented here in a few multiplications modulo the CRC polynomial). So a file is
cut into segments, each thread reads (``os.pread``, no shared file offset) and hashes its own,
and the results are combined in order: the same value as one pass, in a fraction of the time.
Reads and hashing both release the GIL, so one thread's read overlaps another's hashing.

With python-isal installed (``pip install isal``), Intel ISA-L's CRC-32 is used instead of
zlib's: the same polynomial and values (checkpoints stay interchangeable), computed with
carry-less multiplication at ~15 GB/s instead of ~2-4 GB/s per core.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

try:
    from isal.isal_zlib import crc32 as _fast_crc32
except ImportError:  # optional: zlib's is correct, only slower
    _fast_crc32 = None

#: the CRC-32 function in use (``zlib.crc32``-compatible) and its name, for reports
crc32 = _fast_crc32 if _fast_crc32 is not None else zlib.crc32
BACKEND = "isal" if _fast_crc32 is not None else "zlib"

_POLY = 0xEDB88320  # CRC-32 (reflected)
_CHUNK = 8 << 20
_MIN_SEGMENT = 32 << 20  # below this per thread, one pass is as fast


def crc_threads() -> int:
    """Threads for one file's checksum: this machine's cores shared among the ranks that
    torchrun started on it (``LOCAL_WORLD_SIZE``), at most 4. More threads than cores only
    adds contention: on 2 cores, 4 threads hash slower than 2."""
    try:
        local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local_ranks = 1
    return max(1, min(4, (os.cpu_count() or 1) // local_ranks))


def is_large(nbytes: int) -> bool:
    """Whether a file of ``nbytes`` is hashed in parallel segments."""
    return nbytes >= 2 * _MIN_SEGMENT


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (reflected bit order, as in zlib 1.2.12+)."""
    m = 1 << 31
    p = 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> list[int]:
    table = [0] * 32
    p = 1 << 30  # x^1
    table[0] = p
    for n in range(1, 32):
        p = _multmodp(p, p)
        table[n] = p
    return table


_X2N = _x2n_table()


def _x2nmodp(n: int, k: int) -> int:
    """x^(n * 2^k) modulo the CRC polynomial."""
    p = 1 << 31  # x^0
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    return _multmodp(_x2nmodp(len2, 3), crc1) ^ (crc2 & 0xFFFFFFFF)


def _crc_range(fd: int, start: int, length: int) -> tuple[int, int]:
    """(crc32, bytes read) of ``length`` bytes at ``start``; fewer if the file is shorter."""
    buf = bytearray(min(_CHUNK, max(length, 1)))
    view = memoryview(buf)
    crc = 0
    done = 0
    while done < length:
        want = min(len(buf), length - done)
        n = os.preadv(fd, [view[:want]], start + done)
        if n <= 0:
            break
        crc = crc32(view[:n], crc)
        done += n
    return crc, done


def crc32_fd(fd: int, threads: int) -> tuple[int, int]:
    """(bytes, crc32) of the whole file behind ``fd``, on up to ``threads`` threads."""
    size = os.fstat(fd).st_size
    segments = max(1, min(threads, size // _MIN_SEGMENT))
    if segments == 1:
        crc, n = _crc_range(fd, 0, 1 << 62)  # to the end, whatever the size is by then
        return n, crc
    step = -(-size // segments)
    bounds = [(i * step, min(step, size - i * step)) for i in range(segments)]
    with ThreadPoolExecutor(max_workers=segments, thread_name_prefix="ckptguard-crc32") as pool:
        parts = list(pool.map(lambda b: _crc_range(fd, *b), bounds))
    if any(n != want for (_, n), (_, want) in zip(parts, bounds, strict=True)) or os.fstat(fd).st_size != size:
        crc, n = _crc_range(fd, 0, 1 << 62)  # the file changed size meanwhile: one plain pass
        return n, crc
    crc = parts[0][0]
    for (part_crc, n) in parts[1:]:
        crc = crc32_combine(crc, part_crc, n)
    return size, crc
