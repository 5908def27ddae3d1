"""Reliability in one process: full disk, damaged checkpoints, two writers, untrusted files.

Faults are injected where they happen in real life: ENOSPC raised from inside the write path at
every phase of a save (``ckptguard.testing.faults``), a real kernel write limit (RLIMIT_FSIZE), bytes
flipped / cut / removed on disk, a second manager on the same root (in this process and in
another), and a rank file crafted to run code when unpickled. Each test states the guarantee:
a clear error naming the path, no checkpoint ``load()`` could pick, the previous checkpoint
intact, and the next save succeeding once the cause is gone.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import resource
import signal
import subprocess
import sys
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptguard import (
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointLockedError,
    CheckpointManager,
    CheckpointNotFoundError,
    CommitError,
)
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.format import rank_filename, step_dirname
from ckptguard.testing import faults
from ckptguard.tools.reader import load_checkpoint, values_equal
from tests._helpers import (
    flip_byte,
    launcher_free_env,
    make_loader,
    make_training_objects,
    optimizer_tensors,
    train_on_batches,
)

pytestmark = pytest.mark.timeout(300)


@dataclass
class Trainer:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    mgr: CheckpointManager
    it: Any = None

    def advance(self, n: int = 1) -> None:
        if self.it is None:
            self.it = iter(self.loader)
        train_on_batches(self.model, self.optimizer, self.scheduler, [next(self.it) for _ in range(n)])

    def tensors(self) -> dict[str, torch.Tensor]:
        state = {f"model.{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        state.update({f"optim.{k}": v.clone() for k, v in optimizer_tensors(self.optimizer).items()})
        return state


def build(root: Path, seed: int = 0, **mgr_kwargs: Any) -> Trainer:
    model, optimizer, scheduler = make_training_objects(seed)
    loader = make_loader()
    mgr = CheckpointManager(
        root, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader, **mgr_kwargs
    )
    return Trainer(model, optimizer, scheduler, loader, mgr)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"tensors differ: {bad}"


def assert_checkpoint_unchanged(step_dir: Path, before: dict[str, Any]) -> None:
    after = load_checkpoint(step_dir)
    assert set(after) == set(before)
    bad = [k for k in before if not values_equal(before[k], after[k])]
    assert not bad, f"{step_dir} changed: {bad[:5]}"


def _save(tr: Trainer, step: int, mode: str, **kw: Any) -> Path:
    path = tr.mgr.save(step, blocking=mode == "sync", **kw)
    if mode == "async":
        path = tr.mgr.wait() or path
    return path


# ---------------------------------------------------------------- disk full at every phase

# Phases before the atomic rename: a failure there must leave the previous checkpoint the newest.
BEFORE_RENAME = [
    "partial_created", "rank_file_written", "dcp_write", "dcp_metadata", "dcp_done",
    "done_record_written", "commit_start", "manifest_written",
]
DISK_FULL_CASES = [(p, m) for p in BEFORE_RENAME for m in ("sync", "async")] + [
    ("async_commit_start", "async")
]


@pytest.mark.parametrize("point,mode", DISK_FULL_CASES, ids=[f"{p}-{m}" for p, m in DISK_FULL_CASES])
def test_disk_full_during_save(tmp_path, point, mode):
    root = tmp_path / "ckpt"
    tr = build(root, keep_last=2)
    tr.advance(2)
    _save(tr, 2, mode)
    before = load_checkpoint(root / step_dirname(2))
    tr.advance(2)
    at_4 = tr.tensors()

    with faults.injected(f"{point}:action=raise"), pytest.raises(CommitError) as err:
        _save(tr, 4, mode)
    msg = str(err.value)
    assert "No space left on device" in msg, msg
    assert str(tr.mgr.layout.partial_dir(4)) in msg, f"the message must name the path: {msg}"
    assert "\n" not in msg and "Traceback" not in msg, f"one readable line, not a traceback: {msg}"

    # nothing load() could pick; the previous checkpoint as it was
    assert tr.mgr.steps() == [2]
    assert not (root / step_dirname(4)).exists()
    assert_checkpoint_unchanged(root / step_dirname(2), before)

    # space is back: the same save succeeds and cleans what the failed one left
    _save(tr, 4, mode)
    assert tr.mgr.steps() == [2, 4]
    assert CheckpointLayout(root).transient_dirs() == []
    assert sorted(p.name for p in (root / step_dirname(4)).iterdir() if p.name.startswith(".done")) == []
    tr.mgr.close()

    fresh = build(root, seed=1)
    assert fresh.mgr.load() == 4
    assert_same_tensors(fresh.tensors(), at_4)
    fresh.mgr.close()


def test_disk_full_on_another_step_is_cleaned_by_the_next_save(tmp_path):
    root = tmp_path / "ckpt"
    tr = build(root)
    tr.advance(1)
    tr.mgr.save(1)
    with faults.injected("dcp_write:action=raise"), pytest.raises(CommitError):
        tr.mgr.save(2)
    assert (root / ".step-00000002.partial").exists()
    tr.advance(1)
    tr.mgr.save(3)
    assert tr.mgr.steps() == [1, 3]
    assert CheckpointLayout(root).transient_dirs() == [], "the failed save's .partial must go"
    tr.mgr.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_failure_after_rename_is_reported_but_the_checkpoint_stands(tmp_path, mode):
    """The rename is the commit: a failure after it (root fsync) must not be reported as a lost
    save, and must not hide the checkpoint."""
    root = tmp_path / "ckpt"
    tr = build(root)
    tr.advance(1)
    with faults.injected("renamed:action=raise"), pytest.raises(CommitError, match="renamed into place"):
        _save(tr, 1, mode)
    assert tr.mgr.steps() == [1]
    tr.mgr.close()
    assert build(root, seed=1).mgr.load() == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("point", ["prune_start", "prune_deleting"])
def test_retention_failure_does_not_fail_a_committed_save(tmp_path, caplog, point, mode):
    """Fail-on-bug: pruning ran inside the commit and its error failed save() although the new
    checkpoint was committed; a caller retrying or giving up would be misled."""
    root = tmp_path / "ckpt"
    tr = build(root, keep_last=2)
    for step in (1, 2):
        tr.advance(1)
        _save(tr, step, mode)
    tr.advance(1)
    with caplog.at_level(logging.WARNING, logger="ckptguard"), faults.injected(f"{point}:action=raise"):
        path = _save(tr, 3, mode)
    assert path == root / step_dirname(3)
    assert "retention: could not delete old checkpoints" in caplog.text
    assert 3 in tr.mgr.steps() and 2 in tr.mgr.steps()
    tr.advance(1)
    _save(tr, 4, mode)  # retention catches up and the leftover .deleting goes
    assert tr.mgr.steps() == [3, 4]
    tr.mgr.close()  # waits for the background removal
    assert CheckpointLayout(root).transient_dirs() == []


def test_overwrite_failure_puts_the_old_checkpoint_back(tmp_path):
    root = tmp_path / "ckpt"
    tr = build(root)
    tr.advance(1)
    tr.mgr.save(1)
    before = load_checkpoint(root / step_dirname(1))
    tr.advance(1)
    with faults.injected("overwrite_replaced:action=raise"), pytest.raises(CommitError):
        tr.mgr.save(1, overwrite=True)
    assert tr.mgr.steps() == [1], "the old step-1 must be back in place at once, not at next start"
    assert_checkpoint_unchanged(root / step_dirname(1), before)
    tr.mgr.save(1, overwrite=True)
    assert CheckpointLayout(root).transient_dirs() == []
    tr.mgr.close()


def test_real_write_limit_mid_shard(tmp_path):
    """Not an injected error: the kernel refuses to grow a file beyond RLIMIT_FSIZE (EFBIG),
    in the middle of DCP's shard write, as a full disk refuses with ENOSPC."""
    root = tmp_path / "ckpt"
    tr = build(root)
    tr.advance(1)
    tr.mgr.save(1)
    before = load_checkpoint(root / step_dirname(1))
    shard = max((root / step_dirname(1)).glob("*.distcp"), key=lambda p: p.stat().st_size)
    rank_file = (root / step_dirname(1) / rank_filename(0)).stat().st_size
    limit = (shard.stat().st_size + rank_file) // 2
    assert rank_file < limit < shard.stat().st_size, "the limit must fall inside the shard"
    tr.advance(1)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        # torch's zip writer reports the short write as "unexpected pos ..."; the path, the
        # outcome and the free space are what ckptguard adds.
        with pytest.raises(CommitError, match="not committed") as err:
            tr.mgr.save(2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert str(tr.mgr.layout.partial_dir(2)) in str(err.value) and "free on" in str(err.value)
    assert tr.mgr.steps() == [1]
    assert_checkpoint_unchanged(root / step_dirname(1), before)
    tr.mgr.save(2)
    assert tr.mgr.steps() == [1, 2]
    tr.mgr.close()


# ---------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble_json(path: Path) -> None:
    path.write_text(path.read_text()[:-20] + "#garbage")


def _drop_files_entry(path: Path) -> None:
    manifest = json.loads(path.read_text())
    del manifest["files"]
    path.write_text(json.dumps(manifest))


def _shard(step_dir: Path) -> Path:
    return sorted(step_dir.glob("*.distcp"))[0]


# (what, damage, file it hits, error class, words the message must contain)
DAMAGE = [
    ("flipped byte in shard", lambda d: flip_byte(_shard(d)), "__0_0.distcp", CheckpointCorruptError, "corrupted"),
    ("truncated shard", lambda d: _truncate(_shard(d)), "__0_0.distcp", CheckpointCorruptError, "truncated"),
    ("missing shard", lambda d: _shard(d).unlink(), "__0_0.distcp", CheckpointCorruptError, "missing"),
    ("missing .metadata", lambda d: (d / ".metadata").unlink(), ".metadata", CheckpointCorruptError, "missing"),
    ("garbled .metadata", lambda d: flip_byte(d / ".metadata"), ".metadata", CheckpointCorruptError, "corrupted"),
    ("garbled rank file", lambda d: flip_byte(d / rank_filename(0)), rank_filename(0), CheckpointCorruptError, "corrupted"),
    ("truncated rank file", lambda d: _truncate(d / rank_filename(0)), rank_filename(0), CheckpointCorruptError, "truncated"),
    ("garbled manifest", lambda d: _garble_json(d / "ckptguard.json"), "ckptguard.json", CheckpointFormatError, "cannot read"),
    ("manifest without files", lambda d: _drop_files_entry(d / "ckptguard.json"), "ckptguard.json", CheckpointFormatError, "'files' is missing"),
]


@pytest.fixture
def two_checkpoints(tmp_path):
    """A root with steps 1 and 2, and the live tensors at each."""
    root = tmp_path / "ckpt"
    tr = build(root, keep_last=None)
    states = {}
    for step in (1, 2):
        tr.advance(1)
        tr.mgr.save(step)
        states[step] = tr.tensors()
    tr.mgr.close()
    return root, states


@pytest.mark.parametrize("what,damage,name,error,words", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damage_is_named_at_load_and_fallback_is_explicit(two_checkpoints, caplog, what, damage, name, error, words):
    root, states = two_checkpoints
    step_dir = root / step_dirname(2)
    damage(step_dir)
    damaged_bytes = {p.name: p.read_bytes() for p in step_dir.iterdir()}

    tr = build(root, seed=1)
    untouched = tr.tensors()
    with pytest.raises(error) as err:
        tr.mgr.load()
    msg = str(err.value)
    assert name in msg and words in msg and str(step_dir) in msg, msg
    # refused before anything was loaded, and nothing on disk was changed or removed
    assert_same_tensors(tr.tensors(), untouched)
    assert {p.name: p.read_bytes() for p in step_dir.iterdir()} == damaged_bytes

    # asked for it, load() falls back, loudly, to the previous complete checkpoint
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        assert tr.mgr.load(fallback=True) == 1
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "fallback" in r.getMessage()]
    assert len(warning) == 1 and str(step_dir) in warning[0] and name in warning[0], warning
    assert_same_tensors(tr.tensors(), states[1])
    # the damaged one is kept for inspection, out of the way of a new save of step 2
    kept = root / f"{step_dirname(2)}.damaged"
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == damaged_bytes
    assert tr.mgr.steps() == [1]
    tr.advance(1)
    tr.mgr.save(2)
    tr.mgr.close()


def test_fallback_skips_several_damaged_and_raises_when_none_is_left(two_checkpoints, caplog):
    root, states = two_checkpoints
    flip_byte(_shard(root / step_dirname(2)))
    flip_byte(root / step_dirname(1) / rank_filename(0))
    tr = build(root, seed=1)
    with pytest.raises(CheckpointCorruptError) as err:
        tr.mgr.load(fallback=True)
    msg = str(err.value)
    assert "no complete checkpoint" in msg and step_dirname(1) in msg and step_dirname(2) in msg, msg
    with pytest.raises(ValueError, match="fallback applies to the latest"):
        tr.mgr.load(1, fallback=True)
    tr.mgr.close()


def test_checkpoint_dir_without_manifest_is_not_a_checkpoint(two_checkpoints, caplog):
    """A ``step-N`` without ``ckptguard.json`` cannot come from a save (the manifest is inside
    the directory before its atomic rename), so it is damage: it is never loaded, and skipping
    it is logged, not silent."""
    root, states = two_checkpoints
    (root / step_dirname(2) / "ckptguard.json").unlink()
    tr = build(root, seed=1)
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        assert tr.mgr.load() == 1
    assert any(step_dirname(2) in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert_same_tensors(tr.tensors(), states[1])
    with pytest.raises(CheckpointNotFoundError, match="has no ckptguard.json"):
        tr.mgr.load(2)
    tr.mgr.close()


@pytest.mark.parametrize(
    "what,damage",
    [
        ("missing shard", lambda d: _shard(d).unlink()),
        ("truncated .metadata", lambda d: _truncate(d / ".metadata")),
    ],
)
def test_damage_without_verification_is_still_a_corrupt_checkpoint(two_checkpoints, what, damage):
    """verify_on_load=False skips the checksums; files that cannot be read must still be
    reported as damage (so fallback applies), not as a model mismatch."""
    root, states = two_checkpoints
    damage(root / step_dirname(2))
    tr = build(root, seed=1, verify_on_load=False)
    with pytest.raises(CheckpointCorruptError, match=step_dirname(2)):
        tr.mgr.load()
    assert tr.mgr.load(fallback=True) == 1
    assert_same_tensors(tr.tensors(), states[1])
    tr.mgr.close()


# ---------------------------------------------------------------- two writers on one root


def test_second_manager_on_the_same_root_is_refused(tmp_path):
    root = tmp_path / "ckpt"
    first = build(root)
    first.advance(1)
    first.mgr.save(1)
    refused = build(root, seed=1)  # constructing (and loading) needs no lock; saving does
    with pytest.raises(CheckpointLockedError) as err:
        refused.mgr.save(5)
    assert str(root / ".ckptguard.lock") in str(err.value) and f"pid={os.getpid()}" in str(err.value)
    refused.mgr.close()
    first.advance(1)
    first.mgr.save(2)  # the refused manager changed nothing
    assert first.mgr.steps() == [1, 2]
    assert CheckpointLayout(root).transient_dirs() == []
    first.mgr.close()
    second = build(root, seed=1)
    assert second.mgr.load() == 2
    second.mgr.close()


def test_second_job_on_the_same_root_is_refused_and_a_dead_job_frees_it(tmp_path, caplog):
    root = tmp_path / "ckpt"
    holder = textwrap.dedent(f"""
        import sys, torch
        from ckptguard import CheckpointManager
        mgr = CheckpointManager({str(root)!r}, model=torch.nn.Linear(2, 2))
        mgr.save(7)
        print("ready", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env=launcher_free_env(), text=True, start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        refused = CheckpointManager(root, model=torch.nn.Linear(2, 2))
        with pytest.raises(CheckpointLockedError, match=f"pid={proc.pid}"):
            refused.save(8)
        refused.close()
        assert CheckpointLayout(root).complete_steps() == [7]
    finally:
        proc.kill()  # a preempted job: no close(), no cleanup
        proc.wait(timeout=60)
    mgr = CheckpointManager(root, model=torch.nn.Linear(2, 2))  # the kernel dropped its lock
    assert mgr.load() == 7
    with caplog.at_level(logging.WARNING, logger="ckptguard.core.lock"):
        mgr.save(8)  # its holder line is left: taken over, and said so
    assert any(f"pid={proc.pid}" in r.getMessage() and "taking over" in r.getMessage() for r in caplog.records)
    mgr.close()


# ---------------------------------------------------------------- untrusted files


class _Payload:
    """Unpickling this creates ``path``: stands for any code an attacker would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant_payload(step_dir: Path, name: str, marker: Path) -> None:
    """Replace a rank file with one carrying the payload, and fix the manifest's checksum as a
    deliberate attacker would (the checksum stops accidents, not attacks)."""
    path = step_dir / name
    payload = torch.load(path, weights_only=True)
    payload["states"]["evil"] = _Payload(marker)
    torch.save(payload, path)
    manifest_path = step_dir / "ckptguard.json"
    manifest = json.loads(manifest_path.read_text())
    data = path.read_bytes()
    manifest["files"][name] = {"nbytes": len(data), "crc32": f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"}
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("verify", [True, False])
def test_rank_file_cannot_run_code(two_checkpoints, tmp_path, verify):
    root, _ = two_checkpoints
    marker = tmp_path / "pwned"
    _plant_payload(root / step_dirname(2), rank_filename(0), marker)

    # fail-on-bug: the naive way to read such a file runs the attacker's code
    naive_marker = tmp_path / "naive-pwned"
    _plant_payload(root / step_dirname(1), rank_filename(0), naive_marker)
    torch.load(root / step_dirname(1) / rank_filename(0), weights_only=False)
    assert naive_marker.exists()
    naive_marker.unlink()

    tr = build(root, seed=1, verify_on_load=verify)
    with pytest.raises(CheckpointCorruptError) as err:
        tr.mgr.load()
    assert not marker.exists(), "loading a rank file executed code from it"
    msg = str(err.value)
    assert rank_filename(0) in msg and "Nothing in it was executed" in msg, msg
    tr.mgr.close()


def _plant_metadata_payload(step_dir: Path, marker: Path, fix_checksum: bool) -> None:
    path = step_dir / ".metadata"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    if fix_checksum:
        manifest_path = step_dir / "ckptguard.json"
        manifest = json.loads(manifest_path.read_text())
        data = path.read_bytes()
        manifest["files"][".metadata"] = {"nbytes": len(data), "crc32": f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"}
        manifest_path.write_text(json.dumps(manifest))


def test_swapped_dcp_metadata_is_refused_before_it_is_unpickled(two_checkpoints, tmp_path):
    """DCP reads ``.metadata`` with plain pickle. ckptguard checks it against the manifest
    first, so a replaced ``.metadata`` whose checksum was not forged too is never unpickled."""
    root, _ = two_checkpoints
    marker = tmp_path / "pwned"
    _plant_metadata_payload(root / step_dirname(2), marker, fix_checksum=False)
    tr = build(root, seed=1)
    with pytest.raises(CheckpointCorruptError, match=r"\.metadata: (truncated|size|corrupted)"):
        tr.mgr.load()
    assert not marker.exists()
    tr.mgr.close()


def test_forged_manifest_and_dcp_metadata_run_no_code(two_checkpoints, tmp_path):
    """Whoever can rewrite both ``.metadata`` and the manifest (so every checksum passes) still
    cannot run code in the loading process: ``.metadata`` goes through ckptguard's restricted
    unpickler (``ckptguard.core.safe_pickle``), which names the file and the forbidden type."""
    root, _ = two_checkpoints
    marker = tmp_path / "pwned"
    _plant_metadata_payload(root / step_dirname(2), marker, fix_checksum=True)
    tr = build(root, seed=1)
    with pytest.raises(CheckpointFormatError, match=r"\.metadata"):
        tr.mgr.load()
    assert not marker.exists()
    tr.mgr.close()
