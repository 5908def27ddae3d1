"""Who may open a root, and when its lock and resources are released (issue 11, point 1).

Written the way people use ckptguard: a notebook cell run twice, ``CheckpointManager(...).save(n)``
as a temporary, an eval process loading beside a trainer that prunes with ``keep_last=1``, the
CLI inspecting a live root, a sweep creating many managers in one process. The guarantees:
loading takes no lock and changes nothing; the first save takes the writer lock; ``close()``,
``with``, garbage collection and exit release it; two live writers are refused by name; a lock
left by a killed writer is taken over with a warning.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch

import ckptguard.core.loading as loading_mod
import ckptguard.core.lock as lock_mod
from ckptguard import CheckpointLockedError, CheckpointManager, CheckpointNotFoundError
from ckptguard.cli import main as cli_main
from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.format import LOCK_NAME
from tests._helpers import (
    assert_model_equal,
    assert_tensors_equal,
    launcher_free_env,
    make_loader,
    make_training_objects,
    optimizer_tensors,
    train_on_batches,
)

pytestmark = pytest.mark.timeout(120)


def trainer(root: Path, seed: int = 0, **kw):
    """What a training script builds: model, optimizer, scheduler, loader and the manager."""
    model, optimizer, scheduler = make_training_objects(seed)
    loader = make_loader()
    mgr = CheckpointManager(
        root, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader, **kw
    )
    return model, optimizer, scheduler, loader, mgr


@pytest.fixture
def fast_root(tmp_path):
    """A root in memory (/dev/shm) where there is one: these tests save many times and are
    about the lock, threads and descriptors, not about durability; renames and deletions
    behave as on disk."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="ckptguard-lifecycle-", dir="/dev/shm")) if os.path.isdir("/dev/shm") else tmp_path
    yield base / "ckpt"
    if base != tmp_path:
        shutil.rmtree(base, ignore_errors=True)


def holder_line(root: Path) -> str:
    return (root / LOCK_NAME).read_text()


# ---------------------------------------------------------------- re-creating a manager


def test_notebook_cell_run_twice_saves_without_close(tmp_path):
    root = tmp_path / "ckpt"
    notebook: dict = {}

    def run_cell(steps: int, save_as: int) -> None:  # the cell; `notebook` is its globals
        nb = notebook
        nb["model"], nb["optimizer"], nb["scheduler"], nb["loader"], nb["mgr"] = trainer(root)
        it = iter(nb["loader"])
        train_on_batches(nb["model"], nb["optimizer"], nb["scheduler"], [next(it) for _ in range(steps)])
        nb["mgr"].save(save_as)

    gc.disable()  # the release must not wait for the cycle collector
    try:
        run_cell(2, save_as=2)
        assert f"pid={os.getpid()}" in holder_line(root)
        run_cell(3, save_as=3)  # re-run: `mgr` is rebound, the old manager never closed
        del notebook["mgr"]
        assert holder_line(root) == "", "dropping the last manager must release the lock at once"
    finally:
        gc.enable()
    # the second run's checkpoint loads bit-exactly into a fresh process state
    model, optimizer, _, _, mgr = trainer(root, seed=1)
    with mgr:
        assert mgr.steps() == [2, 3]
        assert mgr.load() == 3
    assert_model_equal(model, notebook["model"])
    assert_tensors_equal(optimizer_tensors(optimizer), optimizer_tensors(notebook["optimizer"]), "optimizer")


def test_manager_as_a_temporary_and_in_a_with_block(tmp_path):
    root = tmp_path / "ckpt"
    model = torch.nn.Linear(4, 4)
    CheckpointManager(root, model=model).save(1)
    CheckpointManager(root, model=model).save(2, blocking=False)  # committed in the background
    with CheckpointManager(root, model=model, keep_last=None) as mgr:
        mgr.save(3)
        assert f"pid={os.getpid()}" in holder_line(root)
    assert holder_line(root) == ""
    assert CheckpointLayout(root).complete_steps() == [1, 2, 3]


