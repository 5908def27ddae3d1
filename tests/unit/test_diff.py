"""ckptguard diff: value-by-value comparison, exact by default, tolerances on request."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from ckptguard import CheckpointManager
from ckptguard.cli import main
from ckptguard.errors import CheckpointCorruptError
from ckptguard.tools.diff import ValueDiff, compare_values, diff_checkpoints
from tests._helpers import (
    Counter,
    flip_byte,
    make_training_objects,
    set_manifest_field,
    train_steps,
)


def _save(root, step=3, perturb=None, extra=None, seed=0, dtype=None):
    model, opt, sched = make_training_objects(seed)
    train_steps(model, opt, sched, step)
    if perturb is not None:
        with torch.no_grad():
            perturb(model)
    if dtype is not None:
        model.to(dtype)
    with CheckpointManager(root, model=model, optimizer=opt, lr_scheduler=sched, extra=extra) as mgr:
        return mgr.save(step)


@pytest.fixture
def a(tmp_path):
    return _save(tmp_path / "a")


def test_identical_training_runs_are_equal(a, tmp_path, capsys):
    b = _save(tmp_path / "b")
    report = diff_checkpoints(a, b)
    assert report.equal and report.compared > 40 and report.identical == report.compared
    assert main(["diff", str(a), str(b)]) == 0
    assert "result: EQUAL" in capsys.readouterr().out
    # roots work too (newest step)
    assert main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 0


def test_rng_state_is_compared(a, tmp_path):
    """Same training, but the process drew one more random number before saving: the RNG
    component differs and the verdict says so."""
    model, opt, sched = make_training_objects(0)
    train_steps(model, opt, sched, 3)
    torch.rand(1)
    with CheckpointManager(tmp_path / "b", model=model, optimizer=opt, lr_scheduler=sched) as mgr:
        b = mgr.save(3)
    report = diff_checkpoints(a, b)
    assert [d.key for d in report.differing] == ["rank0.rng.torch"]


def test_perturbed_tensor_is_reported_with_its_differences(a, tmp_path, capsys):
    def bump(model):
        model.head.bias[0] += 1e-3

    b = _save(tmp_path / "b", perturb=bump)
    report = diff_checkpoints(a, b)
    assert [d.key for d in report.differing] == ["model.head.bias"]
    d = report.differing[0]
    assert d.num_different == 1 and d.numel == 33
    assert d.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "model.head.bias  [33] float32  max abs 0.001" in out and "result: DIFFERENT" in out

    # within tolerance: exit 0, and the key is listed as close rather than identical
    report = diff_checkpoints(a, b, atol=2e-3)
    assert report.equal and report.within_tolerance == ["model.head.bias"]
    assert main(["diff", str(a), str(b), "--atol", "2e-3"]) == 0
    assert diff_checkpoints(a, b, atol=1e-4).differing
    rel = d.max_rel
    assert diff_checkpoints(a, b, rtol=rel * 1.01).equal
    assert not diff_checkpoints(a, b, rtol=rel * 0.5).equal


def test_keys_only_in_one_side(a, tmp_path, capsys):
    b = _save(tmp_path / "b", extra={"counter": Counter()})
    report = diff_checkpoints(a, b)
    assert report.only_a == [] and report.only_b == ["rank0.extra.counter.history", "rank0.extra.counter.tokens_seen"]
    assert not report.equal
    assert main(["diff", str(a), str(b), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["equal"] is False and data["only_b"] == report.only_b
    assert main(["diff", str(a), str(b), "--ignore", "rank*.extra.*"]) == 0


def test_dtype_and_shape_differences(a, tmp_path):
    b = _save(tmp_path / "b", dtype=torch.float64)
    kinds = {d.key: d.kind for d in diff_checkpoints(a, b).differing}
    assert kinds["model.embed.weight"] == "dtype"
    # a dtype difference never passes, whatever the tolerance
    assert not diff_checkpoints(a, b, atol=1.0).equal
    d = compare_values("k", torch.zeros(2, 3), torch.zeros(3, 2))
    assert isinstance(d, ValueDiff) and d.kind == "shape"


def test_compare_values_rules():
    nan = float("nan")
    assert compare_values("k", torch.tensor([1.0, nan]), torch.tensor([1.0, nan])) is None
    assert compare_values("k", nan, nan) is None
    assert compare_values("k", 1.0, 1.0 + 1e-12) is not None
    assert compare_values("k", 1.0, 1.0 + 1e-12, atol=1e-9) == "close"
    assert compare_values("k", [1.0, 2.0], [1.0, 2.0 + 1e-12], rtol=1e-9) == "close"
    d = compare_values("k", torch.tensor([1, 2, 3]), torch.tensor([1, 2, 5]))
    assert isinstance(d, ValueDiff) and d.max_abs == 2 and d.num_different == 1
    assert compare_values("k", torch.tensor([1, 2]), torch.tensor([1, 3]), atol=1) == "close"
    d = compare_values("k", torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]))
    assert d.max_rel == math.inf
    assert compare_values("k", 3, 3.0).kind == "type"
    assert compare_values("k", "AdamW", "Adam").kind == "values"


def test_bad_input(a, tmp_path, capsys):
    assert main(["diff", str(a), str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    partial = tmp_path / "a" / ".step-00000009.partial"
    partial.mkdir()
    assert main(["diff", str(a), str(partial)]) == 2
    assert "incomplete" in capsys.readouterr().err
    newer = tmp_path / "newer"
    shutil.copytree(a, newer / a.name)
    set_manifest_field(newer / a.name, "format_version", 7)
    assert main(["diff", str(a), str(newer)]) == 2
    assert "Upgrade ckptguard" in capsys.readouterr().err
    with pytest.raises(ValueError):
        diff_checkpoints(a, a, atol=-1)


def test_corrupted_shard_is_refused_not_reported_as_a_difference(a, tmp_path, capsys):
    """A flipped byte in a shard would read as a changed tensor; diff checks the checksums
    first and names the damaged file instead (exit 2, not 1)."""
    b = tmp_path / "b"
    shutil.copytree(a.parent, b)
    shard = next((b / a.name).glob("*.distcp"))
    flip_byte(shard)
    with pytest.raises(CheckpointCorruptError, match=shard.name):
        diff_checkpoints(a, b)
    assert main(["diff", str(a), str(b)]) == 2
    assert "corrupted" in capsys.readouterr().err
    # without the check, the damage shows up as a difference (or an unreadable shard)
    try:
        report = diff_checkpoints(a, b, verify=False)
    except Exception:  # noqa: BLE001 - DCP may fail to unpickle a damaged entry
        return
    assert not report.equal
