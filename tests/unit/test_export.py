"""ckptguard export: consolidated model weights (.pt / .safetensors) from a checkpoint."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from ckptguard import CheckpointManager
from ckptguard.cli import main
from ckptguard.errors import CheckpointCorruptError, CheckpointError, CheckpointExistsError
from ckptguard.tools.export import export_model
from tests._helpers import (
    RecordingBar,
    TiedLM,
    assert_tensors_equal,
    build_tied_training,
    flip_byte,
    make_training_objects,
    set_manifest_field,
    train_steps,
)


@pytest.fixture
def trained(tmp_path):
    """A trained TinyLM, its state dict, and the root holding its checkpoint of step 3."""
    model, opt, sched = make_training_objects()
    train_steps(model, opt, sched, 3)
    with CheckpointManager(tmp_path / "root", model=model, optimizer=opt, lr_scheduler=sched) as mgr:
        mgr.save(3)
    return tmp_path / "root", {k: v.clone() for k, v in model.state_dict().items()}


def test_export_pt_equals_model_state_dict(trained, tmp_path):
    root, expected = trained
    report = export_model(root, tmp_path / "w.pt")
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    assert_tensors_equal(expected, got, "exported")
    assert report.step == 3 and report.tensors == len(expected) and report.format == "pt"
    assert report.nbytes == sum(v.numel() * v.element_size() for v in expected.values())


def test_export_safetensors_with_dtype(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    root, expected = trained
    report = export_model(root, tmp_path / "w.safetensors", dtype="bf16")
    got = load_file(tmp_path / "w.safetensors")
    assert_tensors_equal({k: v.to(torch.bfloat16) for k, v in expected.items()}, got, "exported")
    assert report.dtype == "bfloat16" and report.format == "safetensors"
    with safe_open(tmp_path / "w.safetensors", "pt") as f:
        assert f.metadata()["ckptguard_step"] == "3"


def test_dtype_casts_only_floating_tensors(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model(torch.randn(8, 4))  # num_batches_tracked (int64) becomes 1
    with CheckpointManager(tmp_path / "root", model=model) as mgr:
        mgr.save(1)
    report = export_model(tmp_path / "root", tmp_path / "w.pt", dtype="float16")
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    assert got["0.weight"].dtype == torch.float16
    assert got["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(got["1.num_batches_tracked"], model.state_dict()["1.num_batches_tracked"])
    assert report.kept_dtype == ["1.num_batches_tracked"]


def test_tied_weights_export_and_reload(tmp_path):
    model, opt, sched = build_tied_training()
    train_steps(model, opt, sched, 2)
    with CheckpointManager(tmp_path / "root", model=model, optimizer=opt) as mgr:
        mgr.save(2)
    export_model(tmp_path / "root", tmp_path / "w.safetensors")
    from safetensors.torch import load_file

    fresh = TiedLM()
    fresh.load_state_dict(load_file(tmp_path / "w.safetensors"))  # strict: both names present
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)


def test_refuses_to_overwrite(trained, tmp_path):
    root, _ = trained
    out = tmp_path / "w.pt"
    out.write_bytes(b"precious")
    with pytest.raises(CheckpointExistsError):
        export_model(root, out)
    assert out.read_bytes() == b"precious"
    export_model(root, out, overwrite=True)
    assert out.read_bytes() != b"precious"


def test_corrupted_shard_is_refused_and_nothing_written(trained, tmp_path, capsys):
    root, _ = trained
    shard = next((root / "step-00000003").glob("*.distcp"))
    flip_byte(shard)
    with pytest.raises(CheckpointCorruptError, match=shard.name):
        export_model(root, tmp_path / "w.pt")
    assert main(["export", str(root), str(tmp_path / "w.pt")]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert not list(tmp_path.glob("*w.pt*"))


def test_missing_safetensors_gives_a_clear_error(trained, tmp_path, monkeypatch, capsys):
    root, _ = trained
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        export_model(root, tmp_path / "w.safetensors")
    assert main(["export", str(root), str(tmp_path / "w.safetensors")]) == 2
    assert "pip install safetensors" in capsys.readouterr().err
    assert not list(tmp_path.glob("*safetensors*"))
    export_model(root, tmp_path / "w.pt")  # .pt needs no extra


def test_cli_json_and_format_flag(trained, tmp_path, capsys):
    root, expected = trained
    out = tmp_path / "weights.bin"
    assert main(["export", str(root), str(out), "--format", "safetensors", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "safetensors" and data["tensors"] == len(expected)
    from safetensors.torch import load_file

    assert_tensors_equal(expected, load_file(out), "exported")
    assert main(["export", str(root), str(tmp_path / "x.pt"), "--dtype", "int8"]) == 2
    assert "--dtype 'int8'" in capsys.readouterr().err


@pytest.mark.parametrize("what, match", [
    ("missing", "does not exist"),
    ("partial", "incomplete checkpoint"),
    ("newer", "Upgrade ckptguard"),
])
def test_bad_input(trained, tmp_path, capsys, what, match):
    root, _ = trained
    path = tmp_path / "missing"
    if what == "partial":
        path = root / ".step-00000004.partial"
        path.mkdir()
    elif what == "newer":
        path = root / "step-00000003"
        set_manifest_field(path, "format_version", 99)
    with pytest.raises(CheckpointError, match=match):
        export_model(path, tmp_path / "w.pt")
    assert main(["export", str(path), str(tmp_path / "w.pt")]) == 2
    assert match in capsys.readouterr().err


def test_export_reports_progress_per_phase(trained, tmp_path, monkeypatch):
    bar = RecordingBar()
    monkeypatch.setattr("ckptguard.tools.export.progress", bar)
    export_model(trained[0], tmp_path / "w.pt")
    assert bar.calls[0]["desc"] == "export" and bar.calls[0]["total"] == 3
    assert bar.phases == ["verifying", "reading", "writing"] and bar.updates == 3
