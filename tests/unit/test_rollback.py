"""Rolling back after a loss spike: ``load(step=S)`` with newer checkpoints starts a new branch.

The user's story (issue 10, point 5): a run saves every 100 steps, a loss spike shows at step 600,
the user loads step 400, lowers the LR, trains and saves 500 and 600 again. The next plain
``load()`` (after a preemption, in a new process) must resume the *new* branch's 600, never the
abandoned one; the abandoned checkpoints are set aside under ``ROOT/abandoned/branch-NNNN/``
(never loaded, pruned or deleted), the run trace treats the re-run steps as a new branch rather
than a divergence, and ``ckptguard inspect`` lists what was set aside.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ckptguard import CheckpointManager
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.format import step_dirname
from ckptguard.demo import TinyLM, TokenWindows, build_optimizer, make_dataset, warmup_cosine
from ckptguard.errors import CheckpointExistsError, CheckpointNotFoundError
from ckptguard.guard.audit import audit
from ckptguard.testing import faults
from ckptguard.tools.inspect import inspect_path
from ckptguard.tools.reader import load_checkpoint, values_equal
from tests._helpers import assert_tensors_equal, launcher_free_env, optimizer_tensors

TOTAL_STEPS = 600
SAVE_EVERY = 100
ROLLBACK_TO = 400
CONTINUE_TO = 620  # the new branch trains past its last save, then is "preempted"


# ---------------------------------------------------------------------- the user's trainer


@dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    mgr: CheckpointManager


def build(root: Path, data: Path, **mgr_kwargs: Any) -> Run:
    """What the user's script does before its loop: seed, data, model, optimizer, manager."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loader = StatefulDataLoader(TokenWindows(data), batch_size=8, shuffle=True, drop_last=True)
    model = TinyLM()
    optimizer = build_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(TOTAL_STEPS))
    mgr = CheckpointManager(
        root, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader, **mgr_kwargs
    )
    return Run(model, optimizer, scheduler, loader, mgr)


def train(
    run: Run, step: int, stop: int, *, save_every: int = SAVE_EVERY, snapshot_at: int | None = None
) -> tuple[dict[int, float], list, dict]:
    """The user's loop from ``step`` to ``stop``: a save every ``save_every`` steps and
    ``mgr.record`` after each step. Returns the losses, the divergences ``record`` reported and
    the state right after the save of ``snapshot_at``."""
    losses: dict[int, float] = {}
    divergences = []
    snapshot: dict[str, Any] = {}
    run.model.train()
    while step < stop:
        for x, y in run.loader:
            step += 1
            loss = F.cross_entropy(run.model(x), y)
            loss.backward()
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
            losses[step] = loss.item()
            div = run.mgr.record(step, loss=loss, batch=(x, y))
            if div is not None:
                divergences.append(div)
            if step % save_every == 0:
                run.mgr.save(step)
            if step == snapshot_at:
                snapshot = state_of(run)
            if step >= stop:
                break
    return losses, divergences, snapshot


def halve_lr(run: Run) -> None:
    """How a user lowers the LR of a LambdaLR run after a spike."""
    run.scheduler.base_lrs = [lr * 0.5 for lr in run.scheduler.base_lrs]
    for group in run.optimizer.param_groups:
        group["lr"] *= 0.5


def state_of(run: Run) -> dict[str, Any]:
    return {
        "model": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
        "optimizer": {k: v.clone() for k, v in optimizer_tensors(run.optimizer).items()},
        "lrs": [g["lr"] for g in run.optimizer.param_groups],
        "base_lrs": list(run.scheduler.base_lrs),
    }


def assert_state_equal(run: Run, expected: dict[str, Any]) -> None:
    got = state_of(run)
    assert_tensors_equal(got["model"], expected["model"], "model")
    assert_tensors_equal(got["optimizer"], expected["optimizer"], "optimizer")
    assert got["lrs"] == expected["lrs"]
    assert got["base_lrs"] == expected["base_lrs"]


