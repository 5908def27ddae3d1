"""Async-save staging that barely stalls the caller, and stays exact.

An async save must write the state *of the saved step*, while training goes on and mutates the
parameters and optimizer moments in place. DCP's default staging copies everything on the
caller's thread before returning (a third of a sync save on a 2-core CPU machine, most of it page
faults of the fresh copy). This stager instead:

* copies into buffers it keeps from one save to the next, so the copy is a plain memcpy;
* copies, on the caller's thread, only what training may change before the next
  ``optimizer.step()``: buffers (BatchNorm statistics change in ``forward``), small tensors and
  anything it cannot attribute to the optimizer;
* copies the parameters and optimizer state, the bulk, in a background thread; an optimizer
  step pre-hook blocks ``optimizer.step()`` until that copy is done. Between a save and the
  next step, the forward and backward pass read parameters but do not write them.

A guard against a trainer that writes parameters elsewhere (``p.mul_()`` under ``no_grad``, an
EMA into the live weights): each tensor's autograd version counter is recorded at ``stage()``
and checked after its copy; a change fails the save with a ``StagingError`` naming the tensor,
instead of committing a checkpoint that mixes two steps. (Writes through ``.data`` bypass the
version counter; the contract is documented on ``CheckpointManager.save``.)

On CUDA the buffers are pinned and the copy runs on a side stream ordered after the work queued
on the caller's stream, so the device-to-host copy overlaps compute. The stream and the event
that orders it are created on the device *of the tensors being staged*: the copy runs in a worker
thread, whose current device is ``cuda:0`` whatever the trainer's ``set_device(local_rank)``
said, so a default ``torch.cuda.Stream()`` there would put rank 1's copy on GPU 0's stream,
ordered after nothing that rank 1 queued.

Memory: after the first async save the buffers hold one CPU copy of the model + optimizer state
until ``close()``, the same as DCP's ``cache_staged_state_dict=True``. Sync saves use none.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.staging import AsyncStager

from ckptguard.errors import CheckpointError

logger = logging.getLogger(__name__)

# Tensors below this size are copied on the caller's thread: cheaper than the bookkeeping.
_BACKGROUND_MIN_BYTES = 1 << 16

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    from torch.distributed._tensor import DTensor  # type: ignore[no-redef]


class StagingError(CheckpointError):
    """A tensor changed while it was being copied for an async save."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


def cuda_devices(tensors: Iterable[torch.Tensor]) -> list[torch.device]:
    """The CUDA devices ``tensors`` live on, in first-seen order, each with its index (a
    tensor's ``device`` always carries one). Streams and events for staging are made per
    device from this, never from the calling thread's current device."""
    seen: dict[torch.device, None] = {}
    for t in tensors:
        if t.is_cuda:
            seen.setdefault(t.device, None)
    return list(seen)


def record_events(tensors: Iterable[torch.Tensor]) -> dict[torch.device, Any]:
    """One CUDA event per device of ``tensors``, recorded on that device's current stream (the
    trainer's): the background copy of that device's tensors waits for it, so it reads values
    that the work queued before the save has finished writing."""
    events = {}
    for device in cuda_devices(tensors):
        events[device] = torch.cuda.Event()
        events[device].record(torch.cuda.current_stream(device))
    return events


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    t = _local(t)
    return (t.device.type, t.untyped_storage().data_ptr())


class _Copy:
    """One tensor to stage: source (local shard), destination buffer, and the version counters
    to watch. A DTensor has its own counter (bumped by in-place ops on the DTensor, e.g. the
    optimizer's) besides its local tensor's (bumped by ops on ``to_local()``): both are watched."""

    __slots__ = ("name", "src", "dst", "watched", "versions")

    def __init__(self, name: str, src: torch.Tensor, dst: torch.Tensor, outer: torch.Tensor) -> None:
        self.name = name
        self.src = src
        self.dst = dst
        self.watched = (outer, src) if outer is not src else (src,)
        self.versions = tuple(t._version for t in self.watched)

    def changed(self) -> bool:
        return tuple(t._version for t in self.watched) != self.versions


