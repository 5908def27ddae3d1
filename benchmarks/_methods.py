"""The training state under test and every way of saving and loading it, timed the same way.

Each method gets the same live model + AdamW state and a scratch directory, and returns its
timings for one repeat. All ranks run every method together; a rank's time starts after a
barrier, and the slowest rank's time is what the table reports (a save is done when every rank
is done).
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
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

try:  # internals: the second-pass hashing reference row is skipped if they move
    from ckptguard.core.integrity import hash_files
    from ckptguard.core.records import own_files
except ImportError:  # pragma: no cover - depends on the ckptguard version
    own_files = hash_files = None  # type: ignore[assignment]

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
    ("(not an extra) state dicts: get_model/optimizer_state_dict", "ckptguard.core.states",
     "ModelOptimizerState.state_dict"),
    ("prepare .partial dir + recover leftovers (rank 0)", "ckptguard.core.saving",
     "Committer.prepare_partial"),
    ("RNG capture", "ckptguard.core.states.rng", "capture_rng_state"),
    ("rank file: RNG, scheduler, extras (torch.save + fsync)", "ckptguard.core.records",
     "write_rank_file"),
    ("fsync + crc32 of each DCP file, overlapped (inside DCP's write)", "ckptguard.core.writer",
     "_Sealer.seal"),
    ("  of which fsync", "ckptguard.core.writer", "fsync_file"),
    ("  of which crc32 (in a parallel thread)", "ckptguard.core.writer", "crc32_file"),
    ("done record (fsync + hash of files DCP did not write)", "ckptguard.core.records",
     "write_done_record"),
    ("second-pass file hashing (hash_files)", "ckptguard.core.records", "hash_files"),
    ("manifest + commit (rank 0; includes retention where deletion runs inside it)",
     "ckptguard.core.saving", "Committer.commit"),
    ("retention: decide and rename out of sight (inside save(); removal in the background)",
     "ckptguard.core.saving", "Committer.retain"),
    ("  of which deleting checkpoints", "ckptguard.core.commit", "CheckpointLayout.delete"),
    ("guard checks before save (+ trace fsync)", "ckptguard.guard.resume_guard",
     "ResumeGuard.before_save"),
    ("verify on load (read + crc32 of every file)", "ckptguard.core.loading",
     "StepLoader.verify"),
    ("rank file load + RNG restore", "ckptguard.core.loading", "load_rank_file"),
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
    optimizer.step()  # the gradients stay: train_step() reuses them between saves
    local = sum(t.nbytes for t in _local_tensors(model, optimizer).values())
    total = local
    if dist.is_initialized():
        box = torch.tensor([local], dtype=torch.int64)
        dist.all_reduce(box)
        total = int(box.item())
    return TrainingState(model, optimizer, local, total)


def train_step(st: TrainingState) -> None:
    """One optimizer step, untimed, before each ckptguard save, as a training loop has between
    checkpoints: the resume guard checks that the optimizer it was handed has stepped since the
    last save (and logs an error finding otherwise), and a real run saves a changed state."""
    st.optimizer.step()


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
    steps: dict[str, int] = field(default_factory=dict)  # last step saved, per method

    def next_step(self, method: str) -> int:
        """Steps increase per method across warm-up and repeats, as in a training run."""
        self.steps[method] = self.steps.get(method, 0) + 1
        return self.steps[method]


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


def _raw_step_dir(ctx: Context, name: str, step: int) -> Path:
    return ctx.workdir / name / f"step-{step:08d}"


def _delete_older_raw(ctx: Context, name: str, keep: Path) -> None:
    """Raw DCP rows write steps in sequence into one root, like a user's run, and delete their
    own older directories here, outside the timed region (raw DCP users usually don't delete
    at all); ``os.sync`` lets the deletion reach the disk before the next method is timed."""
    _barrier()
    if _rank() == 0:
        for old in sorted((ctx.workdir / name).iterdir()):
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        os.sync()
    _barrier()


def method_dcp(ctx: Context, rep: int) -> dict[str, Any]:
    """Raw ``dcp.save``/``dcp.load`` of the state dict ckptguard saves (``get_*_state_dict``),
    ``FileSystemWriter(sync_files=True)`` with ckptguard's thread count; load ends with
    ``set_*_state_dict`` as a user's would. No checksums, no commit protocol. The previous
    step's directory exists during the save and is deleted afterwards, untimed."""
    root = _raw_step_dir(ctx, "dcp", ctx.next_step("dcp"))
    st = ctx.state

    def save() -> None:
        writer = dcp.FileSystemWriter(root, sync_files=True, thread_count=ctx.thread_count)
        dcp.save(_dcp_state(st), storage_writer=writer, **_dcp_kwargs())

    def load() -> None:
        sd = _dcp_state(st)
        dcp.load(sd, storage_reader=dcp.FileSystemReader(root), **_dcp_kwargs())
        set_model_state_dict(st.model, sd["model"])
        set_optimizer_state_dict(st.model, st.optimizer, sd["optimizer"])

    save_s, save_mem, _ = _timed(save)
    cache = _cold(ctx, root)
    cold_s, load_mem, _ = _timed(load)
    warm_s, _, _ = _timed(load)
    _delete_older_raw(ctx, "dcp", keep=root)
    return {"save_s": save_s, "save_mem": save_mem, "load_cold_s": cold_s, "load_warm_s": warm_s,
            "load_mem": load_mem, "cache_drop": cache}


