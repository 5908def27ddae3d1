"""Retention deletes in the background (issue 12): ``save()`` never waits for ``rmtree``.

A save with ``keep_last`` renames each checkpoint beyond it to ``.step-N.deleting`` (one atomic
rename each, one fsync of the root), which no load considers, and hands it to the manager's
deleter thread, which removes them in order, one at a time. These tests hold that thread's
``rmtree`` behind a gate, so every interleaving is forced, not timed: save returns while a
deletion is held; close waits for it or leaves it to the next writer; a failure is reported at
the next save or close and training goes on; a SIGKILL in the middle of a deletion leaves
nothing a load could take for a checkpoint, and the next writer finishes the job.
"""

from __future__ import annotations

import gc
import logging
import shutil
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard.core.commit as commit_mod
from ckptguard import CheckpointManager
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.format import LOCK_NAME, MANIFEST_NAME, step_dirname
from ckptguard.core.policy import RetentionPolicy
from ckptguard.core.staging import BackgroundStager
from ckptguard.demo import TinyLM, build_optimizer
from ckptguard.testing import faults
from tests._helpers import (
    assert_tensors_equal,
    launcher_free_env,
    optimizer_tensors,
    progression_windows,
    train_on_batches,
)

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
    pytest.mark.filterwarnings("ignore:'set_vital' is deprecated"),
]

GATE_TIMEOUT_S = 8.0  # how long a held rmtree waits for the test (today's code waits it out)


# ---------------------------------------------------------------- a user's trainer


