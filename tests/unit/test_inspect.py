"""ckptguard inspect: a checkpoint's contents, by component, from metadata and rank files only."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ckptguard.cli import main
from ckptguard.errors import CheckpointFormatError
from ckptguard.tools.inspect import CheckpointInfo, RootInfo, format_nbytes, inspect_path
from ckptguard.tools.migrate import migrate
from tests._helpers import (
    TiedLM,
    build_tied_optimizer,
    build_tied_training,
    make_ckptguard_checkpoint,
    make_training_objects,
    save_legacy_checkpoint,
    set_manifest_field,
    train_steps,
)


@pytest.fixture
def root(tmp_path):
    return make_ckptguard_checkpoint(tmp_path / "root", steps=(2, 4))


def _component(info: CheckpointInfo, name: str):
    return next(c for c in info.components if c.name == name)


def test_root_lists_steps_and_details_the_newest(root):
    (root / ".step-00000006.partial").mkdir()
    (root / "step-00000005").mkdir()  # a step directory without a manifest
    info = inspect_path(root)
    assert isinstance(info, RootInfo)
    assert [(s.name, s.complete) for s in info.steps] == [
        ("step-00000002", True), ("step-00000004", True),
        ("step-00000005", False), (".step-00000006.partial", False),
    ]
    assert info.steps[0].world_size == 1 and info.steps[0].format_version == 1
    assert info.selected.step == 4
    assert inspect_path(root, step=2).selected.step == 2


def test_every_tensor_is_listed_with_shape_dtype_and_bytes(root):
    info = inspect_path(root / "step-00000004")
    model, _, _ = make_training_objects()
    expected = {k: (list(v.shape), str(v.dtype).removeprefix("torch."), v.numel() * v.element_size())
                for k, v in model.state_dict().items()}
    got = {t.key: (t.shape, t.dtype, t.nbytes) for t in _component(info, "model").tensors}
    assert got == expected

    opt = _component(info, "optimizer")
    assert set(opt.per_parameter) == set(expected)
    for name, tensors in opt.per_parameter.items():
        by_key = {t.key: t for t in tensors}
        assert set(by_key) == {"step", "exp_avg", "exp_avg_sq"}
        assert by_key["exp_avg"].shape == expected[name][0]
        assert by_key["step"].shape == []
    assert opt.values > 0  # hyperparameters
    assert info.optimizer_class == "AdamW" and len(info.param_groups) == 2

    rng = _component(info, "rng")
    assert rng.stored_in == "rank files" and rng.ranks == [0]
    assert {t.key for t in rng.tensors} >= {"rank0.torch", "rank0.numpy.keys"}
    sched = _component(info, "lr_scheduler")
    assert sched.sample_values["last_epoch"] == 4
    assert _component(info, "dataloader").values > 0

    data = info.to_dict()
    assert data["total_tensors"] == sum(c.num_tensors for c in info.components)
    assert data["total_tensor_nbytes"] == sum(c.nbytes for c in info.components)
    assert data["files"] == 4  # shard, .metadata, rank file, manifest
    json.dumps(data)


def test_reads_no_tensor_data(root):
    """Only .metadata and the rank files are read: a shard truncated to nothing still inspects."""
    shard = next((root / "step-00000004").glob("*.distcp"))
    os.truncate(shard, 0)
    info = inspect_path(root / "step-00000004")
    assert len(_component(info, "model").tensors) == 5


def test_text_output(root, capsys):
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "step-00000004                complete" in out
    assert "model [dcp] 5 tensors" in out
    assert "hidden.weight  [64, 128]    float32     32.0 KiB" in out
    assert "optimizer [dcp] AdamW, 2 param group(s), 15 tensors" in out
    assert "exp_avg [64, 128] float32" in out
    assert "lr_scheduler [rank files 0]" in out and "last_epoch=4" in out
    assert "total: " in out


def test_json_output(root, capsys):
    assert main(["inspect", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["step"] for s in data["steps"]] == [2, 4]
    assert {c["name"] for c in data["selected"]["components"]} == {
        "model", "optimizer", "lr_scheduler", "dataloader", "rng",
    }


def test_migrated_checkpoint_says_where_from(tmp_path, capsys):
    model, opt, sched = build_tied_training()
    train_steps(model, opt, sched, 2)
    save_legacy_checkpoint(tmp_path / "old.pt", model, opt, sched, step=2, fmt="torch")
    with torch.device("meta"):
        meta = TiedLM()
        meta_opt = build_tied_optimizer(meta)
    migrate(tmp_path / "old.pt", tmp_path / "new", model=meta, optimizer=meta_opt)
    assert main(["inspect", str(tmp_path / "new")]) == 0
    out = capsys.readouterr().out
    assert f"migrated from {(tmp_path / 'old.pt').resolve()} (torch.save)" in out
    assert "saved migrate" in out and "rng" not in out.split("optimizer [dcp]")[1]


def test_newer_format_version_is_refused(root, capsys):
    set_manifest_field(root / "step-00000004", "format_version", 2**31)
    with pytest.raises(CheckpointFormatError, match="Upgrade ckptguard"):
        inspect_path(root / "step-00000004")
    assert main(["inspect", str(root / "step-00000004")]) == 2
    # in a root listing the newer step is still shown, with the reason it cannot be read
    info = inspect_path(root, step=2)
    assert "format_version" in info.steps[1].note


@pytest.mark.parametrize("what, match", [
    ("missing", "does not exist"),
    ("empty dir", "not a checkpoint"),
    ("file", "is a file"),
    ("partial", "incomplete checkpoint"),
    ("legacy", "ckptguard migrate"),
])
def test_bad_input(tmp_path, capsys, what, match):
    path = tmp_path / ("x" if what != "partial" else ".step-00000003.partial")
    if what == "empty dir":
        path.mkdir()
    elif what == "file":
        path.write_text("hello")
    elif what == "partial":
        path.mkdir()
        (path / ".metadata").write_bytes(b"")
    elif what == "legacy":
        model, opt, sched = build_tied_training()
        train_steps(model, opt, sched, 1)
        save_legacy_checkpoint(path, model, opt, sched, step=1)
    assert main(["inspect", str(path)]) == 2
    assert match in capsys.readouterr().err
    assert main(["inspect", str(path), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert match in out["error"]


def test_format_nbytes():
    assert [format_nbytes(n) for n in (0, 1023, 1024, 5 << 20, 3 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "5.0 MiB", "3.0 GiB",
    ]


def test_root_of_old_format_step_dirs_points_to_migrate(tmp_path, capsys):
    """Old DCP checkpoints named like ours (step-200) but without a manifest are listed with
    the advice, and naming the root for one checkpoint gives the migrate command."""
    root = tmp_path / "old-run"
    model, opt, sched = build_tied_training()
    train_steps(model, opt, sched, 1)
    save_legacy_checkpoint(root / "step-200", model, opt, sched, step=200)
    info = inspect_path(root)
    assert info.selected is None
    assert info.steps[0].note.startswith("old index-keyed format")
    assert main(["export", str(root), str(tmp_path / "w.pt")]) == 2
    assert f"ckptguard migrate {root / 'step-200'} {root} --factory" in capsys.readouterr().err