def method_dcp_async(ctx: Context, rep: int) -> dict[str, Any]:
    """Raw ``dcp.async_save`` with its default staging (a full CPU copy on the caller's thread);
    steps in sequence, the older directory deleted afterwards, untimed."""
    root = _raw_step_dir(ctx, "dcpasync", ctx.next_step("dcp.async_save"))
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
    _delete_older_raw(ctx, "dcpasync", keep=root)
    return {"stall_s": stall_s, "complete_s": complete_s, "save_mem": mem}


# ------------------------------------------------------------------------- ckptguard rows

DEFAULT_KEEP_LAST: int | None = (
    inspect.signature(CheckpointManager.__init__).parameters["keep_last"].default
)

# keep_last of each ckptguard row: retention is ON in the rows a user gets (the default, and 1,
# the worst case: every save deletes the checkpoint it replaces); the ``keep_last=None`` row is
# the reference for what ckptguard adds to DCP besides deletion (checksums, RNG, manifest, guard).
KEEP_LAST: dict[str, int | None] = {
    "ckptguard": DEFAULT_KEEP_LAST,
    "ckptguard keep_last=1": 1,
    "ckptguard keep_last=None": None,
    "ckptguard async": DEFAULT_KEEP_LAST,
}


def checkpoints_held(method: str) -> int:
    """Complete checkpoints a method leaves on disk between repeats (for the free-space check)."""
    if method in KEEP_LAST:
        keep = KEEP_LAST[method]
        return 1 if keep is None else keep  # the None row's older steps are deleted, untimed
    return 1 if method in ("dcp", "dcp.async_save") else 0


class _Managers:
    """One CheckpointManager per ckptguard row for the whole size (each builds process groups
    and holds its root's lock), so that its checkpoints accumulate as in a training run."""

    def __init__(self) -> None:
        self._by_key: dict[str, CheckpointManager] = {}

    def get(self, ctx: Context, method: str) -> CheckpointManager:
        if method not in self._by_key:
            root = ctx.workdir / ("ckptguard-" + method.replace(" ", "-").replace("=", "-"))
            self._by_key[method] = CheckpointManager(
                root, model=ctx.state.model, optimizer=ctx.state.optimizer,
                keep_last=KEEP_LAST[method], thread_count=ctx.thread_count,
            )
        return self._by_key[method]

    def close(self) -> None:
        for mgr in self._by_key.values():
            mgr.close()
            _clean(mgr.root)
        self._by_key.clear()


MANAGERS = _Managers()