@dataclass
class Trainer:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    mgr: CheckpointManager
    it: Any = None

    def train(self, n: int) -> list[float]:
        """``n`` optimizer steps on the next batches of the loader (one epoch is 32 batches)."""
        if self.it is None:
            self.it = iter(self.loader)
        return train_on_batches(self.model, self.optimizer, self.scheduler, [next(self.it) for _ in range(n)])

    def tensors(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        state.update({f"optim.{k}": v.clone() for k, v in optimizer_tensors(self.optimizer).items()})
        return state


def trainer(root: Path, *, seed: int = 0, big: bool = False, **mgr_kwargs: Any) -> Trainer:
    """TinyLM + AdamW + warmup + a shuffling StatefulDataLoader over learnable progressions.
    ``big``: a hidden weight of 256x256 floats, above the async stager's background-copy size."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    torch.manual_seed(seed)
    model = TinyLM(dim=64, hidden=256, dropout=0.0) if big else TinyLM()
    optimizer = build_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))
    loader = StatefulDataLoader(progression_windows(256), batch_size=8, shuffle=True)
    mgr = CheckpointManager(
        root, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader, **mgr_kwargs
    )
    return Trainer(model, optimizer, scheduler, loader, mgr)


def deleting(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".deleting"))


def assert_loads_exactly(root: Path, step: int, expected: dict[str, torch.Tensor]) -> None:
    """A new manager on fresh objects (a reader: it takes no lock) loads ``step``, exactly."""
    other = trainer(root, seed=1)
    assert other.mgr.load() == step
    assert_tensors_equal(other.tensors(), expected, f"state loaded from step {step}")
    other.mgr.close()


@dataclass
class Gate:
    """Holds every ``rmtree`` of a ``.deleting`` directory until ``open`` (or GATE_TIMEOUT_S)."""

    event: threading.Event
    started: list[str]  # names, in the order removals began
    finished: list[str]
    threads: set[str]
    max_concurrent: int = 0
    _running: int = 0

    def open(self) -> None:
        self.event.set()


@pytest.fixture
def gate(monkeypatch) -> Gate:
    real = shutil.rmtree
    g = Gate(threading.Event(), [], [], set())
    lock = threading.Lock()

    def held_rmtree(path, *args, **kwargs):
        if not str(path).endswith(".deleting"):
            return real(path, *args, **kwargs)
        with lock:
            g.started.append(Path(path).name)
            g.threads.add(threading.current_thread().name)
            g._running += 1
            g.max_concurrent = max(g.max_concurrent, g._running)
        g.event.wait(GATE_TIMEOUT_S)
        try:
            return real(path, *args, **kwargs)
        finally:
            with lock:
                g._running -= 1
                g.finished.append(Path(path).name)

    monkeypatch.setattr(commit_mod.shutil, "rmtree", held_rmtree)
    yield g
    g.open()


def dotted(step: int) -> str:
    return f".{step_dirname(step)}.deleting"


# ---------------------------------------------------------------- off the critical path


def test_save_returns_before_the_old_checkpoint_is_removed(tmp_path, gate):
    """Fail-on-bug: retention removed the old checkpoint inside save() (an rmtree of the
    whole state, ~0.25 s a GiB); here that rmtree is held, and save() must return anyway."""
    root = tmp_path / "ckpt"
    tr = trainer(root, keep_last=1)
    tr.train(2)
    tr.mgr.save(2)
    tr.train(2)
    at_4 = tr.tensors()
    tr.mgr.save(4)
    assert gate.finished == [], "save() waited for the removal of step 2"
    # already no checkpoint: a reader sees step 4 only, and loads it exactly
    assert tr.mgr.steps() == [4]
    assert deleting(root) == [dotted(2)]
    assert_loads_exactly(root, 4, at_4)
    tr.train(2)  # training goes on while the deletion is held
    gate.open()
    tr.mgr.close()
    assert gate.started == [dotted(2)] and gate.threads == {"ckptguard-delete"}
    assert sorted(p.name for p in root.iterdir() if "step" in p.name) == [step_dirname(4)]


def test_deletions_run_in_order_one_at_a_time(tmp_path, gate):
    root = tmp_path / "ckpt"
    tr = trainer(root, keep_last=1)
    for step in range(1, 6):
        tr.train(1)
        tr.mgr.save(step, blocking=step % 2 == 0)
    tr.mgr.wait()
    assert tr.mgr.steps() == [5]
    gate.open()
    tr.mgr.close()
    assert gate.started == [dotted(s) for s in (1, 2, 3, 4)]
    assert gate.finished == gate.started
    assert gate.max_concurrent == 1
    assert CheckpointLayout(root).transient_dirs() == []
    assert not [t for t in threading.enumerate() if t.name == "ckptguard-delete"]


def test_the_newest_checkpoint_is_never_deleted(tmp_path):
    """keep_last=1 and a save of a lower step number (a re-run of an earlier step): retention
    keeps the step just saved, and still never the newest complete checkpoint."""
    root = tmp_path / "ckpt"
    tr = trainer(root, keep_last=1)
    tr.train(1)
    tr.mgr.save(5)
    at_5 = tr.tensors()
    tr.mgr.save(3)
    tr.mgr.close()
    assert CheckpointLayout(root).complete_steps() == [3, 5]
    assert_loads_exactly(root, 5, at_5)
    steps = CheckpointLayout(root).complete_steps()
    for keep in (1, 2, 3):
        for protect in (3, 5):
            assert 5 not in RetentionPolicy(keep_last=keep).decide(steps, protect=[protect]).doomed


# ---------------------------------------------------------------- failures


def _chattr(path: Path, flag: str) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.parametrize("reported_at", ["next save", "close"])
@pytest.mark.parametrize("cause", ["undeletable file", "I/O error"])
def test_failed_deletion_is_reported_and_training_goes_on(tmp_path, caplog, cause, reported_at):
    """A file retention cannot remove (an immutable file: EPERM even for root; or an I/O error
    raised inside the removal) is logged when it happens, reported again at the next save or
    close, kept in ``mgr.retention_errors``, and never fails a save or a training step."""
    root = tmp_path / "ckpt"
    tr = trainer(root, keep_last=1)
    tr.train(1)
    tr.mgr.save(1)
    stuck = root / step_dirname(1) / "rank-00000.pt"
    if cause == "undeletable file" and not _chattr(stuck, "+i"):
        pytest.skip("chattr +i is not available on this file system")
    fault = faults.injected("prune_removing:action=raise") if cause == "I/O error" else _nothing()
    try:
        with caplog.at_level(logging.WARNING, logger="ckptguard"), fault:
            tr.train(1)
            tr.mgr.save(2)  # dooms step 1; its removal fails in the background
            assert tr.mgr._resources.deleter.wait(30)
        errors = tr.mgr.retention_errors
        assert [e.path.name for e in errors] == [dotted(1)], errors
        expected = "Operation not permitted" if cause == "undeletable file" else "No space left on device"
        assert expected in errors[0].error
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ckptguard"):
            if reported_at == "next save":
                tr.train(1)
                tr.mgr.save(3)
                at_3 = tr.tensors()
            else:
                tr.mgr.close()
        reports = [r.getMessage() for r in caplog.records if "earlier deletion failed" in r.getMessage()]
        assert len(reports) == 1 and dotted(1) in reports[0] and expected in reports[0], caplog.text
        if reported_at == "next save":
            assert tr.mgr.steps() == [3]
            assert len(tr.mgr.retention_errors) == 1, "a failed path is not retried at every save"
            tr.train(1)  # training goes on
            tr.mgr.close()
            assert_loads_exactly(root, 3, at_3)
        assert deleting(root) == [dotted(1)], "what could not be removed is kept, not a checkpoint"
    finally:
        if cause == "undeletable file":
            _chattr(root / dotted(1) / stuck.name, "-i")
    # once the cause is gone, the next writer removes it
    nxt = trainer(root, keep_last=1)
    nxt.mgr.load()
    nxt.train(1)
    nxt.mgr.save(10)
    nxt.mgr.close()
    assert deleting(root) == [] and nxt.mgr.retention_errors == []


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


# ---------------------------------------------------------------- close, GC, the next writer


def test_close_waits_for_pending_deletions(tmp_path, gate, caplog):
    root = tmp_path / "ckpt"
    tr = trainer(root, keep_last=1)
    for step in (1, 2, 3):
        tr.train(1)
        tr.mgr.save(step)
    timer = threading.Timer(0.3, gate.open)
    timer.start()
    with caplog.at_level(logging.INFO, logger="ckptguard"):
        tr.mgr.close(timeout_s=60)
    timer.join()
    assert gate.finished == [dotted(1), dotted(2)]
    assert CheckpointLayout(root).transient_dirs() == []
    assert "close() waited" in caplog.text and "deletion of 2 old checkpoint(s)" in caplog.text


def test_close_with_a_short_timeout_leaves_them_to_the_next_writer(tmp_path, gate, caplog):
    root = tmp_path / "ckpt"
    tr = trainer(root, keep_last=1)
    for step in (1, 2, 3):
        tr.train(1)
        tr.mgr.save(step)
    at_3 = tr.tensors()
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        tr.mgr.close(timeout_s=0.2)
    assert gate.finished == [], "close() outwaited its timeout"
    text = caplog.text
    assert "leaves 2 old checkpoint(s) to the next writer" in text
    assert dotted(1) in text and dotted(2) in text
    assert (root / LOCK_NAME).read_text() == "", "close() must release the lock all the same"
    assert_loads_exactly(root, 3, at_3)  # a reader meanwhile: the .deleting ones are invisible
    gate.open()  # the deleter finishes the checkpoint it was removing, then stops
    _wait_for_no_deleter_thread()
    assert deleting(root) == [dotted(2)]
    nxt = trainer(root, keep_last=1)
    assert nxt.mgr.load() == 3
    nxt.train(1)
    nxt.mgr.save(4)
    nxt.mgr.close()
    assert CheckpointLayout(root).transient_dirs() == []
    assert CheckpointLayout(root).complete_steps() == [4]


def _wait_for_no_deleter_thread(timeout_s: float = 30.0) -> None:
    for t in [t for t in threading.enumerate() if t.name == "ckptguard-delete"]:
        t.join(timeout_s)
        assert not t.is_alive()


def test_a_dropped_manager_does_not_wait_and_the_next_writer_finishes(tmp_path, gate):
    """GC of a manager with deletions pending (a notebook cell run again) waits for nothing
    and lets go of the lock; the next writer in the process removes what is left."""
    root = tmp_path / "ckpt"
    tr = trainer(root, keep_last=1)
    for step in (1, 2, 3):
        tr.train(1)
        tr.mgr.save(step)
    at_3 = tr.tensors()
    del tr
    gc.collect()
    assert gate.finished == [], "the finalizer waited for the deletion"
    assert (root / LOCK_NAME).read_text() == ""
    nxt = trainer(root, keep_last=1)
    assert nxt.mgr.load() == 3
    assert_tensors_equal(nxt.tensors(), at_3, "state after the dropped writer")
    gate.open()
    nxt.train(1)
    nxt.mgr.save(4)
    nxt.mgr.close()
    _wait_for_no_deleter_thread()
    assert CheckpointLayout(root).transient_dirs() == []
    assert CheckpointLayout(root).complete_steps() == [4]


# ---------------------------------------------------------------- SIGKILL during the deletion

_KILLED_TRAINER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from ckptguard.testing import faults
    from tests.unit.test_background_retention import trainer
    faults.install()
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    tr = trainer(root, keep_last=1)
    tr.train(3)
    tr.mgr.save(3)
    tr.train(3)
    torch.save(tr.tensors(), out / "state-6.pt")  # save() changes no state
    tr.mgr.save(6)   # dooms step 3; the deleter thread is SIGKILLed while removing it
    tr.mgr.close()   # waits for the deletion, so the kill always comes
    sys.exit("the fault never fired")
""")


