"""The training state under test and every way of saving and loading it, timed the same way.

Each method gets the same live model + AdamW state and a scratch directory, and returns its
timings for one repeat. All ranks run every method together; a rank's time starts after a
barrier, and the slowest rank's time is what the table reports (a save is done when every rank
is done).
"""

from __future__ import annotations

import inspect
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _measure import PeakRSS, Probes, drop_page_cache, files_under
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ckptguard import CheckpointManager
from ckptguard.commit import own_files
from ckptguard.integrity import hash_files

warnings.filterwarnings("ignore", message="torch.distributed is disabled")

GiB = 2**30
_COLS = 4096  # width of every weight matrix
_ROWS_PER_LAYER = 4096  # 64 MiB of float32 per layer at most

# What each extra costs inside a real ckptguard save or load: (label, module, attribute).
# A row whose target does not exist in this ckptguard version shows as absent; add a line here
# when a new extra lands (e.g. guard checks, run trace).
EXTRA_PROBES: list[tuple[str, str, str]] = [
    ("(not an extra) dcp.save: plan, write, fsync, metadata", "torch.distributed.checkpoint",
     "save"),
    ("(not an extra) state dicts: get_model/optimizer_state_dict", "ckptguard.states",
     "ModelOptimizerState.state_dict"),
    ("prepare .partial dir + recover leftovers (rank 0)", "ckptguard.manager",
     "CheckpointManager._prepare_partial"),
    ("RNG capture", "ckptguard.states", "capture_rng_state"),
    ("rank file: RNG, scheduler, extras (torch.save + fsync)", "ckptguard.manager",
     "write_rank_file"),
    ("fsync + crc32 of each DCP file, overlapped (inside DCP's write)", "ckptguard._writer",
     "_Sealer.seal"),
    ("  of which fsync", "ckptguard._writer", "_fsync_file"),
    ("  of which crc32 (in a parallel thread)", "ckptguard._writer", "crc32_file"),
    ("done record (fsync + hash of files DCP did not write)", "ckptguard.manager",
     "write_done_record"),
    ("second-pass file hashing (hash_files)", "ckptguard.commit", "hash_files"),
    ("manifest + commit (rank 0)", "ckptguard.manager", "CheckpointManager._commit"),
    ("guard checks before save (+ trace fsync)", "ckptguard.guard.resume_guard",
     "ResumeGuard.before_save"),
    ("guard bookkeeping after save", "ckptguard.guard.resume_guard", "ResumeGuard.after_save"),
    ("verify on load (read + crc32 of every file)", "ckptguard.manager",
     "CheckpointManager._verify"),
    ("rank file load + RNG restore", "ckptguard.manager", "load_rank_file"),
    ("guard checks before load (manifest, metadata vs live objects)",
     "ckptguard.guard.resume_guard", "ResumeGuard.before_load"),
    ("guard checks after load (read back moments, LR, mode)", "ckptguard.guard.resume_guard",
     "ResumeGuard.after_load"),
]

# The run trace is paid per training step, not per save: ``record()`` is timed on its own.
_TRACE_BATCH = (8, 2048)  # int64 token ids, as a language-model batch


# ------------------------------------------------------------------------------------- state