# ---------------------------------------------------------------------- the story, once


@dataclass
class Story:
    root: Path
    abandoned_600: dict[str, Any]  # the spiking run's state right after it saved 600
    branch_600: dict[str, Any]  # the new branch's state right after it saved 600
    rollback_divergences: list
    branch_losses: dict[int, float]
    resumed_step: int
    resumed_state_ok: bool
    resumed_losses: dict[int, float]
    steps_after: list[int]
    log: str


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Story:
    work = tmp_path_factory.mktemp("rollback")
    data = make_dataset(work / "tokens.npy")
    root = work / "ckpt"
    logger = logging.getLogger("ckptguard")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(f"{r.levelname} {r.getMessage()}")  # type: ignore[method-assign]
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        run = build(root, data)
        assert run.mgr.load() == 0
        _, _, abandoned_600 = train(run, 0, TOTAL_STEPS, snapshot_at=TOTAL_STEPS)
        # the loss spiked around 600: go back to 400 and train on with half the LR
        assert run.mgr.load(step=ROLLBACK_TO) == ROLLBACK_TO
        halve_lr(run)
        branch_losses, divergences, branch_600 = train(run, ROLLBACK_TO, CONTINUE_TO, snapshot_at=TOTAL_STEPS)
        run.mgr.close()  # preempted after step 620: the next start resumes from the last save

        fresh = build(root, data)
        resumed_step = fresh.mgr.load()
        ok = True
        try:
            assert_state_equal(fresh, branch_600)
        except AssertionError:
            ok = False
        resumed_losses, _, _ = train(fresh, resumed_step, CONTINUE_TO)
        steps_after = fresh.mgr.steps()
        fresh.mgr.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return Story(
        root, abandoned_600, branch_600, divergences, branch_losses, resumed_step, ok,
        resumed_losses, steps_after, "\n".join(records),
    )


def test_plain_load_after_a_rollback_resumes_the_new_branch(story):
    assert story.resumed_step == TOTAL_STEPS
    assert not torch.equal(story.abandoned_600["model"]["head.weight"], story.branch_600["model"]["head.weight"])
    assert story.resumed_state_ok, "load() restored the abandoned run's 600, not the new branch's"
    expected = {s: v for s, v in story.branch_losses.items() if s > TOTAL_STEPS}
    assert story.resumed_losses == expected, "the resumed run's losses differ from the new branch's"
    assert story.steps_after == [400, 500, 600]


def test_abandoned_checkpoints_are_set_aside_intact_with_one_log_line(story):
    branch = story.root / "abandoned" / "branch-0001"
    assert sorted(p.name for p in branch.iterdir() if p.is_dir()) == [step_dirname(500), step_dirname(600)]
    record = json.loads((branch / "branch.json").read_text())
    assert record["rolled_back_to"] == ROLLBACK_TO and record["steps"] == [500, 600]
    # what was set aside is the spiking run's checkpoint, value for value
    saved = load_checkpoint(branch / step_dirname(600))
    for name, tensor in story.abandoned_600["model"].items():
        assert values_equal(saved[f"model.{name}"], tensor), name
    lines = [line for line in story.log.splitlines() if "set aside" in line]
    assert len(lines) == 1, story.log
    assert "abandoned/branch-0001" in lines[0] and "500, 600" in lines[0] and "step 400" in lines[0]
    assert CheckpointLayout(story.root).transient_dirs() == []
    assert not (story.root / ".set-aside.json").exists()


def test_rollback_is_a_new_branch_in_the_run_trace(story):
    assert story.rollback_divergences == [], [d.format() for d in story.rollback_divergences]
    result = audit(story.root)
    assert result.ok, result.format()
    rollback, resume = result.resumes
    assert rollback.resumed_from == ROLLBACK_TO and rollback.divergence is None
    assert "new branch" in (rollback.skipped or ""), rollback.format()
    # the later resume is compared with the branch that wrote its checkpoint: 601..620 identical
    assert resume.resumed_from == TOTAL_STEPS and resume.divergence is None
    assert resume.compared_steps == CONTINUE_TO - TOTAL_STEPS


