"""The run trace (``mgr.record``), its first-divergence attribution, and ``ckptguard audit``.

The pattern of each test: a first run records steps 1..8 and checkpoints step 4, then is
"preempted" (the manager is dropped without a final save); a second run resumes from step 4 with
one thing broken on purpose and records 5..8. The trace must name the first divergent step and
the component at fault; an unbroken resume must compare 4 identical steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ckptguard import CheckpointManager, ResumeError
from ckptguard.cli import main as cli_main
from ckptguard.demo import build_optimizer
from ckptguard.guard.audit import audit
from ckptguard.guard.divergence import build_reference, compare_segment
from ckptguard.guard.trace import FULL_HASH_MAX_BYTES, TRACE_NAME, Segment, hash_batch, read_trace
from tests._helpers import batch, make_training_objects

SAVE_AT, UNTIL = 4, 8


def run(root, *, until=UNTIL, save_at=(SAVE_AT,), break_after_load=None, batch_for=None, use_scheduler=True, **mgr_kwargs):
    """One training process: build, load, train to ``until`` recording every step.

    ``break_after_load(objects)`` may change the objects after load() and returns the
    (optimizer, scheduler) to train with; ``batch_for(step, resumed_from)`` picks the data.
    """
    model, opt, sched = make_training_objects()
    with CheckpointManager(root, model=model, optimizer=opt, lr_scheduler=sched if use_scheduler else None, **mgr_kwargs) as mgr:
        start = mgr.load()
        train_opt, train_sched = opt, sched
        if break_after_load is not None:
            train_opt, train_sched = break_after_load(model, opt, sched)
        model.train() if not getattr(model, "_keep_mode", False) else None
        for step in range(start + 1, until + 1):
            x, y = batch_for(step, start) if batch_for else batch(step)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            train_opt.step()
            train_opt.zero_grad(set_to_none=True)
            if train_sched is not None:
                train_sched.step()
            mgr.record(step, loss=loss, batch=(x, y))
            if step in save_at:
                mgr.save(step)
        return mgr.last_report


def preempted_then_resumed(root, **broken):
    run(root)  # steps 1..8, checkpoint at 4, then "killed" (no save at 8)
    return run(root, save_at=(), **broken)


# --------------------------------------------------------------------------- hashing


def test_batch_hash_is_content_and_structure():
    x, y = batch(1)
    assert hash_batch((x, y)) == hash_batch((x.clone(), y.clone()))
    assert hash_batch((x, y)) != hash_batch((y, x))
    assert hash_batch({"a": x, "b": y}) == hash_batch({"b": y, "a": x})
    assert hash_batch(x) != hash_batch(x.float())  # dtype counts
    assert hash_batch(x) != hash_batch(x.reshape(-1))  # shape counts
    assert hash_batch(x.numpy()) == hash_batch(x)
    z = x.clone()
    z[3, 2] += 1
    assert hash_batch(z) != hash_batch(x)
    assert hash_batch(torch.ones(3, dtype=torch.bfloat16)) != hash_batch(torch.ones(3))


def test_large_batches_are_hashed_by_slices_that_still_see_a_change():
    big = torch.arange(FULL_HASH_MAX_BYTES // 4 * 3, dtype=torch.float32)
    other = big.clone()
    other[:1000] = -1  # a change at the start is in the first slice
    assert hash_batch(big) != hash_batch(other)
    assert hash_batch(big) == hash_batch(big.clone())


# --------------------------------------------------------------------------- the trace file


def test_record_writes_every_step_at_once_and_survives_a_kill(tmp_path):
    """A process killed without close() (os._exit) leaves every recorded step in the file."""
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parents[2])!r})
        from tests._helpers import make_training_objects
        from ckptguard import CheckpointManager
        m, o, s = make_training_objects()
        mgr = CheckpointManager({str(tmp_path)!r}, model=m, optimizer=o, lr_scheduler=s)
        for step in range(1, 6):
            mgr.record(step, loss=torch.tensor(1.0 / step))
        os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    (seg,) = read_trace(tmp_path / TRACE_NAME)
    assert seg.steps == [1, 2, 3, 4, 5]
    assert float.fromhex(seg.records[3]["loss"]) == torch.tensor(1.0 / 3).item()


def test_torn_last_line_is_skipped_and_not_glued_to_the_next(tmp_path):
    model, opt, sched = make_training_objects()
    with CheckpointManager(tmp_path, model=model, optimizer=opt) as mgr:
        mgr.record(1, loss=1.0)
    with open(tmp_path / TRACE_NAME, "a") as f:
        f.write('{"kind":"step","seg":"x","st')  # killed mid-line
    with CheckpointManager(tmp_path, model=model, optimizer=opt) as mgr:
        mgr.record(2, loss=2.0)
    segs = read_trace(tmp_path / TRACE_NAME)
    assert [s.steps for s in segs] == [[1], [2]]


def test_record_fields(tmp_path):
    model, opt, sched = make_training_objects()
    with CheckpointManager(tmp_path, model=model, optimizer=opt) as mgr:
        mgr.record(7, loss=torch.tensor(0.1), batch=batch(7))
    (seg,) = read_trace(tmp_path / TRACE_NAME)
    rec = seg.records[7]
    assert seg.header["resumed_from"] == 0 and seg.header["world_size"] == 1
    assert float.fromhex(rec["loss"]) == torch.tensor(0.1).item()
    assert [float.fromhex(v) for v in rec["lr"]] == [g["lr"] for g in opt.param_groups]
    assert rec["batch"] == hash_batch(batch(7)) and rec["train"] is True
    assert set(rec["rng"]) == {"python", "numpy", "torch"}


# --------------------------------------------------------------------------- divergence


def test_clean_resume_compares_every_overlapping_step(tmp_path):
    report = preempted_then_resumed(tmp_path)
    assert report.divergence is None and report.findings == [], report.format()
    assert report.compared_steps == UNTIL - SAVE_AT
    assert "4 resumed steps identical" in report.format()


def test_rng_reseeded_after_load_is_attributed_to_rng(tmp_path):
    def reseed(model, opt, sched):
        torch.manual_seed(0)  # "set_seed(cfg.seed)" after resuming
        return opt, sched

    report = preempted_then_resumed(tmp_path, break_after_load=reseed)
    d = report.divergence
    assert (d.step, d.cause) == (SAVE_AT + 1, "rng")
    assert d.fields == ["rng", "loss"]
    assert "torch RNG state" in d.message and "reseeded" in d.message
    assert report.by_check("trace")[0].component == "rng"


def test_dataloader_restarted_is_attributed_to_the_dataloader(tmp_path):
    report = preempted_then_resumed(tmp_path, batch_for=lambda step, start: batch(step - start))
    d = report.divergence
    assert (d.step, d.cause, d.fields[0]) == (SAVE_AT + 1, "dataloader", "batch")
    assert "the batch the earlier run used at step 1" in d.message


def test_other_data_order_is_attributed_to_the_dataloader(tmp_path):
    report = preempted_then_resumed(tmp_path, batch_for=lambda step, start: batch(step + (1000 if start else 0)))
    d = report.divergence
    assert d.cause == "dataloader" and "different data order" in d.message


def test_scheduler_not_restored_is_attributed_to_the_scheduler(tmp_path):
    run(tmp_path)
    report = run(tmp_path, save_at=(), use_scheduler=False)  # the trainer still steps its own
    assert report.divergence.cause == "lr_scheduler"
    assert report.divergence.fields == ["lr"]
    assert report.divergence.step == SAVE_AT + 1


def test_eval_mode_after_resume_is_attributed_to_the_model(tmp_path):
    def forget_train_mode(model, opt, sched):
        model.eval()
        model._keep_mode = True
        return opt, sched

    report = preempted_then_resumed(tmp_path, break_after_load=forget_train_mode)
    assert report.divergence.cause == "model" and report.divergence.fields[0] == "train_mode"
    assert "eval mode" in report.divergence.message


def test_new_optimizer_after_load_is_attributed_to_the_optimizer(tmp_path):
    """The first resumed loss matches (weights restored), the second does not (moments lost)."""
    def new_optimizer(model, opt, sched):
        fresh = build_optimizer(model)
        for g_new, g_old in zip(fresh.param_groups, opt.param_groups, strict=True):
            g_new["lr"] = g_old["lr"]
        return fresh, sched

    report = preempted_then_resumed(tmp_path, break_after_load=new_optimizer)
    d = report.divergence
    assert (d.step, d.cause, d.fields) == (SAVE_AT + 2, "optimizer", ["loss"])
    assert report.compared_steps == 2


def test_weights_changed_after_load_are_attributed_to_the_model(tmp_path):
    def nudge(model, opt, sched):
        with torch.no_grad():
            model.head.bias[0].add_(1e-3)  # one logit: a uniform shift would not change softmax
        return opt, sched

    report = preempted_then_resumed(tmp_path, break_after_load=nudge)
    assert (report.divergence.step, report.divergence.cause) == (SAVE_AT + 1, "model")
    assert report.divergence.fields == ["loss"]


def test_tolerance(tmp_path):
    """A loss that differs in the last bits: a divergence when exact, accepted within rtol."""
    run(tmp_path)
    segments = read_trace(tmp_path / TRACE_NAME)
    original = segments[0]
    resumed = Segment("resumed", {**original.header, "resumed_from": SAVE_AT}, dict(original.records))
    loss = float.fromhex(resumed.records[6]["loss"])
    resumed.records[6] = {**resumed.records[6], "loss": np.nextafter(loss, 10.0).hex()}
    ref = build_reference(segments, SAVE_AT)
    assert compare_segment(ref, original, rank=0).compared_steps == UNTIL - SAVE_AT
    exact = compare_segment(ref, resumed, rank=0)
    assert exact.divergence is not None and exact.divergence.step == 6
    assert compare_segment(ref, resumed, rank=0, rtol=1e-6).divergence is None


def test_trace_rtol_option_reaches_the_comparison(tmp_path):
    def nudge(model, opt, sched):
        with torch.no_grad():
            model.head.bias[0].add_(1e-3)
        return opt, sched

    run(tmp_path)
    report = run(tmp_path, save_at=(), break_after_load=nudge, trace_rtol=1e-3)
    assert report.divergence is None and report.compared_steps == 4
    # the same trace read exactly: the nudge did change the losses
    assert audit(tmp_path).resumes[0].divergence.cause == "model"
    assert audit(tmp_path, rtol=1e-3).resumes[0].divergence is None


def test_strict_raises_at_the_divergent_step(tmp_path):
    run(tmp_path)

    def reseed(model, opt, sched):
        torch.manual_seed(0)
        return opt, sched

    with pytest.raises(ResumeError, match="step 5 .*likely cause rng"):
        run(tmp_path, save_at=(), break_after_load=reseed, strict=True)


def test_world_size_change_skips_the_comparison(tmp_path):
    run(tmp_path)
    lines = (tmp_path / TRACE_NAME).read_text().splitlines()
    header = json.loads(lines[0])
    header["world_size"] = 2
    (tmp_path / TRACE_NAME).write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    report = run(tmp_path, save_at=())
    assert report.compared_steps == 0 and report.divergence is None


# --------------------------------------------------------------------------- audit


def three_segments(root):
    """Run 1: 1..8 (ckpt 4). Run 2 resumes at 4, diverges (RNG), saves 6, dies at 7.
    Run 3 resumes at 6, clean relative to what run 2 recorded for step 7."""
    run(root)

    def reseed(model, opt, sched):
        torch.manual_seed(1)
        return opt, sched

    run(root, until=7, save_at=(6,), break_after_load=reseed)
    run(root, save_at=())


def test_audit_finds_every_resume(tmp_path):
    three_segments(tmp_path)
    result = audit(tmp_path)
    assert [r.resumed_from for r in result.resumes] == [4, 6]
    first, second = result.resumes
    assert first.divergence.cause == "rng" and first.divergence.step == 5
    assert second.divergence is None and second.compared_steps == 1  # step 7 of run 2
    assert not result.ok


def test_audit_cli_text_and_json(tmp_path, capsys):
    three_segments(tmp_path)
    assert cli_main(["audit", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "resume from step 4" in out and "likely cause rng" in out
    assert "resume from step 6" in out and "1 resumed step identical" in out

    assert cli_main(["audit", str(tmp_path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [r["resumed_from"] for r in data["resumes"]] == [4, 6]
    assert data["resumes"][0]["divergence"]["cause"] == "rng"
    assert data["resumes"][0]["findings"] == [] and data["ok"] is False


def test_audit_carries_the_load_findings(tmp_path, capsys):
    run(tmp_path)
    run(tmp_path, save_at=(), use_scheduler=False)
    assert cli_main(["audit", str(tmp_path), "--json"]) == 1
    (resume,) = json.loads(capsys.readouterr().out)["resumes"]
    assert {f["check"] for f in resume["findings"]} == {"components", "lr"}
    assert resume["divergence"]["cause"] == "lr_scheduler"


def test_audit_of_a_clean_resume_exits_0(tmp_path, capsys):
    preempted_then_resumed(tmp_path)
    assert cli_main(["audit", str(tmp_path)]) == 0
    assert "4 resumed steps identical" in capsys.readouterr().out


def test_audit_without_trace_says_what_to_do(tmp_path, capsys):
    assert cli_main(["audit", str(tmp_path)]) == 2
    assert "mgr.record(" in capsys.readouterr().err


def test_audit_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    preempted_then_resumed(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli_main(["audit", str(tmp_path), "--plot", str(tmp_path / "loss.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err
    assert not (tmp_path / "loss.png").exists()


def test_audit_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    three_segments(tmp_path)
    out = tmp_path / "loss.png"
    assert cli_main(["audit", str(tmp_path), "--plot", str(out)]) == 1
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out) in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_and_rng_are_traced():
    from ckptguard.guard.trace import hash_rng

    x = torch.arange(3 * (FULL_HASH_MAX_BYTES // 4), dtype=torch.float32)  # sampled path too
    assert hash_batch(x.cuda()) == hash_batch(x)
    assert hash_batch(batch(3)[0].cuda()) == hash_batch(batch(3)[0])
    torch.zeros(1, device="cuda")  # initialises CUDA
    before = hash_rng()
    torch.rand(4, device="cuda")
    after = hash_rng()
    assert "cuda" in before and before["cuda"] != after["cuda"] and before["torch"] == after["torch"]
