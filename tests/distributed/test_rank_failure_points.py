"""One rank fails alone at a point of save, load, wait or close: every rank raises the same error.

Run with ``torchrun --nproc_per_node=2 -m pytest tests/distributed/test_rank_failure_points.py``.

Each test trains a 2-rank FSDP2 model the way a trainer does, saves step 1, trains on, and then
makes ONE rank (rank 1) fail at one point, by monkeypatching on that rank only. Every rank must
raise the same ckptguard error, naming rank 1 and the cause, within ``LIMIT_S`` (not after the
process group's timeout, not by one rank going on while the other waits in a collective). Then,
with the fault gone, step 1 must load bit-exactly and a later save and load must work.

The checkpoint groups of these tests time out after ``GROUP_TIMEOUT`` instead of the suite's five
minutes, so that a regression shows as a failed test (a rank that raised ``DistBackendError``
after the timeout, or a rank that did not raise), not as a hung job. Points not repeated here:
a rank failing while writing its files or on a full disk (``test_rank_failure.py``) and a rank
file damaged on one rank (ibid.).
"""

from __future__ import annotations

import errno
import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.distributed.checkpoint import CheckpointException

import ckptguard.core.loading as loading_module
import ckptguard.guard.resume_guard as resume_guard_module
import ckptguard.guard.statecheck as statecheck
from ckptguard import (
    CheckpointCorruptError,
    CheckpointManager,
    CommitError,
    ResumeError,
    StateMismatchError,
)
from ckptguard.core import records
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.reader import DirectFileSystemReader
from ckptguard.core.staging import BackgroundStager, StagingError
from ckptguard.core.states import ModelOptimizerState
from ckptguard.guard.resume_guard import ResumeGuard
from tests._helpers import Counter
from tests.distributed._fsdp import (
    all_gather,
    build_sharded,
    local_state,
    seed_per_rank,
    tensor_problems,
    train_sharded,
)

pytestmark = pytest.mark.timeout(300)

BAD_RANK = 1
LIMIT_S = 30.0  # a prompt failure takes a second or two; a hang takes GROUP_TIMEOUT
GROUP_TIMEOUT = timedelta(seconds=60)


@pytest.fixture(autouse=True)
def short_group_timeout(monkeypatch):
    """The manager's gloo groups (``new_group(timeout=None)``) time out after GROUP_TIMEOUT."""
    monkeypatch.setattr(c10d, "default_pg_timeout", GROUP_TIMEOUT)


def _bad() -> bool:
    return dist.get_rank() == BAD_RANK


def _raising(error: BaseException) -> Callable[..., Any]:
    """A stand-in for a function or method that raises ``error`` whatever it is called with."""

    def fail(*_: Any, **__: Any) -> Any:
        raise error

    return fail


_eio = _raising(OSError(errno.EIO, "Input/output error (injected)"))


class FlakyCounter(Counter):
    """A user Stateful whose ``state_dict()`` raises on one rank (a bug, a lost connection)."""

    fail = False

    def state_dict(self) -> dict[str, Any]:
        if self.fail:
            raise RuntimeError("counter state unavailable (injected)")
        return super().state_dict()


class Run:
    """A trainer's objects, a manager, step 1 saved and one more step trained."""

    def __init__(self, mesh, root, **tinylm: Any) -> None:
        seed_per_rank(0)
        self.root = root
        self.model, self.optimizer, self.scheduler = build_sharded(
            mesh, seed=0, with_scheduler=True, **tinylm
        )
        self.counter = FlakyCounter()
        self.mgr = self.manager()
        self.train(1, first_batch=0)
        self.mgr.save(1)
        self.at_1 = local_state(self.model, self.optimizer)
        self.train(1, first_batch=1)

    def manager(self) -> CheckpointManager:
        return CheckpointManager(
            self.root, model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            extra={"counter": self.counter}, keep_last=None, commit_timeout_s=300,
        )

    def train(self, steps: int, first_batch: int) -> None:
        losses = train_sharded(self.model, self.optimizer, self.scheduler, steps, first_batch)
        for i, loss in enumerate(losses):
            self.counter.add(8)
            self.mgr.record(first_batch + i + 1, loss=loss)


def _attempt(op: Callable[[], Any]) -> tuple[str | None, str, float]:
    """(error class or None, message, seconds) of ``op`` on this rank."""
    started = time.monotonic()
    try:
        op()
    except (Exception, CheckpointException) as e:  # the latter is a BaseException
        return type(e).__name__, str(e), time.monotonic() - started
    return None, "", time.monotonic() - started


def _normalised(message: str) -> str:
    """Without the free-space hint, which each rank measures at its own moment."""
    return re.sub(r" \([\d.]+ GiB free on the file system of [^)]*\)", "", message)


