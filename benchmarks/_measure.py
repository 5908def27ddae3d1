"""Measuring tools for the checkpoint benchmark: timers, peak-RSS sampling, page-cache dropping,
probes that time ckptguard's extras inside a real save, and a description of the machine.

Nothing here knows about checkpoint formats; ``_methods`` uses these to time each method.
"""

from __future__ import annotations

import importlib
import os
import platform
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every ``interval_s`` in a thread.

    tracemalloc cannot see tensor storage (allocated by c10, not Python), so the benchmark reads
    ``VmRSS`` from ``/proc/self/status``. A sampler can miss a spike shorter than its interval;
    staging buffers and file buffers live for the whole save, so 2 ms is plenty.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = _rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-rss")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def extra_bytes(self) -> int:
        return max(0, self.peak - self.baseline)


# ------------------------------------------------------------------------------------ page cache


def drop_page_cache(paths: list[Path], mode: str) -> str:
    """Evict ``paths`` from the page cache so that the next read comes from the disk.

    ``fadvise``: ``posix_fadvise(DONTNEED)`` per file; needs no privileges and evicts clean pages
    only, which after an fsync is all of them. ``global``: ``echo 3 > /proc/sys/vm/drop_caches``
    (root only; also evicts every other process's cache). Returns what was actually done.
    """
    if mode == "global":
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            mode = "fadvise"
    if mode == "fadvise":
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise"
    return "none"


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------ probes


class Probes:
    """Time named functions while a benchmarked operation runs, by wrapping them in place.

    Each probe is ``(label, module, "Class.method" or "function")``. A probe whose target does not
    exist in this ckptguard version is reported as absent instead of failing, so the table can
    list extras (guard checks, trace) before they land. Wrapped functions may run in background
    threads (async saves); their time is summed per label.
    """

    def __init__(self, specs: list[tuple[str, str, str]]) -> None:
        self.specs = specs
        self.present: dict[str, bool] = {}
        self._totals: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        for label, module_name, attr in self.specs:
            target = _resolve(module_name, attr)
            self.present[label] = target is not None
            if target is None:
                continue
            owner, name, fn = target
            self._undo.append(_wrap(owner, name, fn, label, self))

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def add(self, label: str, seconds: float) -> None:
        with self._lock:
            self._totals[label] += seconds

    @contextmanager
    def collect(self) -> Iterator[dict[str, float]]:
        """Yield a dict that, on exit, holds the seconds spent in each probe meanwhile."""
        with self._lock:
            self._totals.clear()
        out: dict[str, float] = {}
        try:
            yield out
        finally:
            with self._lock:
                out.update(self._totals)
                self._totals.clear()


def _resolve(module_name: str, attr: str) -> tuple[Any, str, Any] | None:
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    parts = attr.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    fn = getattr(owner, parts[-1], None)
    if fn is None or not callable(fn):
        return None
    return owner, parts[-1], fn


def _wrap(owner: Any, name: str, fn: Any, label: str, probes: Probes) -> Callable[[], None]:
    raw = owner.__dict__.get(name, fn) if isinstance(owner, type) else fn

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            probes.add(label, time.perf_counter() - t0)

    if isinstance(raw, staticmethod):
        setattr(owner, name, staticmethod(timed))
    else:
        setattr(owner, name, timed)
    return lambda: setattr(owner, name, raw)


# ------------------------------------------------------------------------------------ machine


def machine_info(workdir: Path) -> dict[str, Any]:
    """CPU, memory, disk and software of this machine, for the results' header."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": mem_gib,
        "disk": _disk_info(workdir),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "crc32": _crc32_backend(),
        "loadavg_start": list(os.getloadavg()),
    }


def _crc32_backend() -> str:
    try:
        from ckptguard.core.crc import BACKEND
    except ImportError:
        return "zlib"
    return BACKEND


def _disk_info(path: Path) -> dict[str, Any]:
    path = path.resolve()
    best = ("", "", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if str(path).startswith(mnt) and len(mnt) > len(best[1]):
                best = (dev, mnt, fstype)
    except OSError:
        pass
    dev, mnt, fstype = best
    rotational = None
    name = Path(dev).name
    rot = Path(f"/sys/block/{name}/queue/rotational")
    if rot.exists():
        rotational = rot.read_text().strip() == "1"
    usage = shutil.disk_usage(path)
    return {
        "device": dev, "mount": mnt, "fs": fstype, "rotational": rotational,
        "free_gib": round(usage.free / 2**30, 1),
    }