def test_sigkill_while_deleting_then_load_is_exact_and_the_next_writer_cleans_up(tmp_path):
    root, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    env = dict(launcher_free_env(), **{faults.ENV_VAR: "prune_removing:action=kill", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_TRAINER, str(root), str(out)], env=env, capture_output=True,
        text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "SIGKILL at fault point 'prune_removing'" in proc.stderr
    # killed mid-removal: manifest gone, shards still there; nothing a load could pick
    torn = root / dotted(3)
    assert torn.is_dir() and not (torn / MANIFEST_NAME).exists() and any(torn.iterdir())
    assert CheckpointLayout(root).complete_steps() == [6]

    # an uninterrupted run, for the losses after the resume
    ref = trainer(tmp_path / "ref", keep_last=None)
    ref.train(6)
    ref_losses = ref.train(4)
    ref_final = ref.tensors()
    ref.mgr.close()

    resumed = trainer(root, seed=1, keep_last=1)
    assert resumed.mgr.load() == 6
    assert_tensors_equal(resumed.tensors(), torch.load(out / "state-6.pt"), "state loaded after the kill")
    assert resumed.train(4) == ref_losses
    assert_tensors_equal(resumed.tensors(), ref_final, "state after the resumed steps")
    resumed.mgr.save(10)  # the next writer: finishes the deletion the kill interrupted
    resumed.mgr.close()
    assert CheckpointLayout(root).transient_dirs() == []
    assert CheckpointLayout(root).complete_steps() == [10]


# ---------------------------------------------------------------- async saves, big tensors


def test_async_saves_with_background_copy_and_deletion_resume_exactly(tmp_path, monkeypatch):
    """Async saves whose tensors are large enough for the stager's background copy, with
    keep_last=1 so every save also dooms one: the resumed run matches an uninterrupted one."""
    copied: list[int] = []
    real_copy_all = BackgroundStager._copy_all

    def counting(self, copies, *args, **kwargs):
        copied.append(len(copies))
        return real_copy_all(self, copies, *args, **kwargs)

    monkeypatch.setattr(BackgroundStager, "_copy_all", counting)
    ref = trainer(tmp_path / "ref", big=True, keep_last=None)
    ref_losses = ref.train(12)
    ref_final = ref.tensors()
    ref.mgr.close()

    root = tmp_path / "ckpt"
    tr = trainer(root, big=True, keep_last=1)
    losses = []
    for step in range(1, 9):
        losses += tr.train(1)
        if step % 2 == 0:
            tr.mgr.save(step, blocking=False)
    tr.mgr.close()
    assert copied and all(n > 0 for n in copied), "the background copy path never ran"
    assert losses == ref_losses[:8]
    assert CheckpointLayout(root).complete_steps() == [8]
    assert CheckpointLayout(root).transient_dirs() == []

    resumed = trainer(root, seed=1, big=True, keep_last=1)
    assert resumed.mgr.load() == 8
    assert resumed.train(4) == ref_losses[8:]
    assert_tensors_equal(resumed.tensors(), ref_final, "state after the resume")
    resumed.mgr.close()


def test_readers_and_tools_see_no_deleting_checkpoint(tmp_path, gate):
    """While a deletion is held, the read-only views list only complete checkpoints."""
    from ckptguard.tools.inspect import summarize_root

    root = tmp_path / "ckpt"
    tr = trainer(root, keep_last=1)
    for step in (1, 2):
        tr.train(1)
        tr.mgr.save(step)
    at_2 = tr.tensors()
    assert deleting(root) == [dotted(1)]
    assert [s.step for s in summarize_root(root) if s.complete] == [2]
    assert_loads_exactly(root, 2, at_2)
    gate.open()
    tr.mgr.close()