def agreement_problems(outcome: tuple[str | None, str, float], error: type, cause: str) -> list[str]:
    """Why the ranks did not all raise the same ``error`` naming rank 1 and ``cause`` in time.

    Gathered on the default group, so every rank computes the same verdict (and a rank that
    raised at once still meets a rank that raised only after the group timeout)."""
    outcomes = all_gather(outcome)
    problems = []
    for rank, (kind, message, elapsed) in enumerate(outcomes):
        if kind is None:
            problems.append(f"rank {rank} did not raise")
            continue
        if kind != error.__name__:
            problems.append(f"rank {rank} raised {kind}, expected {error.__name__}: {message}")
        if elapsed > LIMIT_S:
            problems.append(f"rank {rank} raised after {elapsed:.1f}s (limit {LIMIT_S}s): {message}")
        if f"rank {BAD_RANK}" not in message or cause not in message:
            problems.append(f"rank {rank}'s error does not name rank {BAD_RANK} and {cause!r}: {message}")
    messages = {_normalised(m) for kind, m, _ in outcomes if kind is not None}
    if len(messages) > 1:
        problems.append("the ranks' errors differ:\n" + "\n".join(f"  rank {r}: {m}" for r, (_, m, _) in enumerate(outcomes)))
    return problems


def recovery_problems(run: Run, mgr: CheckpointManager | None = None) -> list[str]:
    """With the fault gone: step 1 is the newest checkpoint and loads bit-exactly; a later save
    of step 2 and its load work; nothing of the failed attempt is left. Closes the manager."""
    mgr = mgr or run.mgr
    problems = []
    if mgr.steps() != [1]:
        problems.append(f"complete steps after the failure: {mgr.steps()}, expected [1]")
    step = mgr.load()
    if step != 1:
        problems.append(f"load() after the failure returned {step}, expected 1")
    problems += tensor_problems(run.at_1, local_state(run.model, run.optimizer), "step 1 after the failure")
    run.train(1, first_batch=1)
    at_2 = local_state(run.model, run.optimizer)
    mgr.save(2)
    run.train(1, first_batch=2)
    step = mgr.load()
    if step != 2:
        problems.append(f"load() of the step saved after the failure returned {step}, expected 2")
    problems += tensor_problems(at_2, local_state(run.model, run.optimizer), "step 2 saved after the failure")
    dist.barrier()
    leftovers = CheckpointLayout(run.root).transient_dirs()
    if leftovers:
        problems.append(f"leftovers: {leftovers}")
    mgr.close()
    return problems


def _assert_agreed_then_recovers(run: Run, outcome, error: type, cause: str) -> None:
    problems = agreement_problems(outcome, error, cause)
    # identical on every rank: stop here together, before the manager's (possibly broken) groups
    assert not problems, "\n".join(problems)
    problems = all_gather(recovery_problems(run))
    report = [f"rank {r}: {p}" for r, ps in enumerate(problems) for p in ps]
    assert not report, "\n".join(report)


# ---------------------------------------------------------------------------------- load

# (point, what rank 1's fault replaces, the fault, expected error, words of the cause)
LOAD_POINTS: list[tuple[str, Any, str, Callable[..., Any], type, str]] = [
    ("manifest", loading_module, "read_checked_manifest", _eio, CheckpointCorruptError, "Input/output error"),
    ("dcp_metadata", statecheck, "read_saved_keys", _eio, CheckpointCorruptError, "Input/output error"),
    ("load_template", ModelOptimizerState, "load_template",
     _raising(RuntimeError("template failed (injected)")),
     StateMismatchError, "template failed"),
    ("guard_before_load", ResumeGuard, "before_load",
     _raising(StateMismatchError("live shapes differ (injected)")),
     StateMismatchError, "live shapes differ"),
    ("dcp_load", DirectFileSystemReader, "read_data", _eio, CheckpointCorruptError, "Input/output error"),
    ("set_state_dict", ModelOptimizerState, "load_state_dict",
     _raising(RuntimeError("set_state_dict failed (injected)")),
     StateMismatchError, "set_state_dict failed"),
    ("rank_file", loading_module, "load_rank_file",
     _raising(CheckpointCorruptError("rank-00001.pt is truncated (injected)")),
     CheckpointCorruptError, "rank-00001.pt is truncated"),
    ("guard_readback", ModelOptimizerState, "state_dict",
     _raising(RuntimeError("readback failed (injected)")),
     ResumeError, "readback failed"),
    ("guard_trace", resume_guard_module, "read_trace", _eio,
     ResumeError, "Input/output error"),
]