class BackgroundStager(AsyncStager):
    """Stage state dicts for ``dcp.async_save``; see the module docstring.

    Kept instead of DCP's ``DefaultStager`` because it stalls the caller less
    (benchmarks/bench_staging.py, 528 MiB model + AdamW on CPU, torch 2.13, 2 shared CPUs at
    load ~5, medians of 3; stager kept between saves): caller stall 0.018 s vs 0.030 s for
    ``DefaultStager(use_async_staging=True)``, staged after 0.29 s vs 0.31 s, durable after
    0.97 s vs 2.4 s, no extra RSS in steady state for either. It also does what DefaultStager
    does not: ``optimizer.step()`` waits for the copy, and an in-place write during it fails
    the save instead of committing a mix of two steps.

    Args:
        optimizer: whose ``step()`` waits for a pending background copy; the tensors it
            updates (its parameters' storages and its state) are the ones copied in the
            background. ``None``: everything is copied on the caller's thread.
    """

    _synchronize_after_execute = False

    def __init__(self, optimizer: torch.optim.Optimizer | None) -> None:
        self._optimizer = optimizer
        self._buffers: dict[str, torch.Tensor] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._lock = threading.Lock()
        self._hook = (
            optimizer.register_step_pre_hook(self._before_step) if optimizer is not None else None
        )
        self._streams: dict[torch.device, Any] = {}  # one copy stream per CUDA device
        self._used: set[str] = set()  # buffer names the current stage() uses

    # ---------------------------------------------------------------- AsyncStager protocol

    def stage(self, state_dict: dict[str, Any], **_: Any) -> Future:
        """Return a future of the staged copy; the caller may go on training at once."""
        self.wait()
        guarded = self._guarded_storages()
        background: list[_Copy] = []
        self._used = set()
        with torch.no_grad():
            staged = self._stage_obj(state_dict, "", guarded, background)
        for stale in set(self._buffers) - self._used:  # the state lost a tensor since last time
            del self._buffers[stale]
        if not background:
            done: Future = Future()
            done.set_result(staged)
            return done
        events = record_events(c.src for c in background)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptguard-stage")
        future = self._executor.submit(self._copy_all, background, staged, events)
        with self._lock:
            self._future = future
        return future

    def synchronize_staging(self) -> None:
        self.wait()

    def close(self) -> None:
        """Finish a pending copy, remove the optimizer hook and free the buffers."""
        try:
            self.wait()
        finally:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._buffers.clear()

    # ---------------------------------------------------------------- waiting

    def wait(self) -> None:
        """Block until the pending background copy (if any) is done.

        A failed copy is not raised here: the save that owns it reports it (through DCP's
        upload future and ``CheckpointManager.wait``); the next step or save just goes on.
        """
        with self._lock:
            future = self._future
        if future is None:
            return
        if not future.done():
            logger.debug("waiting for async checkpoint staging")
        try:
            future.result()
        except Exception:  # noqa: BLE001 - reported by the save that owns the copy
            pass
        finally:
            with self._lock:
                if self._future is future:
                    self._future = None

    def _before_step(self, *_: Any) -> None:
        self.wait()

    # ---------------------------------------------------------------- copying

    def _guarded_storages(self) -> set[tuple[str, int]]:
        """Storages that change only in ``optimizer.step()``: its parameters and its state."""
        opt = self._optimizer
        if opt is None:
            return set()
        keys = set()
        for group in opt.param_groups:
            for p in group["params"]:
                keys.add(_storage_key(p))
                for v in opt.state.get(p, {}).values():
                    if isinstance(v, torch.Tensor):
                        keys.add(_storage_key(v))
        return keys

    def _buffer(self, name: str, like: torch.Tensor) -> torch.Tensor:
        self._used.add(name)
        buf = self._buffers.get(name)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            pin = like.is_cuda
            buf = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=pin)
            self._buffers[name] = buf
        return buf

    def _stage_obj(self, obj: Any, name: str, guarded: set, background: list[_Copy]) -> Any:
        if isinstance(obj, dict):
            return {k: self._stage_obj(v, f"{name}/{k}", guarded, background) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            items = [self._stage_obj(v, f"{name}/{i}", guarded, background) for i, v in enumerate(obj)]
            return type(obj)(items)
        if isinstance(obj, DTensor):
            local = self._stage_tensor(obj._local_tensor, name, guarded, background, outer=obj)
            return DTensor.from_local(
                local, obj.device_mesh, obj.placements, run_check=False,
                shape=obj.size(), stride=obj.stride(),
            )
        if isinstance(obj, torch.Tensor):
            return self._stage_tensor(obj, name, guarded, background)
        return copy.deepcopy(obj)

    def _stage_tensor(
        self, t: torch.Tensor, name: str, guarded: set, background: list[_Copy],
        outer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if t.numel() == 0 or t.layout != torch.strided:
            return t.detach().to("cpu", copy=True)
        buf = self._buffer(name, t)
        if t.nbytes >= _BACKGROUND_MIN_BYTES and _storage_key(t) in guarded:
            background.append(_Copy(name, t, buf, outer if outer is not None else t))
        else:
            buf.copy_(t)
        return buf

    def _copy_stream(self, device: torch.device) -> Any:
        """This stager's copy stream on ``device``, created there (not on the thread's device)."""
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _copy_all(
        self, copies: list[_Copy], staged: dict[str, Any], events: dict[torch.device, Any]
    ) -> dict[str, Any]:
        """Copy in the worker thread: CUDA tensors on their own device's copy stream, ordered
        after ``events[device]`` (recorded by ``stage`` on the caller's stream), then wait."""
        used = []
        with torch.no_grad():
            for c in copies:
                if not c.src.is_cuda:
                    c.dst.copy_(c.src)
            for device in cuda_devices(c.src for c in copies):
                stream = self._copy_stream(device)
                stream.wait_event(events[device])
                with torch.cuda.device(device), torch.cuda.stream(stream):
                    for c in copies:
                        if c.src.is_cuda and c.src.device == device:
                            c.dst.copy_(c.src, non_blocking=True)
                used.append(stream)
        for stream in used:
            stream.synchronize()
        changed = [c.name for c in copies if c.changed()]
        if changed:
            raise StagingError(
                f"tensors {changed[:5]}{' ...' if len(changed) > 5 else ''} were modified in place "
                "while an async save was copying them (expected: only optimizer.step() changes "
                "parameters and optimizer state, and it waits for the copy). The checkpoint would "
                "mix two steps, so it is not committed. Save with blocking=True, or modify them "
                "only after CheckpointManager.wait()."
            )
        return staged

