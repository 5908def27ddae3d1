"""HashingFileSystemWriter: checksums taken while fsyncing equal a second pass over the files,
and no file DCP writes escapes the fsync although DCP's own fsync is turned off underneath."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckptguard import CheckpointManager
from ckptguard.core.format import read_manifest
from ckptguard.core.integrity import hash_files
from ckptguard.core.writer import HashingFileSystemWriter
from tests._helpers import make_training_objects, train_steps

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
]


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(64 * (i + 1), 97, generator=g) for i in range(4)}


@pytest.fixture
def fsynced(monkeypatch) -> set[str]:
    """Names of the files every ``os.fsync`` call made durable."""
    seen: set[str] = set()
    real = os.fsync

    def spy(fd: int) -> None:
        seen.add(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_entries_equal_a_second_pass_and_every_file_is_fsynced(tmp_path, fsynced):
    writer = HashingFileSystemWriter(tmp_path, thread_count=2)
    dcp.save(_state(), storage_writer=writer, no_dist=True)

    names = sorted(os.listdir(tmp_path))
    assert ".metadata" in names and sum(n.endswith(".distcp") for n in names) == 2
    assert writer.entries_for(tmp_path, names) == hash_files(tmp_path, names)
    # DCP's metadata is fsynced under its temporary name, before the rename
    durable = {n.replace(".metadata.tmp", ".metadata") for n in fsynced}
    assert set(names) <= durable, f"not fsynced: {set(names) - durable}"


def test_a_plain_writer_without_sync_files_fsyncs_nothing(tmp_path, fsynced):
    """The fail-on-bug side: turning DCP's sync_files off (as the hashing writer does
    underneath) leaves every file unsynced unless the writer seals them itself."""
    dcp.save(_state(), storage_writer=dcp.FileSystemWriter(tmp_path, sync_files=False), no_dist=True)
    assert not {n for n in fsynced if n.endswith(".distcp") or n.startswith(".metadata")}


def test_files_the_writer_did_not_see_are_fsynced_and_hashed(tmp_path, fsynced):
    writer = HashingFileSystemWriter(tmp_path)
    dcp.save(_state(), storage_writer=writer, no_dist=True)
    (tmp_path / "rank-00000.pt").write_bytes(b"written elsewhere" * 1000)
    fsynced.clear()

    entries = writer.entries_for(tmp_path, ["rank-00000.pt", ".metadata"])

    assert entries == hash_files(tmp_path, ["rank-00000.pt", ".metadata"])
    assert fsynced == {"rank-00000.pt"}  # .metadata was sealed during the save already


def test_sync_files_false_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sync_files"):
        HashingFileSystemWriter(tmp_path, sync_files=False)


@pytest.mark.parametrize("blocking", [True, False])
def test_manifest_checksums_match_the_files(tmp_path, blocking):
    model, optimizer, scheduler = make_training_objects()
    train_steps(model, optimizer, scheduler, 2)
    with CheckpointManager(tmp_path, model=model, optimizer=optimizer, lr_scheduler=scheduler) as mgr:
        path = mgr.save(2, blocking=blocking)
        path = mgr.wait() or path
    files = read_manifest(path)["files"]
    on_disk = sorted(n for n in os.listdir(path) if n != "ckptguard.json")
    assert sorted(files) == on_disk
    assert hash_files(path, on_disk) == files