def test_inspect_lists_the_set_aside_branch(story):
    info = inspect_path(story.root)
    assert [s.step for s in info.steps if s.complete] == [400, 500, 600]
    (branch,) = info.branches
    assert branch.name == "branch-0001" and branch.rolled_back_to == ROLLBACK_TO and branch.steps == [500, 600]
    text = info.format()
    assert "abandoned/branch-0001" in text and "rolled back to step 400" in text
    assert info.to_dict()["branches"][0]["steps"] == [500, 600]


# ---------------------------------------------------------------------- smaller cases


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "tokens.npy")


def abandoned_steps(root: Path) -> dict[str, list[int]]:
    return {b.name: b.steps for b in CheckpointLayout(root).abandoned_branches()}


def test_retention_counts_only_the_live_branch_and_never_touches_the_abandoned(tmp_path, data):
    root = tmp_path / "ckpt"
    run = build(root, data, keep_last=2)
    train(run, 0, 6, save_every=2)
    assert run.mgr.steps() == [4, 6]
    assert run.mgr.load(step=4) == 4
    halve_lr(run)
    train(run, 4, 10, save_every=2)
    # 6 (new) set the old 6 aside; 8 and 10 pruned 4 and the new 6, never the abandoned one
    assert run.mgr.steps() == [8, 10]
    assert abandoned_steps(root) == {"branch-0001": [6]}
    assert run.mgr.latest_step() == 10
    run.mgr.close()


def test_same_branch_still_refuses_a_second_save_of_a_step(tmp_path, data):
    root = tmp_path / "ckpt"
    run = build(root, data, keep_last=None)
    train(run, 0, 6, save_every=2)
    run.mgr.load(step=2)
    train(run, 2, 4, save_every=2)  # the new branch's 4 replaces nothing: the old one is aside
    with pytest.raises(CheckpointExistsError, match="step-00000004 already holds"):
        run.mgr.save(4)
    with pytest.raises(CheckpointNotFoundError, match="abandoned/branch-0001/step-00000006"):
        run.mgr.load(step=6)
    run.mgr.close()


def test_a_rollback_without_a_save_is_forgotten(tmp_path, data):
    """``load(step=S)`` only to look (an evaluation), then back to the latest: nothing moves."""
    root = tmp_path / "ckpt"
    run = build(root, data, keep_last=None)
    train(run, 0, 6, save_every=2)
    run.mgr.load(step=2)
    assert run.mgr.load() == 6
    train(run, 6, 8, save_every=2)
    assert run.mgr.steps() == [2, 4, 6, 8]
    assert abandoned_steps(root) == {}
    run.mgr.close()


class SimulatedKill(BaseException):
    """Stands for SIGKILL inside the library: nothing after it runs, no handler catches it."""


