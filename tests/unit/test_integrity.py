"""The manifest (ckptguard.json): metadata and a crc32 of every file, checked before loading."""

from __future__ import annotations

import json
import os
import time
import zlib

import pytest
import torch

from ckptguard import (
    FORMAT_VERSION,
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointManager,
    __version__,
)
from ckptguard.core.format import MANIFEST_NAME, read_manifest
from ckptguard.core.integrity import crc32_file, hash_files, verify_files
from tests._helpers import (
    assert_tensors_equal,
    clone_tensors,
    make_loader,
    make_training_objects,
    train_on_batches,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def checkpoint(tmp_path):
    """A committed checkpoint of trained objects (step 4) and the model state it holds."""
    model, optimizer, scheduler = make_training_objects()
    train_on_batches(model, optimizer, scheduler, [next(iter(make_loader()))])
    before = time.time()
    with CheckpointManager(
        tmp_path, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=make_loader()
    ) as mgr:
        path = mgr.save(4)
    after = time.time()
    return path, clone_tensors(dict(model.state_dict())), (before, after)


def test_crc32_file_matches_zlib(tmp_path):
    data = os.urandom((8 << 20) + 12345)  # spans more than one read chunk
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert crc32_file(p) == (len(data), f"{zlib.crc32(data):08x}")
    (tmp_path / "empty").write_bytes(b"")
    assert crc32_file(tmp_path / "empty") == (0, "00000000")
    entries = hash_files(tmp_path, ["blob", "empty"])
    assert entries == {
        "blob": {"nbytes": len(data), "crc32": f"{zlib.crc32(data):08x}"},
        "empty": {"nbytes": 0, "crc32": "00000000"},
    }


def test_manifest_holds_metadata_and_a_checksum_of_every_file(checkpoint):
    path, _, (before, after) = checkpoint
    manifest = read_manifest(path)
    assert manifest["format"] == "ckptguard"
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["ckptguard_version"] == __version__
    assert manifest["torch_version"] == torch.__version__
    assert manifest["world_size"] == 1
    assert manifest["step"] == 4
    assert before <= manifest["created_unix"] <= manifest["committed_unix"] <= after
    assert set(manifest["components"]) >= {"model", "optimizer", "lr_scheduler", "dataloader", "rng"}
    on_disk = sorted(n for n in os.listdir(path) if n != MANIFEST_NAME)
    assert sorted(manifest["files"]) == on_disk
    assert {".metadata", "rank-00000.pt"} <= set(on_disk)
    assert any(n.endswith(".distcp") for n in on_disk)
    for name, entry in manifest["files"].items():
        nbytes, crc = crc32_file(path / name)
        assert entry == {"nbytes": nbytes, "crc32": crc}, name
    assert verify_files(path, manifest["files"]) == []


def _flip_one_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, kind",
    [
        (_flip_one_byte, "corrupted"),
        (lambda p: p.write_bytes(p.read_bytes()[:-7]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes() + b"extra"), "size"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_verify_files_names_the_damaged_file(checkpoint, damage, kind):
    path, _, _ = checkpoint
    entries = read_manifest(path)["files"]
    shard = next(n for n in entries if n.endswith(".distcp"))
    damage(path / shard)
    problems = verify_files(path, entries)
    assert [(p.name, p.kind) for p in problems] == [(shard, kind)]
    assert shard in str(problems[0])


def test_load_refuses_a_damaged_checkpoint_by_name_and_keeps_it(checkpoint):
    path, saved, _ = checkpoint
    root = path.parent
    _flip_one_byte(path / "rank-00000.pt")
    model, optimizer, scheduler = make_training_objects(seed=8)
    before = clone_tensors(dict(model.state_dict()))
    with CheckpointManager(root, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           dataloader=make_loader()) as mgr:
        with pytest.raises(CheckpointCorruptError) as err:
            mgr.load()
        assert mgr.steps() == [4]  # refused, not deleted
    assert "rank-00000.pt" in str(err.value) and "corrupted" in str(err.value)
    assert str(path) in str(err.value)
    assert_tensors_equal(before, dict(model.state_dict()))  # nothing half-loaded


def test_newer_format_version_is_refused_with_what_to_do(checkpoint):
    path, _, _ = checkpoint
    manifest = read_manifest(path)
    manifest["format_version"] = FORMAT_VERSION + 1
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    model, optimizer, scheduler = make_training_objects(seed=8)
    with CheckpointManager(path.parent, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           dataloader=make_loader()) as mgr:
        with pytest.raises(CheckpointFormatError, match=f"format_version={FORMAT_VERSION + 1}.*Upgrade"):
            mgr.load()


def test_unreadable_manifest_is_a_format_error(checkpoint):
    path, _, _ = checkpoint
    (path / MANIFEST_NAME).write_text("{not json")
    model, optimizer, scheduler = make_training_objects(seed=8)
    with CheckpointManager(path.parent, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           dataloader=make_loader()) as mgr:
        with pytest.raises(CheckpointFormatError, match=r"cannot read the manifest .*step-00000004.ckptguard\.json"):
            mgr.load()


def test_intact_checkpoint_loads_after_verification(checkpoint):
    path, saved, _ = checkpoint
    model, optimizer, scheduler = make_training_objects(seed=8)
    with CheckpointManager(path.parent, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           dataloader=make_loader(), verify_on_load=True) as mgr:
        assert mgr.load() == 4
    assert_tensors_equal(saved, dict(model.state_dict()))