def prefill(ctx: Context, methods: list[str]) -> None:
    """Untimed saves before the warm-up, so that from the first save on every row's root holds
    what it would mid-run: ``keep_last`` checkpoints for the ckptguard rows (each later save
    deletes one inside ``save()``), the previous step for the raw DCP rows."""
    for method in methods:
        if method in KEEP_LAST:
            mgr = MANAGERS.get(ctx, method)
            keep = KEEP_LAST[method]
            for _ in range(1 if keep is None else keep):
                train_step(ctx.state)
                mgr.save(ctx.next_step(method), blocking=method != "ckptguard async")
                mgr.wait()
            _settle(mgr)
        elif method in ("dcp", "dcp.async_save"):
            root = _raw_step_dir(ctx, "dcp" if method == "dcp" else "dcpasync",
                                 ctx.next_step(method))
            writer = dcp.FileSystemWriter(root, sync_files=True, thread_count=ctx.thread_count)
            dcp.save(_dcp_state(ctx.state), storage_writer=writer, **_dcp_kwargs())
    _barrier()


_DOOMED_RE = re.compile(r"step-\d+|trash|delet")


def _settle(mgr: CheckpointManager, timeout_s: float = 300.0) -> float | None:
    """Wait until retention has finished deleting under ``mgr.root``; seconds waited (rank 0).

    ``save()`` may delete old checkpoints itself or leave that to a background thread. Either
    way the next method must not be timed while a deletion is still running, so rank 0 polls
    until the root holds at most ``keep_last`` complete checkpoints and no non-empty directory
    that looks like one on its way out (``.step-N.deleting``, a trash directory; the guard's own
    directories are left alone). Returns how long that took after ``save()`` returned: about 0
    when ``save()`` deleted synchronously.
    """
    _barrier()
    waited = None
    if _rank() == 0:
        t0 = time.perf_counter()
        while True:
            steps = mgr.steps()
            names = {Path(mgr.layout.step_dir(s)).name for s in steps} if steps else set()
            busy = [e.name for e in os.scandir(mgr.root)
                    if e.is_dir() and e.name not in names and _DOOMED_RE.search(e.name)
                    and any(os.scandir(e.path))]
            over = mgr.keep_last is not None and len(steps) > mgr.keep_last
            if not busy and not over:
                break
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(
                    f"retention under {mgr.root} still not done after {timeout_s:.0f}s: "
                    f"{len(steps)} complete checkpoints (keep_last={mgr.keep_last}), busy {busy}"
                )
            time.sleep(0.005)
        waited = time.perf_counter() - t0
    _barrier()
    return waited


def _steps_on_rank0(mgr: CheckpointManager) -> set[int] | None:
    return set(mgr.steps()) if _rank() == 0 else None


def _ckptguard_save(ctx: Context, method: str) -> tuple[CheckpointManager, int, Path, dict[str, Any]]:
    """One timed blocking ``save(step)`` of a ckptguard row, retention as configured, then wait
    (untimed) for any deletion still running. ``deleted_n``: checkpoints this save deleted."""
    mgr = MANAGERS.get(ctx, method)
    step = ctx.next_step(method)
    train_step(ctx.state)
    _barrier()
    before = _steps_on_rank0(mgr)
    with ctx.probes.collect() as save_extras:
        save_s, save_mem, path = _timed(lambda: mgr.save(step))
        tail_s = _settle(mgr)
    out: dict[str, Any] = {"save_s": save_s, "save_mem": save_mem, "save_extras": save_extras}
    if before is not None:
        out["deleted_n"] = len(before - set(mgr.steps()))
        out["retention_tail_s"] = tail_s
    return mgr, step, Path(path), out


def method_ckptguard(ctx: Context, rep: int) -> dict[str, Any]:
    """The user's save: ``CheckpointManager.save(step)`` (blocking) with the default
    ``keep_last``, so that the oldest checkpoint is deleted as part of the save, and
    ``load(step)`` with the defaults (``verify_on_load=True``). Also times, apart, a load
    without verification and what a serial second hashing pass over the rank's files would
    cost (``hash_files``, warm cache)."""
    mgr, step, path, out = _ckptguard_save(ctx, "ckptguard")
    if hash_files is not None and own_files is not None:
        mine = own_files(path, _rank())
        out["rehash_s"], _, _ = _timed(lambda: hash_files(path, mine))
    out["cache_drop"] = _cold(ctx, path)
    with ctx.probes.collect() as load_extras:
        out["load_cold_s"], out["load_mem"], _ = _timed(lambda: mgr.load(step))
    out["load_extras"] = load_extras
    out["load_warm_s"], _, _ = _timed(lambda: mgr.load(step))
    # what the checksum verification costs at load: the same cold load without it
    _cold(ctx, path)
    mgr.verify_on_load = False
    try:
        out["load_cold_noverify_s"], _, _ = _timed(lambda: mgr.load(step))
    finally:
        mgr.verify_on_load = True
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