@pytest.mark.parametrize(
    "point,target,name,fault,error,cause", LOAD_POINTS, ids=[p[0] for p in LOAD_POINTS]
)
def test_load_fails_on_every_rank(mesh, shared_tmp, monkeypatch, point, target, name, fault, error, cause):
    run = Run(mesh, shared_tmp)
    dist.barrier()
    with monkeypatch.context() as m:
        if _bad():
            m.setattr(target, name, fault)
        outcome = _attempt(run.mgr.load)
    _assert_agreed_then_recovers(run, outcome, error, cause)


# ---------------------------------------------------------------------------------- save


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_guard_before_save_fails_on_every_rank(mesh, shared_tmp, monkeypatch, mode):
    run = Run(mesh, shared_tmp)

    def refuse(*_: Any, **__: Any) -> Any:
        raise ResumeError("refusing to save at micro-step 1 (injected)")

    with monkeypatch.context() as m:
        if _bad():
            m.setattr(ResumeGuard, "before_save", refuse)
        outcome = _attempt(lambda: (run.mgr.save(2, blocking=mode == "sync"), run.mgr.wait()))
    _assert_agreed_then_recovers(run, outcome, ResumeError, "micro-step 1")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_model_state_dict_hook_fails_on_every_rank(mesh, shared_tmp, mode):
    """A user's state_dict hook on a submodule raises on one rank while the save builds the
    model's state dict."""
    run = Run(mesh, shared_tmp)

    def hook(*_: Any) -> None:
        raise RuntimeError("state_dict hook failed (injected)")

    handle = run.model.hidden.register_state_dict_post_hook(hook) if _bad() else None
    outcome = _attempt(lambda: (run.mgr.save(2, blocking=mode == "sync"), run.mgr.wait()))
    if handle is not None:
        handle.remove()
    _assert_agreed_then_recovers(run, outcome, CommitError, "state_dict hook failed")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_user_state_dict_fails_on_every_rank(mesh, shared_tmp, mode):
    """A Stateful handed as ``extra`` raises in ``state_dict()`` on one rank."""
    run = Run(mesh, shared_tmp)
    run.counter.fail = _bad()
    outcome = _attempt(lambda: (run.mgr.save(2, blocking=mode == "sync"), run.mgr.wait()))
    run.counter.fail = False
    _assert_agreed_then_recovers(run, outcome, CommitError, "counter state unavailable")


def test_async_staging_fails_on_every_rank(mesh, shared_tmp, monkeypatch):
    """Staging for an async save fails on the caller's thread of one rank (out of pinned
    memory, a state value that cannot be copied), before DCP's background save starts."""
    run = Run(mesh, shared_tmp)

    def stage(*_: Any, **__: Any) -> Any:
        raise RuntimeError("cannot allocate the staging buffers (injected)")

    with monkeypatch.context() as m:
        if _bad():
            m.setattr(BackgroundStager, "stage", stage)
        outcome = _attempt(lambda: (run.mgr.save(2, blocking=False), run.mgr.wait()))
    _assert_agreed_then_recovers(run, outcome, CommitError, "cannot allocate the staging buffers")


def test_async_background_copy_fails_on_every_rank(mesh, shared_tmp, monkeypatch):
    """The background copy of an async save fails on one rank: that rank's DCP save never
    starts, so the other rank's would wait in DCP's first collective."""
    run = Run(mesh, shared_tmp, dim=64, hidden=256)  # tensors big enough to copy in the background

    copied: list[bool] = []

    def copy_all(self, copies, staged, events):
        copied.append(bool(copies))
        raise StagingError("tensors ['hidden.weight'] were modified in place while an async save was copying them (injected)")

    with monkeypatch.context() as m:
        if _bad():
            m.setattr(BackgroundStager, "_copy_all", copy_all)
        outcome = _attempt(lambda: (run.mgr.save(2, blocking=False), run.mgr.wait()))
    assert all(all_gather(copied == [True] or not _bad())), "the fault did not fire on rank 1"
    _assert_agreed_then_recovers(run, outcome, CommitError, "modified in place")


# ---------------------------------------------------------------------------------- close


def test_close_after_a_failed_background_commit_fails_on_every_rank(mesh, shared_tmp, monkeypatch):
    """An async save whose background part fails on one rank; the trainer ends with close()
    without calling wait(): every rank raises, and the root is free for the next manager."""
    run = Run(mesh, shared_tmp)
    with monkeypatch.context() as m:
        if _bad():
            m.setattr(records, "write_done_record",
                      _raising(OSError(errno.ENOSPC, "No space left on device")))
        run.mgr.save(2, blocking=False)
        outcome = _attempt(run.mgr.close)
    problems = agreement_problems(outcome, CommitError, "No space left on device")
    assert not problems, "\n".join(problems)
    run.mgr = run.manager()  # close() released the lock: a new writer of the root saves
    problems = all_gather(recovery_problems(run))
    report = [f"rank {r}: {p}" for r, ps in enumerate(problems) for p in ps]
    assert not report, "\n".join(report)