def test_crash_in_the_middle_of_the_set_aside_never_resumes_the_abandoned_branch(tmp_path, data, monkeypatch):
    root = tmp_path / "ckpt"
    run = build(root, data, keep_last=None)
    train(run, 0, 6, save_every=2)
    run.mgr.load(step=2)
    expected = state_of(run)
    halve_lr(run)
    real_rename = os.rename
    moved: list[str] = []

    def rename(src, dst):
        if "abandoned" in str(dst):
            if moved:  # the second checkpoint of the abandoned branch: die before moving it
                raise SimulatedKill
            moved.append(str(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(SimulatedKill):
        train(run, 2, 4, save_every=2)
    monkeypatch.setattr(os, "rename", real_rename)
    run.mgr._lock.release()  # the kernel drops a dead process's flock

    # step 6 is still in the root, step 4 is not: "the highest step" would be the abandoned 6
    assert (root / step_dirname(6)).is_dir() and not (root / step_dirname(4)).exists()
    assert CheckpointLayout(root).complete_steps() == [2], "the set-aside in progress must hide 6"
    fresh = build(root, data, keep_last=None)
    assert fresh.mgr.load() == 2
    assert_state_equal(fresh, expected)
    train(fresh, 2, 4, save_every=2)  # the first save (the writer) finishes the set-aside
    assert fresh.mgr.steps() == [2, 4]
    assert abandoned_steps(root) == {"branch-0001": [4, 6]}
    assert not (root / ".set-aside.json").exists()
    fresh.mgr.close()


# A user's script killed by the fault hook at a chosen instant (a real SIGKILL).
CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from ckptguard.testing import faults
    from tests.unit.test_rollback import build, halve_lr, state_of, train
    faults.install()

    root, data = Path(sys.argv[1]), Path(sys.argv[2])
    run = build(root, data, keep_last=None)
    train(run, 0, 6, save_every=2)
    run.mgr.load(step=2)
    torch.save(state_of(run), root.parent / "expected.pt")
    halve_lr(run)
    train(run, 2, 6, save_every=2)
    sys.exit("the fault never fired")
""")


def run_killed(tmp_path: Path, data: Path, fault: str) -> Path:
    root = tmp_path / "ckpt"
    env = {**launcher_free_env(), faults.ENV_VAR: fault}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(data)],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9 and "ckptguard-fault: SIGKILL" in proc.stderr, proc.stderr[-3000:]
    return root


def test_kill_between_set_aside_and_commit_resumes_the_loaded_step(tmp_path, data):
    # commit_start of the save of 4 in the new branch: the 4th commit of the process
    root = run_killed(tmp_path, data, "commit_start:action=kill:hit=4")
    assert CheckpointLayout(root).complete_steps() == [2]
    assert abandoned_steps(root) == {"branch-0001": [4, 6]}
    expected = torch.load(tmp_path / "expected.pt")
    fresh = build(root, data, keep_last=None)
    assert fresh.mgr.load() == 2
    assert_state_equal(fresh, expected)
    train(fresh, 2, 4, save_every=2)  # the restarted run saves 4 again: nothing collides
    assert fresh.mgr.steps() == [2, 4]
    fresh.mgr.close()


@pytest.mark.parametrize("point, survivor", [
    ("overwrite_replaced", "old"),  # the new checkpoint is complete, not yet in place
    ("renamed", "new"),  # swapped in: the old one waits under the .partial name
])
def test_overwrite_killed_mid_commit_shows_old_or_new_complete_to_a_reader(
    tmp_path, data, monkeypatch, point, survivor
):
    """``save(step, overwrite=True)`` killed at either side of the swap: a job that only loads
    (and so never runs the writer's recover) still finds a complete checkpoint of that step."""
    root = tmp_path / "ckpt"
    run = build(root, data, keep_last=None)
    train(run, 0, 2, save_every=2)
    old = state_of(run)
    halve_lr(run)
    train(run, 2, 3, save_every=100)
    new = state_of(run)

    def fault(name: str) -> None:
        if name == point:
            raise SimulatedKill

    with faults.hooked(fault), pytest.raises(SimulatedKill):
        run.mgr.save(2, overwrite=True)
    monkeypatch.undo()
    run.mgr._lock.release()  # the kernel drops a dead process's flock

    reader = build(root, data, keep_last=None)
    assert reader.mgr.load() == 2
    assert_state_equal(reader, old if survivor == "old" else new)
    reader.mgr.close()
    writer = build(root, data, keep_last=None)
    writer.mgr.load()
    writer.mgr.save(3)  # the next writer removes the leftover
    assert CheckpointLayout(root).transient_dirs() == []
    writer.mgr.close()