def method_ckptguard_keep1(ctx: Context, rep: int) -> dict[str, Any]:
    """``save(step)`` with ``keep_last=1``, the worst case: every save deletes the checkpoint it
    replaces, a whole state's worth of files."""
    return _ckptguard_save(ctx, "ckptguard keep_last=1")[3]


def method_ckptguard_noretention(ctx: Context, rep: int) -> dict[str, Any]:
    """``save(step)`` with ``keep_last=None``: the same work as raw DCP plus ckptguard's extras
    (checksums, RNG, rank files, manifest, guard) and nothing else; the reference for the
    extras target. The older checkpoint is deleted afterwards, untimed, as the raw DCP rows do."""
    mgr, step, _, out = _ckptguard_save(ctx, "ckptguard keep_last=None")
    _barrier()
    if _rank() == 0:
        for old in mgr.steps():
            if old != step:
                _delete_untimed(mgr, old)
        os.sync()
    _barrier()
    return out


def _delete_untimed(mgr: CheckpointManager, step: int) -> None:
    delete = getattr(mgr.layout, "delete", None)
    if callable(delete):
        delete(step)
    else:  # pragma: no cover - a ckptguard version without layout.delete
        shutil.rmtree(mgr.layout.step_dir(step))


def method_ckptguard_async(ctx: Context, rep: int) -> dict[str, Any]:
    """``save(step, blocking=False)`` with the default ``keep_last``: the caller's stall is the
    call itself; complete = when ``wait()`` returns (committed and durable). If the manager
    stages in the background, the time until staging is done is what the next
    ``optimizer.step()`` may wait at most."""
    method = "ckptguard async"
    mgr = MANAGERS.get(ctx, method)
    step = ctx.next_step(method)

    def both() -> tuple[float, float | None, float]:
        t0 = time.perf_counter()
        mgr.save(step, blocking=False)
        stall = time.perf_counter() - t0
        staged = None
        stager = getattr(mgr, "_stager", None)  # ckptguard.core.staging.BackgroundStager
        if stager is not None:
            stager.wait()
            staged = time.perf_counter() - t0
        mgr.wait()
        return stall, staged, time.perf_counter() - t0

    train_step(ctx.state)
    _barrier()
    before = _steps_on_rank0(mgr)
    with ctx.probes.collect() as extras:
        _, mem, (stall_s, staged_s, complete_s) = _timed(both)
        tail_s = _settle(mgr)
    out = {"stall_s": stall_s, "complete_s": complete_s, "save_mem": mem, "save_extras": extras}
    if before is not None:
        out["deleted_n"] = len(before - set(mgr.steps()))
        out["retention_tail_s"] = tail_s
    if staged_s is not None:
        out["staged_s"] = staged_s
    stager = getattr(mgr, "_stager", None)
    buffers = getattr(stager, "_buffers", None)
    if buffers is not None:  # the staging copy kept between saves (not in peak RSS after save 1)
        out["held_mem"] = sum(b.nbytes for b in buffers.values())
    return out


METHODS = {
    "disk": method_disk,
    "torch.save": method_torch_save,
    "dcp": method_dcp,
    "dcp.async_save": method_dcp_async,
    "ckptguard": method_ckptguard,
    "ckptguard keep_last=1": method_ckptguard_keep1,
    "ckptguard keep_last=None": method_ckptguard_noretention,
    "ckptguard async": method_ckptguard_async,
}


def default_thread_count() -> int:
    return inspect.signature(CheckpointManager.__init__).parameters["thread_count"].default