class Blocks(nn.Module):
    """Bias-free linear layers whose weights add up to the requested number of bytes."""

    def __init__(self, param_bytes: int) -> None:
        super().__init__()
        rows = max(1, param_bytes // (4 * _COLS))
        cols = _COLS
        if rows < 8:  # tiny smoke sizes: keep a few layers with narrower rows
            cols = max(16, param_bytes // (4 * 8))
            rows = 8
        sizes = []
        while rows > 0:
            sizes.append(min(rows, _ROWS_PER_LAYER))
            rows -= sizes[-1]
        self.layers = nn.ModuleList(nn.Linear(cols, r, bias=False) for r in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never trained
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


@dataclass
class TrainingState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    local_bytes: int  # this rank's bytes of params + optimizer tensors
    total_bytes: int  # all ranks together


def build_state(total_gib: float, world_size: int, device: str = "cpu") -> TrainingState:
    """Model + AdamW state of ``total_gib`` GiB in all (params, exp_avg and exp_avg_sq: 3x params).

    With 2+ ranks the model is built on the meta device and sharded with FSDP2 over a mesh of
    ``device`` (gloo on CPU) before any memory is touched, so each rank holds only its share.
    """
    param_bytes = int(total_gib * GiB) // 3
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        with torch.device("meta"):
            model = Blocks(param_bytes)
        mesh = init_device_mesh(device, (world_size,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device=_device(device))
    else:
        with torch.device(_device(device)):
            model = Blocks(param_bytes)
    g = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    with torch.no_grad():
        for p in model.parameters():
            local = _local(p)
            local.copy_(torch.randn(local.shape, generator=g))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():  # DTensor random ops on a CPU mesh warn; the values are fine
        warnings.simplefilter("ignore")
        for p in model.parameters():
            p.grad = torch.randn_like(p)  # DTensor-aware
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    local = sum(t.nbytes for t in _local_tensors(model, optimizer).values())
    total = local
    if dist.is_initialized():
        box = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(box)
        total = int(box.item())
    return TrainingState(model, optimizer, local, total)


def _device(device: str) -> torch.device:
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _local_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the state, flat, as this rank's local shard (shares storage)."""
    out = {f"model.{k}": _local(v) for k, v in get_model_state_dict(model).items()}
    osd = get_optimizer_state_dict(model, optimizer)
    for fqn, st in osd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{fqn}.{name}"] = _local(v)
    return out


# ------------------------------------------------------------------------------------ harness


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _dcp_kwargs() -> dict[str, Any]:
    return {} if dist.is_initialized() else {"no_dist": True}


def _timed(fn: Any) -> tuple[float, int, Any]:
    """(seconds, peak extra RSS bytes, result) of ``fn()`` on this rank, started in step."""
    _barrier()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds, mem.extra_bytes, result


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Context:
    state: TrainingState
    workdir: Path  # shared by all ranks
    thread_count: int
    cache_mode: str  # how page cache is dropped before cold loads: fadvise | global | none
    probes: Probes


def _cold(ctx: Context, root: Path) -> str:
    _barrier()
    how = drop_page_cache(files_under(root), ctx.cache_mode) if ctx.cache_mode != "none" else "none"
    _barrier()
    return how


def _clean(root: Path) -> None:
    _barrier()
    if _rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
        os.sync()  # let the deletion reach the disk before the next method is timed
    _barrier()


# ------------------------------------------------------------------------------------ methods


def method_disk(ctx: Context, rep: int) -> dict[str, Any]:
    """The disk itself: write this rank's byte count from memory in 64 MiB chunks + fsync, then
    read it back (cold, then warm) into a reused buffer. The ceiling for every other method."""
    root = ctx.workdir / f"disk-{rep}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    _barrier()
    path = root / f"rank{_rank()}.bin"
    chunk = 64 << 20
    n = ctx.state.local_bytes
    src = torch.empty(min(chunk, n), dtype=torch.uint8).fill_(7)  # touched, not lazily zero
    view = memoryview(src.numpy())

    def write() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = n
            while left:
                left -= os.write(fd, view[: min(left, len(view))])
            os.fsync(fd)
        finally:
            os.close(fd)

    buf = bytearray(min(chunk, n))

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    save_s, save_mem, _ = _timed(write)
    cache = _cold(ctx, root)
    cold_s, _, _ = _timed(read)
    warm_s, _, _ = _timed(read)
    _clean(root)
    return {"save_s": save_s, "save_mem": save_mem, "load_cold_s": cold_s, "load_warm_s": warm_s,
            "cache_drop": cache}


def method_torch_save(ctx: Context, rep: int) -> dict[str, Any]:
    """``torch.save`` of the same tensors (each rank its local shards, one file per rank) +
    flush + fsync (for fairness: the others are durable too); load = ``torch.load(weights_only)``
    + ``copy_`` into the live tensors."""
    root = ctx.workdir / f"torchsave-{rep}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    _barrier()
    path = root / f"rank{_rank()}.pt"
    st = ctx.state

    def save() -> None:
        with open(path, "wb") as f:
            torch.save(_local_tensors(st.model, st.optimizer), f)
            f.flush()
            os.fsync(f.fileno())

    def load() -> None:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        live = _local_tensors(st.model, st.optimizer)
        with torch.no_grad():
            for k, v in loaded.items():
                live[k].copy_(v)

    return _save_then_load(ctx, root, save, load)


def _save_then_load(ctx: Context, root: Path, save: Any, load: Any) -> dict[str, Any]:
    """Time ``save``, a cold ``load`` (page cache evicted) and a warm one, then delete ``root``."""
    save_s, save_mem, _ = _timed(save)
    cache = _cold(ctx, root)
    cold_s, load_mem, _ = _timed(load)
    warm_s, _, _ = _timed(load)
    _clean(root)
    return {"save_s": save_s, "save_mem": save_mem, "load_cold_s": cold_s, "load_warm_s": warm_s,
            "load_mem": load_mem, "cache_drop": cache}


def _dcp_state(st: TrainingState) -> dict[str, Any]:
    return {"model": get_model_state_dict(st.model),
            "optimizer": get_optimizer_state_dict(st.model, st.optimizer)}


def method_dcp(ctx: Context, rep: int) -> dict[str, Any]:
    """Raw ``dcp.save``/``dcp.load`` of the state dict ckptguard saves (``get_*_state_dict``),
    ``FileSystemWriter(sync_files=True)`` with ckptguard's thread count; load ends with
    ``set_*_state_dict`` as a user's would. No checksums, no commit protocol."""
    root = ctx.workdir / f"dcp-{rep}"
    st = ctx.state

    def save() -> None:
        writer = dcp.FileSystemWriter(root, sync_files=True, thread_count=ctx.thread_count)
        dcp.save(_dcp_state(st), storage_writer=writer, **_dcp_kwargs())

    def load() -> None:
        sd = _dcp_state(st)
        dcp.load(sd, storage_reader=dcp.FileSystemReader(root), **_dcp_kwargs())
        set_model_state_dict(st.model, sd["model"])
        set_optimizer_state_dict(st.model, st.optimizer, sd["optimizer"])

    return _save_then_load(ctx, root, save, load)


def method_dcp_async(ctx: Context, rep: int) -> dict[str, Any]:
    """Raw ``dcp.async_save`` with its default staging (a full CPU copy on the caller's thread)."""
    root = ctx.workdir / f"dcpasync-{rep}"
    st = ctx.state
    holder: dict[str, Any] = {}

    def start() -> None:
        writer = dcp.FileSystemWriter(root, sync_files=True, thread_count=ctx.thread_count)
        holder["f"] = dcp.async_save(_dcp_state(st), storage_writer=writer, **_dcp_kwargs())

    def both() -> tuple[float, float]:
        t0 = time.perf_counter()
        start()
        stall = time.perf_counter() - t0
        f = holder["f"]
        (f.upload_completion if hasattr(f, "upload_completion") else f).result()
        return stall, time.perf_counter() - t0

    _, mem, (stall_s, complete_s) = _timed(both)
    _clean(root)
    return {"stall_s": stall_s, "complete_s": complete_s, "save_mem": mem}


class _Managers:
    """One CheckpointManager per mode for the whole run (each builds process groups).

    Retention is off (``keep_last=None``) so that a timed save does the same work as the other
    rows (write one checkpoint); the previous checkpoint is deleted after the timing with the
    very function retention uses, and that deletion is timed and reported on its own.
    """

    def __init__(self) -> None:
        self._by_key: dict[str, CheckpointManager] = {}

    def get(self, ctx: Context, key: str) -> CheckpointManager:
        if key not in self._by_key:
            root = ctx.workdir / f"ckptguard-{key}"
            self._by_key[key] = CheckpointManager(
                root, model=ctx.state.model, optimizer=ctx.state.optimizer, keep_last=None,
                thread_count=ctx.thread_count,
            )
        return self._by_key[key]

    def delete_older(self, mgr: CheckpointManager, keep: int) -> float | None:
        """Delete every checkpoint but ``keep`` as retention would; seconds on rank 0."""
        _barrier()
        seconds = None
        if _rank() == 0:
            t0 = time.perf_counter()
            for step in mgr.steps():
                if step != keep:
                    mgr.layout.delete(step)
            seconds = time.perf_counter() - t0
        _barrier()
        return seconds

    def close(self) -> None:
        for mgr in self._by_key.values():
            mgr.close()
            _clean(mgr.root)
        self._by_key.clear()


MANAGERS = _Managers()


def method_ckptguard(ctx: Context, rep: int) -> dict[str, Any]:
    """``CheckpointManager.save(step)`` (blocking) and ``load()`` with the defaults
    (checksums at save, ``verify_on_load=True``). Also times, apart, what a serial second
    hashing pass over the rank's files would cost (``hash_files``, warm cache)."""
    mgr = MANAGERS.get(ctx, "sync")
    step = rep + 1
    with ctx.probes.collect() as save_extras:
        save_s, save_mem, path = _timed(lambda: mgr.save(step, overwrite=True))
    mine = own_files(path, _rank())
    rehash_s, _, _ = _timed(lambda: hash_files(path, mine))
    cache = _cold(ctx, path)
    with ctx.probes.collect() as load_extras:
        cold_s, load_mem, _ = _timed(lambda: mgr.load(step))
    warm_s, _, _ = _timed(lambda: mgr.load(step))
    # what the checksum verification costs at load: the same cold load without it
    _cold(ctx, path)
    mgr.verify_on_load = False
    try:
        noverify_s, _, _ = _timed(lambda: mgr.load(step))
    finally:
        mgr.verify_on_load = True
    out = {"load_cold_noverify_s": noverify_s, "save_s": save_s, "save_mem": save_mem, "load_cold_s": cold_s, "load_warm_s": warm_s,
           "load_mem": load_mem, "cache_drop": cache, "rehash_s": rehash_s,
           "save_extras": save_extras, "load_extras": load_extras}
    if len(mgr.steps()) > 1:  # the previous repeat's (or the warm-up's) checkpoint
        out["retention_s"] = MANAGERS.delete_older(mgr, keep=step)
    record = getattr(mgr, "record", None)
    if callable(record):
        batch = torch.randint(0, 50_000, _TRACE_BATCH, generator=torch.Generator().manual_seed(rep))
        loss = torch.tensor(2.5)
        n = 20
        t0 = time.perf_counter()
        for i in range(n):
            record(step * 1000 + i, loss=loss, batch=batch)
        out["trace_record_s"] = (time.perf_counter() - t0) / n
    return out


def method_ckptguard_async(ctx: Context, rep: int) -> dict[str, Any]:
    """``save(step, blocking=False)``: the caller's stall is the call itself; complete = when
    ``wait()`` returns (committed and durable). If the manager stages in the background, the
    time until staging is done is what the next ``optimizer.step()`` may wait at most."""
    mgr = MANAGERS.get(ctx, "async")
    step = rep + 1

    def both() -> tuple[float, float | None, float]:
        t0 = time.perf_counter()
        mgr.save(step, blocking=False, overwrite=True)
        stall = time.perf_counter() - t0
        staged = None
        stager = getattr(mgr, "_stager", None)  # ckptguard._staging.BackgroundStager
        if stager is not None:
            stager.wait()
            staged = time.perf_counter() - t0
        mgr.wait()
        return stall, staged, time.perf_counter() - t0

    with ctx.probes.collect() as extras:
        _, mem, (stall_s, staged_s, complete_s) = _timed(both)
    MANAGERS.delete_older(mgr, keep=step)
    out = {"stall_s": stall_s, "complete_s": complete_s, "save_mem": mem, "save_extras": extras}
    if staged_s is not None:
        out["staged_s"] = staged_s
    stager = getattr(mgr, "_stager", None)
    if stager is not None:  # the staging copy kept between saves (not in peak RSS after save 1)
        out["held_mem"] = sum(b.nbytes for b in stager._buffers.values())
    return out


METHODS = {
    "disk": method_disk,
    "torch.save": method_torch_save,
    "dcp": method_dcp,
    "dcp.async_save": method_dcp_async,
    "ckptguard": method_ckptguard,
    "ckptguard async": method_ckptguard_async,
}


def default_thread_count() -> int:
    return inspect.signature(CheckpointManager.__init__).parameters["thread_count"].default

