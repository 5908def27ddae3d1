"""The run trace: one JSON line per training step, kept beside the checkpoints.

``ROOT/trace.jsonl`` (rank 0) and ``ROOT/trace-rank-NNNNN.jsonl`` (other ranks) hold, for every
``mgr.record(step, loss=..., batch=...)``: the exact loss (a hex float), the LR of every param
group, a CRC-32 of the batch's content, a CRC-32 of each RNG stream, and the model's train mode.
Each process that writes is a *segment*; its first line says which checkpoint step it resumed
from, and a ``save`` line marks each checkpoint it wrote, so a later reader can line up a resumed
run with the run that wrote its checkpoint (``divergence.py``). A segment that began with a
rollback (``load(step=S)`` while newer checkpoints existed) says so in its header (``branch``):
it is a new branch, never compared with the abandoned run, and the reference of a later resume
from one of its checkpoints comes from it alone.

Durability: every line is written to the OS at once (a killed process loses nothing), and the
file is fsynced at every save, so a machine crash loses at most the steps after the last
checkpoint, which the resumed run will record again anyway. Each rank writes its own file, so no
two processes append to one file and a rank whose data or RNG alone went wrong is seen.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import time
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

TRACE_NAME = "trace.jsonl"
TRACE_FORMAT = 1
# Batches up to this size are hashed whole; larger ones by 64 evenly spaced 16 KiB slices, so
# that recording stays cheap for image batches (a restarted loader changes every slice).
FULL_HASH_MAX_BYTES = 4 << 20
_SLICES = 64
_SLICE_BYTES = 16 << 10


def trace_filename(rank: int) -> str:
    return TRACE_NAME if rank == 0 else f"trace-rank-{rank:05d}.jsonl"


def trace_files(root: str | os.PathLike) -> dict[int, Path]:
    """``{rank: path}`` of every trace file under ``root``."""
    root = Path(root)
    found = {}
    if (root / TRACE_NAME).is_file():
        found[0] = root / TRACE_NAME
    for p in sorted(root.glob("trace-rank-*.jsonl")):
        digits = p.stem.removeprefix("trace-rank-")
        if digits.isdigit():
            found[int(digits)] = p
    return found


def new_segment_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"


# ---------------------------------------------------------------------------- hashing


def hash_batch(batch: Any) -> str:
    """CRC-32 (8 hex digits) of a batch: tensors, arrays, and dicts/lists/tuples of them."""
    return f"{_crc(batch, 0) & 0xFFFFFFFF:08x}"


def _crc(obj: Any, crc: int) -> int:
    if isinstance(obj, torch.Tensor):
        return _crc_tensor(obj, crc)
    if isinstance(obj, np.ndarray):
        return _crc_tensor(torch.from_numpy(np.ascontiguousarray(obj)), crc)
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            crc = _crc(obj[k], zlib.crc32(str(k).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        for x in obj:
            crc = _crc(x, zlib.crc32(b"|", crc))
        return crc
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return zlib.crc32(obj, crc)
    return zlib.crc32(repr(obj).encode(), crc)


def _crc_tensor(t: torch.Tensor, crc: int) -> int:
    t = t.detach()
    crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode(), crc)
    flat = t.reshape(-1)
    nbytes = flat.numel() * flat.element_size()
    if nbytes > FULL_HASH_MAX_BYTES:
        per = max(1, _SLICE_BYTES // flat.element_size())
        last = flat.numel() - per
        starts = [round(i * last / (_SLICES - 1)) for i in range(_SLICES)]
        flat = torch.cat([flat[s : s + per] for s in starts])
    data = flat.contiguous().cpu().view(torch.uint8).numpy()
    return zlib.crc32(memoryview(data), crc)


def hash_rng() -> dict[str, str]:
    """CRC-32 of each RNG stream of this process (python, numpy, torch, cuda if in use)."""
    version, internal, gauss = random.getstate()
    out = {"python": f"{zlib.crc32(repr(gauss).encode(), zlib.crc32(array('I', internal).tobytes())):08x}"}
    _, keys, pos, has_gauss, cached = np.random.get_state()
    np_crc = zlib.crc32(f"{pos},{has_gauss},{cached!r}".encode(), zlib.crc32(keys.tobytes()))
    out["numpy"] = f"{np_crc:08x}"
    out["torch"] = f"{zlib.crc32(torch.get_rng_state().numpy().tobytes()):08x}"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = f"{zlib.crc32(torch.cuda.get_rng_state().numpy().tobytes()):08x}"
    return out


def _as_float(x: Any) -> float:
    return float(x.detach().item() if isinstance(x, torch.Tensor) else x)


def make_record(
    segment: str, step: int, loss: Any, *, lrs: list[Any] | None, batch: Any = None, train_mode: bool | None = None
) -> dict[str, Any]:
    """One trace line. ``batch`` may be the batch itself or a hash the caller computed."""
    rec: dict[str, Any] = {"kind": "step", "seg": segment, "step": int(step), "loss": _as_float(loss).hex()}
    if lrs is not None:
        rec["lr"] = [_as_float(x).hex() for x in lrs]
    if batch is not None:
        rec["batch"] = batch if isinstance(batch, str) else hash_batch(batch)
    rec["rng"] = hash_rng()
    if train_mode is not None:
        rec["train"] = bool(train_mode)
    return rec


# ---------------------------------------------------------------------------- writing


class TraceWriter:
    """Appends one rank's lines to its trace file. Opened lazily: no record, no file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._f: Any = None

    def write(self, obj: dict[str, Any]) -> None:
        if self._f is None:
            self._open()
        self._f.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._f.flush()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._f = open(self.path, "a", encoding="utf-8")
        if torn:  # a process killed mid-line: start ours on a line of its own
            self._f.write("\n")

    def sync(self) -> None:
        """fsync what was written (called at every save)."""
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            try:
                self.sync()
            finally:
                self._f.close()
                self._f = None