def test_two_live_writers_in_one_process_the_second_is_refused_by_name(tmp_path):
    root = tmp_path / "ckpt"
    model, optimizer, scheduler, loader, first = trainer(root)
    first.save(1)
    *_, second = trainer(root, seed=1)  # constructing is fine: it only may load
    assert second.load() == 1
    with pytest.raises(CheckpointLockedError) as err:
        second.save(2)
    text = str(err.value)
    assert str(root / LOCK_NAME) in text and f"pid={os.getpid()}" in text and f"host={os.uname().nodename}" in text
    assert "close()" in text
    assert f"pid={os.getpid()}" in holder_line(root), "a refused writer must not touch the holder line"
    first.save(2)  # the refused one changed nothing
    first.close()
    second.save(3)
    second.close()
    assert CheckpointLayout(root).complete_steps() == [1, 2, 3]


# ---------------------------------------------------------------- readers beside a writer


def test_reader_beside_a_writer_takes_no_lock_and_leaves_its_partials(tmp_path):
    root = tmp_path / "ckpt"
    model, optimizer, scheduler, loader, writer = trainer(root, keep_last=None)
    it = iter(loader)
    train_on_batches(model, optimizer, scheduler, [next(it) for _ in range(2)])
    writer.save(2)
    at_2 = {k: v.clone() for k, v in model.state_dict().items()}
    # the writer is in the middle of its next save
    in_progress = CheckpointLayout(root).partial_dir(4)
    in_progress.mkdir()
    (in_progress / "rank-00000.pt").write_bytes(b"being written")
    held = holder_line(root)

    eval_model, *_, reader = trainer(root, seed=1)
    assert reader.load() == 2
    assert_tensors_equal(dict(eval_model.state_dict()), at_2, "model")
    reader.close()
    assert in_progress.is_dir() and (in_progress / "rank-00000.pt").read_bytes() == b"being written"
    assert holder_line(root) == held, "a reader must not take, change or release the writer's lock"

    train_on_batches(model, optimizer, scheduler, [next(it) for _ in range(2)])
    writer.save(4)  # never blocked by the reader
    writer.close()
    assert CheckpointLayout(root).complete_steps() == [2, 4]


def test_a_loading_manager_creates_no_lock_file(tmp_path):
    root = tmp_path / "ckpt"
    with CheckpointManager(root, model=torch.nn.Linear(2, 2)) as mgr:
        mgr.save(1)
    (root / LOCK_NAME).unlink()
    with CheckpointManager(root, model=torch.nn.Linear(2, 2)) as mgr:
        assert mgr.load() == 1
    assert not (root / LOCK_NAME).exists()


@pytest.mark.parametrize("deleted_before", ["manifest", "tensors", "rank_file"])
def test_retention_deleting_the_step_being_loaded_is_named(tmp_path, monkeypatch, deleted_before):
    """The writer (keep_last=1) commits step 2 and deletes step 1 while the reader loads step 1."""
    root = tmp_path / "ckpt"
    model, optimizer, scheduler, loader, writer = trainer(root, keep_last=1)
    it = iter(loader)
    train_on_batches(model, optimizer, scheduler, [next(it)])
    writer.save(1)
    eval_model, eval_opt, *_, reader = trainer(root, seed=1)

    name = {"manifest": "read_checked_manifest", "tensors": "DirectFileSystemReader",
            "rank_file": "load_rank_file"}[deleted_before]
    original = getattr(loading_mod, name)
    fired = []

    def writer_saves_meanwhile(*args, **kwargs):
        if not fired:
            fired.append(True)
            train_on_batches(model, optimizer, scheduler, [next(it)])
            writer.save(2)
        return original(*args, **kwargs)

    monkeypatch.setattr(loading_mod, name, writer_saves_meanwhile)
    with pytest.raises(CheckpointNotFoundError) as err:
        reader.load()
    assert fired
    text = str(err.value)
    assert "step-00000001" in text and "deleted while it was being loaded" in text and "load() again" in text
    # retrying, as the message says, loads the writer's newest checkpoint exactly
    assert reader.load() == 2
    assert_model_equal(eval_model, model)
    assert_tensors_equal(optimizer_tensors(eval_opt), optimizer_tensors(optimizer), "optimizer")
    reader.close()
    writer.close()


