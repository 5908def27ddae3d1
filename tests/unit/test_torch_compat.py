"""ckptguard on torch versions whose DCP lacks private helpers we call on the current one."""

from __future__ import annotations

from torch.distributed.checkpoint import FileSystemReader

from ckptguard import CheckpointManager
from tests._helpers import (
    assert_tensors_equal,
    make_training_objects,
    optimizer_tensors,
    train_steps,
)


def test_load_without_filesystemreader_get_metadata_path(tmp_path, monkeypatch):
    """torch 2.7's FileSystemReader has no ``_get_metadata_path``: a resume must still work,
    reading ``<dir>/.metadata`` (DCP's documented name), and restore every tensor exactly."""
    model, opt, sched = make_training_objects(dropout=0.0)
    train_steps(model, opt, sched, 3)
    with CheckpointManager(tmp_path / "ckpt", model=model, optimizer=opt, lr_scheduler=sched) as mgr:
        mgr.save(3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = optimizer_tensors(opt)

    monkeypatch.delattr(FileSystemReader, "_get_metadata_path")  # as on torch 2.7
    m2, o2, s2 = make_training_objects(seed=1, dropout=0.0)
    with CheckpointManager(tmp_path / "ckpt", model=m2, optimizer=o2, lr_scheduler=s2) as mgr:
        assert mgr.load() == 3
    assert_tensors_equal(saved_model, m2.state_dict(), "model")
    assert_tensors_equal(saved_opt, optimizer_tensors(o2), "optimizer")
