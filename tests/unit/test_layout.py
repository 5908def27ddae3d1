"""On-disk layout and the commit protocol: what counts as complete, retention, crash leftovers."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckptguard.core.storage as storage_mod
from ckptguard import CheckpointManager, CommitError
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.format import MANIFEST_NAME, rank_filename, step_dirname
from ckptguard.core.storage import write_json_durably
from tests._helpers import (
    assert_tensors_equal,
    clone_tensors,
    make_loader,
    make_training_objects,
    train_on_batches,
)

pytestmark = pytest.mark.timeout(120)


def _manager(root, seed: int = 0, **kwargs):
    model, optimizer, scheduler = make_training_objects(seed)
    mgr = CheckpointManager(root, model=model, optimizer=optimizer, lr_scheduler=scheduler, **kwargs)
    return mgr, model, optimizer, scheduler


def _train_one(model, optimizer, scheduler) -> None:
    train_on_batches(model, optimizer, scheduler, [next(iter(make_loader()))])


def _fake_complete(root, step: int) -> None:
    d = root / step_dirname(step)
    d.mkdir(parents=True)
    (d / MANIFEST_NAME).write_text("{}")


# ---------------------------------------------------------------- names and listing


def test_step_names_sort_by_step():
    assert step_dirname(500) == "step-00000500"
    assert rank_filename(3) == "rank-00003.pt"
    names = [step_dirname(s) for s in (9, 10, 100)]
    assert names == sorted(names)
    with pytest.raises(ValueError, match="step"):
        step_dirname(-1)


def test_only_step_dirs_with_a_manifest_are_complete(tmp_path):
    layout = CheckpointLayout(tmp_path)
    assert layout.complete_steps() == []
    for step in (30, 4, 100):
        _fake_complete(tmp_path, step)
    (tmp_path / step_dirname(7)).mkdir()  # data but no manifest: not committed
    (tmp_path / ".step-00000200.partial").mkdir()
    (tmp_path / ".step-00000200.partial" / MANIFEST_NAME).write_text("{}")
    (tmp_path / ".step-00000001.deleting").mkdir()
    (tmp_path / "step-00000300").write_text("a file, not a directory")
    (tmp_path / "notes").mkdir()
    assert layout.complete_steps() == [4, 30, 100]
    assert CheckpointLayout(tmp_path / "missing").complete_steps() == []


def test_recover_removes_leftovers_and_puts_back_an_interrupted_overwrite(tmp_path):
    layout = CheckpointLayout(tmp_path)
    _fake_complete(tmp_path, 1)
    # overwrite of step 2 killed between its renames: only the old one, as .replaced, is left
    replaced = tmp_path / ".step-00000002.replaced"
    replaced.mkdir()
    (replaced / MANIFEST_NAME).write_text('{"old": true}')
    # overwrite of step 3 killed after the new one was in place: the old copy is garbage
    _fake_complete(tmp_path, 3)
    (tmp_path / ".step-00000003.replaced").mkdir()
    (tmp_path / ".step-00000004.partial").mkdir()
    (tmp_path / ".step-00000004.partial" / "junk").write_bytes(b"x" * 10)
    (tmp_path / ".step-00000005.deleting").mkdir()

    layout.recover()

    assert layout.complete_steps() == [1, 2, 3]
    assert json.loads((tmp_path / step_dirname(2) / MANIFEST_NAME).read_text()) == {"old": True}
    assert layout.transient_dirs() == []


def test_delete_and_prune_never_touch_the_protected_step(tmp_path):
    from ckptguard.core.policy import RetentionPolicy

    layout = CheckpointLayout(tmp_path)
    for step in (1, 2, 3, 4):
        _fake_complete(tmp_path, step)
    steps = layout.complete_steps()
    assert RetentionPolicy(keep_last=None).decide(steps, protect=[4]).doomed == []
    doomed = RetentionPolicy(keep_last=2).decide(steps, protect=[1]).doomed
    assert doomed == [2]  # 1 is protected, so the next oldest goes
    for path in layout.doom(doomed):
        layout.remove_doomed(path)
    assert layout.complete_steps() == [1, 3, 4]
    layout.delete(3)
    assert layout.complete_steps() == [1, 4]
    assert layout.transient_dirs() == []


# ---------------------------------------------------------------- retention


def test_keep_last_keeps_the_newest(tmp_path):
    mgr, model, optimizer, scheduler = _manager(tmp_path, keep_last=2)
    for step in range(1, 6):
        _train_one(model, optimizer, scheduler)
        mgr.save(step)
    assert mgr.steps() == [4, 5]
    mgr.close()  # waits for the background removal of the older ones
    assert sorted(p.name for p in tmp_path.iterdir() if "step" in p.name) == [
        "step-00000004", "step-00000005"
    ]


def test_keep_last_none_keeps_all(tmp_path):
    mgr, *_ = _manager(tmp_path, keep_last=None)
    for step in range(1, 6):
        mgr.save(step)
    assert mgr.steps() == [1, 2, 3, 4, 5]
    mgr.close()


def test_retention_runs_only_after_the_new_checkpoint_is_complete(tmp_path, monkeypatch):
    from ckptguard.core.policy import RetentionPolicy

    seen = []
    real_decide = RetentionPolicy.decide
    layout = CheckpointLayout(tmp_path)

    def spying_decide(self, steps, metrics=None, *, protect=()):
        steps = list(steps)
        protect = list(protect)
        seen.append((protect, steps))
        for step in protect:
            assert (layout.step_dir(step) / MANIFEST_NAME).is_file(), "pruning before the commit"
        return real_decide(self, steps, metrics, protect=protect)

    monkeypatch.setattr(RetentionPolicy, "decide", spying_decide)
    mgr, *_ = _manager(tmp_path, keep_last=1)
    mgr.save(1)
    mgr.save(2, blocking=False)
    mgr.wait()
    assert seen == [([1], [1]), ([2], [1, 2])]
    assert mgr.steps() == [2]
    mgr.close()


@pytest.mark.parametrize("blocking", [True, False])
def test_failed_save_deletes_nothing_and_is_never_loaded(tmp_path, monkeypatch, blocking):
    """A save that dies after writing its data (before the manifest) leaves a ``.partial`` that
    ``load`` ignores; the older checkpoint survives even with ``keep_last=1``."""
    mgr, model, optimizer, scheduler = _manager(tmp_path, keep_last=1)
    _train_one(model, optimizer, scheduler)
    mgr.save(1)
    good = clone_tensors(dict(model.state_dict()))
    _train_one(model, optimizer, scheduler)

    def torn_manifest(path, obj):
        with open(path, "w") as f:
            f.write(json.dumps(obj)[:20])  # half a manifest, then the "crash"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage_mod, "write_json_durably", torn_manifest)
    if blocking:
        with pytest.raises(CommitError, match="step-00000002.*No space.*untouched"):
            mgr.save(2)
    else:
        mgr.save(2, blocking=False)
        with pytest.raises(CommitError, match="step 2.*No space"):
            mgr.wait()
    monkeypatch.setattr(storage_mod, "write_json_durably", write_json_durably)

    partial = tmp_path / ".step-00000002.partial"
    assert partial.is_dir() and (partial / MANIFEST_NAME).is_file()
    assert mgr.steps() == [1]
    m2, o2, s2 = make_training_objects(seed=3)
    mgr.close()
    with CheckpointManager(tmp_path, model=m2, optimizer=o2, lr_scheduler=s2, keep_last=1) as mgr2:
        assert partial.exists(), "a manager that only loads leaves it (it may be a running writer's)"
        assert mgr2.load() == 1
        assert_tensors_equal(good, dict(m2.state_dict()))
        mgr2.save(2)  # the same step saves fine afterwards
        assert not partial.exists(), "the next writer must clean the leftover"
        assert mgr2.steps() == [2]


def test_dcp_write_failure_in_async_save_is_a_commit_error(tmp_path, monkeypatch):
    """DCP reports write failures as CheckpointException, a BaseException: ``wait`` must still
    turn it into a CommitError (and, with several ranks, report it on every rank)."""
    import torch.distributed.checkpoint as dcp

    def failing_write(self, plan, planner):
        raise OSError(5, "Input/output error")

    mgr, *_ = _manager(tmp_path, keep_last=1)
    mgr.save(1)
    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", failing_write)
    mgr.save(2, blocking=False)
    with pytest.raises(CommitError, match="step 2"):
        mgr.wait()
    assert mgr.steps() == [1]
    mgr.close()


def test_partial_directory_is_never_loaded_and_is_cleaned_by_the_next_writer(tmp_path):
    mgr, model, optimizer, scheduler = _manager(tmp_path)
    _train_one(model, optimizer, scheduler)
    mgr.save(3)
    saved = clone_tensors(dict(model.state_dict()))
    # a save of step 9 killed mid-way: junk data and even a manifest, but never renamed
    partial = tmp_path / ".step-00000009.partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(os.urandom(256))
    (partial / rank_filename(0)).write_bytes(b"not a torch file")
    (partial / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "step": 9}))
    assert mgr.steps() == [3]
    m2, o2, s2 = make_training_objects(seed=4)
    mgr.close()

    with CheckpointManager(tmp_path, model=m2, optimizer=o2, lr_scheduler=s2) as mgr2:
        assert mgr2.load() == 3
        assert partial.exists(), "loading never removes what may be a running writer's save"
        assert_tensors_equal(saved, dict(m2.state_dict()))
        mgr2.save(4)
        assert not partial.exists()


def test_step_dir_without_manifest_is_ignored_by_load(tmp_path):
    mgr, model, optimizer, scheduler = _manager(tmp_path)
    mgr.save(1)
    torn = tmp_path / step_dirname(2)
    torn.mkdir()
    (torn / rank_filename(0)).write_bytes(b"garbage")
    assert mgr.steps() == [1]
    assert mgr.load() == 1
    mgr.close()


def test_committed_checkpoint_holds_no_work_files(tmp_path):
    mgr, *_ = _manager(tmp_path, dataloader=make_loader())
    path = mgr.save(1)
    names = sorted(os.listdir(path))
    assert MANIFEST_NAME in names and rank_filename(0) in names and ".metadata" in names
    assert not [n for n in names if n.startswith(".done-") or n.endswith(".tmp")], names
    mgr.close()
    assert torch.load(path / rank_filename(0), weights_only=True)["step"] == 1
