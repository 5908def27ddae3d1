"""ckptguard verify: checksums committed at save time, re-checked file by file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptguard.cli import main
from ckptguard.errors import CheckpointFormatError, CheckpointNotFoundError
from ckptguard.tools.verify import verify_path
from tests._helpers import (
    build_tied_training,
    flip_byte,
    make_ckptguard_checkpoint,
    save_legacy_checkpoint,
    set_manifest_field,
    train_steps,
)


@pytest.fixture
def root(tmp_path):
    return make_ckptguard_checkpoint(tmp_path / "root", steps=(2, 4))


def _shard(step_dir: Path) -> Path:
    return next(step_dir.glob("__0_*.distcp"))


def test_intact_root_verifies(root, capsys):
    report = verify_path(root)
    assert report.ok and [s.step for s in report.checked] == [2, 4]
    assert all(s.files == 3 and s.nbytes > 0 for s in report.checked)
    assert main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert "2 checkpoint(s) verified, all match their manifests" in out


@pytest.mark.parametrize("damage, kind", [
    (lambda p: flip_byte(p), "corrupted"),
    (lambda p: os.truncate(p, p.stat().st_size - 10), "truncated"),
    (lambda p: p.unlink(), "missing"),
])
def test_damaged_shard_is_named(root, capsys, damage, kind):
    step_dir = root / "step-00000004"
    shard = _shard(step_dir)
    damage(shard)
    report = verify_path(root)
    assert not report.ok
    assert report.checked[0].ok, "the other checkpoint is intact"
    assert report.checked[1].problems == [
        {"name": shard.name, "kind": kind, "detail": report.checked[1].problems[0]["detail"]}
    ]
    assert main(["verify", str(step_dir)]) == 1
    out = capsys.readouterr().out
    assert f"{kind:<10} {shard.name}" in out and "FAILED" in out


def test_damaged_rank_file_and_metadata_are_named(root):
    step_dir = root / "step-00000002"
    flip_byte(step_dir / "rank-00000.pt")
    flip_byte(step_dir / ".metadata", offset=3)
    names = [p["name"] for p in verify_path(step_dir).checked[0].problems]
    assert names == [".metadata", "rank-00000.pt"]


def test_unlisted_file_is_reported_but_not_a_failure(root, capsys):
    (root / "step-00000004" / "stray.bin").write_bytes(b"x")
    report = verify_path(root / "step-00000004")
    assert report.ok and report.checked[0].unlisted == ["stray.bin"]
    assert main(["verify", str(root / "step-00000004")]) == 0
    assert "unlisted   stray.bin" in capsys.readouterr().out


def test_unreadable_manifest_is_a_failure(root, capsys):
    (root / "step-00000004" / "ckptguard.json").write_text("{not json")
    report = verify_path(root)
    assert not report.ok and report.checked[1].problems[0]["kind"] == "manifest"
    assert main(["verify", str(root)]) == 1


def test_newer_format_version_is_refused(root, capsys):
    set_manifest_field(root / "step-00000004", "format_version", 999)
    with pytest.raises(CheckpointFormatError, match="format_version=999.*Upgrade ckptguard"):
        verify_path(root / "step-00000004")
    assert main(["verify", str(root / "step-00000004")]) == 2
    assert "Upgrade ckptguard" in capsys.readouterr().err


def test_json_output(root, capsys):
    flip_byte(_shard(root / "step-00000002"))
    assert main(["verify", str(root), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    assert [c["ok"] for c in data["checked"]] == [False, True]
    assert data["checked"][0]["problems"][0]["kind"] == "corrupted"


def test_step_option(root, capsys):
    flip_byte(_shard(root / "step-00000002"))
    assert main(["verify", str(root), "--step", "4"]) == 0
    assert main(["verify", str(root), "--step", "3"]) == 2
    assert "complete steps: [2, 4]" in capsys.readouterr().err


def test_incomplete_checkpoints(root, tmp_path, capsys):
    partial = root / ".step-00000006.partial"
    partial.mkdir()
    (partial / "rank-00000.pt").write_bytes(b"half")
    report = verify_path(root)
    assert report.ok and report.incomplete == [".step-00000006.partial"]
    # named directly, an incomplete checkpoint is refused
    with pytest.raises(CheckpointFormatError, match="incomplete checkpoint"):
        verify_path(partial)
    only_partial = tmp_path / "only"
    only_partial.mkdir()
    (only_partial / ".step-00000001.partial").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"holds no complete checkpoint.*incomplete .*step-00000001.partial"):
        verify_path(only_partial)


@pytest.mark.parametrize("what", ["missing", "empty dir", "file", "legacy"])
def test_not_a_checkpoint(tmp_path, capsys, what):
    path = tmp_path / "x"
    if what == "empty dir":
        path.mkdir()
    elif what == "file":
        path.write_text("hello")
    elif what == "legacy":
        model, opt, sched = build_tied_training()
        train_steps(model, opt, sched, 1)
        save_legacy_checkpoint(path, model, opt, sched, step=1)
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    if what == "legacy":
        assert "ckptguard migrate" in err


def test_console_script(root):
    """The installed ``ckptguard`` entry point, in its own process."""
    script = Path(sys.executable).with_name("ckptguard")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ckptguard"]
    env = dict(os.environ, CKPTGUARD_NO_PROGRESS="1")
    ok = subprocess.run(cmd + ["verify", str(root), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    flip_byte(_shard(root / "step-00000004"))
    bad = subprocess.run(cmd + ["verify", str(root)], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "corrupted" in bad.stdout


def test_progress_is_quiet_off_a_terminal(monkeypatch):
    """Bars only on a terminal: captured stderr (pytest, CI logs, pipes) gets none."""
    from ckptguard.tools import _progress

    monkeypatch.delenv("CKPTGUARD_NO_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not _progress.progress_enabled()
    bar = _progress.progress(range(3), desc="x")
    assert list(bar) == [0, 1, 2] and bar.disable  # a silent bar: draws nothing
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert _progress.progress_enabled()
    monkeypatch.setenv("CKPTGUARD_NO_PROGRESS", "1")
    assert not _progress.progress_enabled()
    forced = _progress.progress(range(2), enabled=True)
    assert type(forced).__name__ == "tqdm" and list(forced) == [0, 1]


def test_progress_without_tqdm_is_a_silent_stand_in(monkeypatch):
    """tqdm is optional (the ``progress`` extra): without it the tools run, with no bars."""
    from ckptguard.tools import _progress

    monkeypatch.setattr(_progress, "_tqdm", None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not _progress.progress_enabled()
    with _progress.progress(total=3, desc="x", enabled=True) as bar:
        bar.update(3)
        bar.set_postfix_str("done")
    assert list(_progress.progress(range(2), enabled=True)) == [0, 1]