# ---------------------------------------------------------------------------- reading


@dataclass
class Segment:
    """The lines one process wrote: its header and its step records (first per step)."""

    id: str
    header: dict[str, Any]
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    saves: list[int] = field(default_factory=list)  # checkpoint steps this segment saved

    @property
    def resumed_from(self) -> int:
        return int(self.header.get("resumed_from") or 0)

    @property
    def world_size(self) -> int | None:
        return self.header.get("world_size")

    @property
    def steps(self) -> list[int]:
        return sorted(self.records)

    @property
    def is_branch(self) -> bool:
        """Whether this segment began with a rollback (``load(step=S)`` while newer
        checkpoints existed): a new branch, not a continuation of the run before it."""
        return bool(self.header.get("branch"))


def read_trace(path: str | os.PathLike) -> list[Segment]:
    """Segments of one trace file, in the order they were written.

    Lines that do not parse (the torn last line of a killed process) are skipped.
    """
    segments: dict[str, Segment] = {}
    order: list[str] = []
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
                seg = ev["seg"]
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            if seg not in segments:
                segments[seg] = Segment(seg, {})
                order.append(seg)
            if ev.get("kind") == "segment":
                segments[seg].header = ev
            elif ev.get("kind") == "step":
                segments[seg].records.setdefault(int(ev["step"]), ev)
            elif ev.get("kind") == "save":
                segments[seg].saves.append(int(ev["step"]))
    if bad:
        logger.warning("%s: skipped %d unreadable line(s) (a process killed mid-write?)", path, bad)
    return [segments[s] for s in order]


def trace_losses(root: str | os.PathLike) -> dict[int, dict[int, str]]:
    """``{rank: {step: hex loss}}`` of every trace under ``root``; later segments win."""
    out: dict[int, dict[int, str]] = {}
    for rank, path in trace_files(root).items():
        losses = out.setdefault(rank, {})
        for seg in read_trace(path):
            losses.update({s: r["loss"] for s, r in seg.records.items()})
    return out