_EVAL_PROCESS = textwrap.dedent("""
    import sys, zlib, torch
    from ckptguard import CheckpointManager, CheckpointNotFoundError
    from tests._helpers import make_training_objects
    model, optimizer, _ = make_training_objects(seed=1)
    mgr = CheckpointManager(sys.argv[1], model=model, optimizer=optimizer)
    print("ready", flush=True)
    while not sys.stdin.closed:
        try:
            step = mgr.load()
        except CheckpointNotFoundError as e:
            print("deleted", str(e).replace("\\n", " "), flush=True)
            continue
        except Exception as e:
            print("error", type(e).__name__, str(e).replace("\\n", " "), flush=True)
            break
        crc = 0
        for t in model.state_dict().values():
            crc = zlib.crc32(t.numpy().tobytes(), crc)
        print("ok", step, crc, flush=True)
        if step >= int(sys.argv[2]):
            break
""")


def _crc(model: torch.nn.Module) -> int:
    crc = 0
    for t in model.state_dict().values():
        crc = zlib.crc32(t.numpy().tobytes(), crc)
    return crc


def test_eval_process_loads_beside_a_trainer_pruning_to_one_checkpoint(fast_root):
    """A separate eval process loads in a loop while the trainer saves every step with
    keep_last=1: the trainer is never refused, the reader never loads a mix of two steps."""
    root = fast_root
    model, optimizer, scheduler, loader, mgr = trainer(root, keep_last=1)
    mgr.save(0)
    expected = {0: _crc(model)}
    last = 10
    proc = subprocess.Popen(
        [sys.executable, "-c", _EVAL_PROCESS, str(root), str(last)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=launcher_free_env(),
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        batches = iter(loader)
        for step in range(1, last + 1):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            train_on_batches(model, optimizer, scheduler, [(x, y)])
            mgr.save(step)
            expected[step] = _crc(model)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        mgr.close()
    lines = [line.split(" ", 2) for line in out.splitlines()]
    errors = [" ".join(line) for line in lines if line[0] == "error"]
    assert not errors, errors
    loads = [(int(s), int(c)) for kind, s, c in (line for line in lines if line[0] == "ok")]
    assert loads and loads[-1][0] == last
    wrong = [s for s, c in loads if expected.get(s) != c]
    assert not wrong, f"the eval process loaded a mix of checkpoints at steps {wrong}"


# ---------------------------------------------------------------- a lock left behind


def test_lock_left_by_a_killed_writer_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    root = tmp_path / "ckpt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root.mkdir()
    stale = f"pid={dead.pid} host={os.uname().nodename} since=2026-01-01T00:00:00+0000\n"
    (root / LOCK_NAME).write_text(stale)
    with caplog.at_level(logging.WARNING, logger="ckptguard.core.lock"):
        with CheckpointManager(root, model=torch.nn.Linear(2, 2)) as mgr:
            mgr.save(1)
            assert f"pid={os.getpid()}" in holder_line(root)
    assert any(f"pid={dead.pid}" in r.getMessage() and "taking over" in r.getMessage() for r in caplog.records)
    assert holder_line(root) == ""


def test_lock_left_by_a_writer_on_another_host_of_a_network_fs_says_how_to_clear_it(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / LOCK_NAME).write_text("pid=4242 host=node-17 since=2026-01-01T00:00:00+0000\n")
    monkeypatch.setattr(lock_mod, "_is_network_fs", lambda path: True)
    mgr = CheckpointManager(root, model=torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointLockedError) as err:
        mgr.save(1)
    text = str(err.value)
    assert "node-17" in text and "pid=4242" in text and f"delete {root / LOCK_NAME}" in text
    assert "node-17" in holder_line(root), "the refused writer must leave the holder line"
    (root / LOCK_NAME).unlink()  # what the message says to do once that job has ended
    mgr.save(1)
    mgr.close()


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_lock_file_that_is_not_a_plain_file_is_refused(tmp_path, kind):
    root = tmp_path / "ckpt"
    root.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("do not truncate")
    if kind == "symlink":
        os.symlink(victim, root / LOCK_NAME)
    else:
        os.mkfifo(root / LOCK_NAME)
    mgr = CheckpointManager(root, model=torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointLockedError, match="symbolic link" if kind == "symlink" else "not a regular file"):
        mgr.save(1)
    assert victim.read_text() == "do not truncate"
    assert CheckpointLayout(root).complete_steps() == []
    mgr.close()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_lock_file_is_created_with_the_users_umask(tmp_path, umask):
    root = tmp_path / "ckpt"
    old = os.umask(umask)
    try:
        with CheckpointManager(root, model=torch.nn.Linear(2, 2)) as mgr:
            mgr.save(1)
    finally:
        os.umask(old)
    mode = (root / LOCK_NAME).stat().st_mode & 0o777
    assert mode == 0o666 & ~umask
    assert not mode & 0o002, "never world-writable"


# ---------------------------------------------------------------- the CLI on a live root


def test_cli_tools_on_a_live_root_take_no_lock(tmp_path):
    root = tmp_path / "ckpt"
    model, optimizer, scheduler, loader, mgr = trainer(root, keep_last=None)
    it = iter(loader)
    for step in (1, 2):
        train_on_batches(model, optimizer, scheduler, [next(it)])
        mgr.save(step)
    held = holder_line(root)
    in_progress = CheckpointLayout(root).partial_dir(3)
    in_progress.mkdir()
    runs = [
        ["inspect", str(root)],
        ["verify", str(root)],
        ["diff", str(root / "step-00000001"), str(root / "step-00000002")],
        ["export", str(root), str(tmp_path / "weights.pt")],
    ]
    codes = [cli_main(argv) for argv in runs]  # in this process: a lock taken would conflict
    assert codes == [0, 0, 1, 0]  # diff: the two steps differ
    assert holder_line(root) == held and in_progress.is_dir()
    train_on_batches(model, optimizer, scheduler, [next(it)])
    mgr.save(3)
    mgr.close()
    (root / LOCK_NAME).unlink()
    for argv in runs[:3]:
        cli_main(argv)
    assert not (root / LOCK_NAME).exists()


# ---------------------------------------------------------------- many managers in one process


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled_fd_count(target: int, timeout_s: float = 10.0) -> int:
    """Open descriptors once the background work of dropped managers has ended: a dropped
    manager's deleter is told to stop without waiting, and the removal in progress (its
    directory descriptors open) finishes on its own thread. A leak never settles."""
    deadline = time.monotonic() + timeout_s
    while _fds() > target and time.monotonic() < deadline:
        time.sleep(0.05)
    return _fds()


def _settled_thread_count(target: int, timeout_s: float = 10.0) -> int:
    """Thread count once stopped threads have exited (shutdown(wait=False) lets them finish)."""
    deadline = time.monotonic() + timeout_s
    while threading.active_count() > target and time.monotonic() < deadline:
        time.sleep(0.05)
    return threading.active_count()


def test_fifty_managers_closed_and_fifty_dropped_leak_nothing(fast_root):
    """A sweep: one manager per trial, half closed, half just dropped, async saves included."""
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    root = fast_root
    model(torch.ones(1, 8)).sum().backward()
    optimizer.step()
    # warm up what torch and DCP create once per process
    with CheckpointManager(root, model=model, optimizer=optimizer) as mgr:
        mgr.save(0, blocking=False)
    gc.collect()
    fds, threads = _fds(), _settled_thread_count(0, timeout_s=0)

    for trial in range(50):
        with CheckpointManager(root, model=model, optimizer=optimizer, keep_last=1) as mgr:
            mgr.save(1 + trial, blocking=trial % 2 == 0)
    for trial in range(50):
        mgr = CheckpointManager(root, model=model, optimizer=optimizer, keep_last=1)
        mgr.save(100 + trial, blocking=trial % 2 == 0)
        mgr.wait()
        del mgr
    gc.collect()

    assert _settled_thread_count(threads) == threads, [t.name for t in threading.enumerate()]
    assert _settled_fd_count(fds) == fds, "file descriptors leaked"
    assert not optimizer._optimizer_step_pre_hooks, "async stagers' optimizer hooks left behind"
    assert holder_line(root) == ""
    with CheckpointManager(root, model=model, optimizer=optimizer) as mgr:
        assert mgr.load() == 149
        mgr.save(150)


def test_holder_line_of_ckptguard_0_1_is_replaced_even_on_a_network_fs(tmp_path, monkeypatch):
    """0.1.0 left "pid=... host=..." behind at every clean close: upgrading must not lock
    users out of roots on shared file systems."""
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / LOCK_NAME).write_text("pid=4242 host=node-17\n")
    monkeypatch.setattr(lock_mod, "_is_network_fs", lambda path: True)
    with CheckpointManager(root, model=torch.nn.Linear(2, 2)) as mgr:
        mgr.save(1)
    assert holder_line(root) == ""
