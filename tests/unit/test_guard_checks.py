"""The resume checks run by ``CheckpointManager.load``: each one triggered on purpose.

Every test saves a real checkpoint of TinyLM + AdamW (+ LambdaLR warmup), changes one thing in
the resumed setup (or, for what cannot be changed in one process, in a copy of the manifest),
and asserts the finding: its check, component, severity and that the message carries the saved
and current values. A clean resume must produce no finding at all.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ckptguard import CheckpointManager, ResumeError, StateMismatchError
from ckptguard.core.format import MANIFEST_NAME, step_dirname
from ckptguard.demo import TinyLM, build_optimizer
from ckptguard.guard import Severity
from tests._helpers import (
    make_loader,
    make_training_objects,
    optimizer_tensors,
    train_on_batches,
    train_steps,
)

STEP = 6


def warmup(steps: int):
    return lambda s: min(1.0, (s + 1) / steps)


def save_run(root, *, steps: int = STEP, loader=None, model_mode: str = "train", **mgr_kwargs):
    """Train ``steps`` steps and save them as one checkpoint; returns (model, opt, sched)."""
    model, opt, sched = make_training_objects()
    if loader is not None:
        train_on_batches(model, opt, sched, [next(iter(loader)) for _ in range(steps)])
    else:
        train_steps(model, opt, sched, steps)
    getattr(model, model_mode)()
    with CheckpointManager(root, model=model, optimizer=opt, lr_scheduler=sched, dataloader=loader, **mgr_kwargs) as mgr:
        mgr.save(steps)
    return model, opt, sched


def resume(root, *, model=None, opt="same", sched="same", **mgr_kwargs):
    """Build fresh objects like the trainer would and load; returns (mgr report, objects)."""
    m, o, s = make_training_objects(seed=1)
    model = model if model is not None else m
    if opt != "same":
        o = opt
    if sched != "same":
        s = sched
    with CheckpointManager(root, model=model, optimizer=o, lr_scheduler=s, **mgr_kwargs) as mgr:
        assert mgr.load() == STEP
        report = mgr.last_report
    return report, (model, o, s)


def edit_manifest(root, **changes):
    path = root / step_dirname(STEP) / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        node = manifest
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(json.dumps(manifest))


def only(report, check):
    found = report.by_check(check)
    assert len(found) == 1, f"expected one '{check}' finding, got:\n{report.format()}"
    return found[0]


# --------------------------------------------------------------------------- clean


def test_clean_resume_has_no_finding(tmp_path):
    save_run(tmp_path)
    report, _ = resume(tmp_path)
    assert report.findings == [], report.format()
    assert report.clean and report.step == STEP


def test_manifest_records_what_the_checks_need(tmp_path):
    save_run(tmp_path, global_batch_size=32, grad_accum_steps=4)
    info = json.loads((tmp_path / step_dirname(STEP) / MANIFEST_NAME).read_text())["info"]["guard"]
    assert info["trainer"] == {"global_batch_size": 32, "grad_accum_steps": 4}
    assert info["micro_step"] == 0
    assert info["optimizer_steps"] == STEP
    assert info["lr_scheduler_class"] == "LambdaLR"


# --------------------------------------------------------------------------- LR


def test_changed_schedule_is_an_lr_error_naming_both_lrs(tmp_path):
    _, opt, _ = save_run(tmp_path)
    saved_lr = opt.param_groups[0]["lr"]
    m, o, _ = make_training_objects(seed=1)
    longer_warmup = torch.optim.lr_scheduler.LambdaLR(o, warmup(20))
    report, _ = resume(tmp_path, model=m, opt=o, sched=longer_warmup)
    f = only(report, "lr")
    assert (f.component, f.severity) == ("lr_scheduler", Severity.ERROR)
    assert repr(saved_lr) in f.message and "allow_lr_change=True" in f.message
    assert f.saved[0] == saved_lr and f.current[0] == pytest.approx(saved_lr * (STEP + 1) / 20)


def test_other_scheduler_class_is_an_error(tmp_path):
    save_run(tmp_path)
    m, o, _ = make_training_objects(seed=1)
    step_lr = torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)
    report, _ = resume(tmp_path, model=m, opt=o, sched=step_lr)
    f = only(report, "lr_scheduler_class")
    assert (f.component, f.severity) == ("lr_scheduler", Severity.ERROR)
    assert "LambdaLR, the live one StepLR" in f.message


def test_allow_lr_change_turns_it_into_info_with_the_distance(tmp_path):
    save_run(tmp_path)
    m, o, _ = make_training_objects(seed=1)
    report, _ = resume(tmp_path, model=m, opt=o, sched=torch.optim.lr_scheduler.LambdaLR(o, warmup(20)), allow_lr_change=True)
    f = only(report, "lr")
    assert f.severity is Severity.INFO and "accepted" in f.message
    # saved LR at step 6 is the full 3e-3, the new schedule gives 7/20 of it: -65%
    assert "-65.00%" in f.message
    assert report.clean


def test_scheduler_not_handed_to_the_manager_is_found_twice(tmp_path):
    """The flat-LR / restarted-warmup bug: the checkpoint has a scheduler, the resume does not
    restore it (the trainer's scheduler exists but was not passed)."""
    save_run(tmp_path)
    m, o, _ = make_training_objects(seed=1)  # the LambdaLR exists, attached to o
    with CheckpointManager(tmp_path, model=m, optimizer=o) as mgr:
        mgr.load()
        report = mgr.last_report
    comp = only(report, "components")
    assert (comp.component, comp.severity) == ("lr_scheduler", Severity.ERROR)
    assert "lr_scheduler=" in comp.message
    lr = only(report, "lr")
    assert lr.component == "lr_scheduler" and "initial_lr" in lr.message


def test_scheduler_never_checkpointed_but_attached_is_found(tmp_path):
    """Neither run handed the scheduler over: nothing in the checkpoint to compare, but the
    optimizer's param groups show a scheduler drives it."""
    model, opt, sched = make_training_objects()
    train_steps(model, opt, sched, STEP)
    with CheckpointManager(tmp_path, model=model, optimizer=opt) as mgr:
        mgr.save(STEP)
    m, o, _ = make_training_objects(seed=1)
    with CheckpointManager(tmp_path, model=m, optimizer=o) as mgr:
        mgr.load()
        f = only(mgr.last_report, "lr")
    assert (f.component, f.severity) == ("lr_scheduler", Severity.ERROR)


def test_scheduler_in_extra_counts_as_handed(tmp_path):
    model, opt, sched = make_training_objects()
    train_steps(model, opt, sched, STEP)
    with CheckpointManager(tmp_path, model=model, optimizer=opt, extra={"sched": sched}) as mgr:
        mgr.save(STEP)
    m, o, s = make_training_objects(seed=1)
    with CheckpointManager(tmp_path, model=m, optimizer=o, extra={"sched": s}) as mgr:
        mgr.load()
        assert mgr.last_report.findings == [], mgr.last_report.format()


# --------------------------------------------------------------------------- optimizer


def test_fresh_optimizer_never_loaded_is_an_optimizer_error(tmp_path):
    save_run(tmp_path)
    m, o, s = make_training_objects(seed=1)
    with CheckpointManager(tmp_path, model=m, lr_scheduler=s) as mgr:  # optimizer not handed
        mgr.load()
        report = mgr.last_report
    f = only(report, "components")
    assert (f.component, f.severity) == ("optimizer", Severity.ERROR)
    assert "empty moments" in f.message and "optimizer=optimizer" in f.message
    assert optimizer_tensors(o) == {}  # indeed: the trainer's optimizer has no moments


class ForgetfulAdamW(torch.optim.AdamW):
    """An optimizer wrapper that rebuilds (here: drops) its state in load_state_dict."""

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.state.clear()


def test_moments_dropped_by_load_state_dict_are_found(tmp_path):
    save_run(tmp_path)
    m, o, _ = make_training_objects(seed=1)
    o = ForgetfulAdamW(o.param_groups)
    s = torch.optim.lr_scheduler.LambdaLR(o, warmup(5))
    with CheckpointManager(tmp_path, model=m, optimizer=o, lr_scheduler=s) as mgr:
        mgr.load()
        f = [x for x in mgr.last_report.errors if x.check == "optimizer_state"]
    assert len(f) == 1 and f[0].component == "optimizer"
    assert "moments are missing" in f[0].message and "5 of 5 parameters" in f[0].message
    assert "head.weight" in f[0].message


def test_moments_cast_to_parameter_dtype_are_found(tmp_path):
    """fp32 moments of bf16 parameters: Optimizer.load_state_dict casts them to bf16."""
    model = TinyLM(dropout=0.0).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(2, 4, dtype=torch.long)).float().sum().backward()
    opt.step()
    for state in opt.state.values():  # a master-weights optimizer keeps fp32 moments
        state["exp_avg"] = state["exp_avg"].float()
        state["exp_avg_sq"] = state["exp_avg_sq"].float()
    with CheckpointManager(tmp_path, model=model, optimizer=opt) as mgr:
        mgr.save(STEP)
    m2 = TinyLM(dropout=0.0).to(torch.bfloat16)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    m2(torch.zeros(2, 4, dtype=torch.long)).float().sum().backward()
    o2.step()
    for state in o2.state.values():
        state["exp_avg"] = state["exp_avg"].float()
        state["exp_avg_sq"] = state["exp_avg_sq"].float()
    with CheckpointManager(tmp_path, model=m2, optimizer=o2) as mgr:
        mgr.load()
        f = only(mgr.last_report, "optimizer_state")
    assert f.severity is Severity.ERROR and f.component == "optimizer"
    assert "exp_avg: dtype torch.float32 became torch.bfloat16" in f.message


def test_changed_hyperparameters_are_named_and_the_saved_ones_win(tmp_path):
    save_run(tmp_path)
    m, _, _ = make_training_objects(seed=1)
    o = build_optimizer(m)
    o.param_groups[0]["weight_decay"] = 0.05
    o.param_groups[1]["betas"] = (0.9, 0.99)
    s = torch.optim.lr_scheduler.LambdaLR(o, warmup(5))
    report, _ = resume(tmp_path, model=m, opt=o, sched=s)
    f = only(report, "hyperparameters")
    assert (f.component, f.severity) == ("optimizer", Severity.WARNING)
    assert "group 0 weight_decay: saved 0.1, your code 0.05" in f.message
    assert "group 1 betas: saved [0.9, 0.95], your code [0.9, 0.99]" in f.message
    assert "set it after load()" in f.message
    assert o.param_groups[0]["weight_decay"] == 0.1  # what load() does: the saved value wins


def test_changed_optimizer_class_is_an_error(tmp_path):
    """Adam and AdamW have the same state keys, so the load itself succeeds."""
    save_run(tmp_path)
    m, o, _ = make_training_objects(seed=1)
    adam = torch.optim.Adam(o.param_groups, lr=3e-3)
    report, _ = resume(tmp_path, model=m, opt=adam, sched=torch.optim.lr_scheduler.LambdaLR(adam, warmup(5)))
    f = only(report, "optimizer_class")
    assert (f.component, f.severity) == ("optimizer", Severity.ERROR)
    assert "checkpoint's optimizer is AdamW, the live one Adam" in f.message


def test_changed_param_groups_raise_naming_the_keys(tmp_path):
    save_run(tmp_path)
    m, _, _ = make_training_objects(seed=1)
    one_group = torch.optim.AdamW(m.parameters(), lr=3e-3)
    with pytest.raises(StateMismatchError) as e:
        resume(tmp_path, model=m, opt=one_group, sched=None)
    assert "in the checkpoint but not in the live objects (they would be dropped): optimizer.param_groups.1." in str(e.value)
    assert "param group(s)" in str(e.value)  # check_hyperparameters' finding comes with it


def test_optimizer_not_stepping_since_load_is_found_at_save(tmp_path, caplog):
    """The trainer builds a new optimizer after load() and trains with it: the manager's
    optimizer never steps again, so the next checkpoint would hold stale moments."""
    save_run(tmp_path)
    m, o, s = make_training_objects(seed=1)
    with CheckpointManager(tmp_path, model=m, optimizer=o, lr_scheduler=s) as mgr:
        mgr.load()
        new_opt = build_optimizer(m)
        train_steps(m, new_opt, None, 2)
        with caplog.at_level(logging.ERROR, logger="ckptguard.guard"):
            mgr.save(STEP + 2)
        f = only(mgr.last_report, "optimizer_stepped")
    assert f.severity is Severity.ERROR and "has not stepped since step 6" in f.message
    assert "optimizer_stepped" not in caplog.text and "stale moments" in caplog.text


def test_optimizer_not_stepping_refuses_the_save_when_strict(tmp_path):
    save_run(tmp_path)
    m, o, s = make_training_objects(seed=1)
    with CheckpointManager(tmp_path, model=m, optimizer=o, lr_scheduler=s, strict=True) as mgr:
        mgr.load()
        train_steps(m, build_optimizer(m), None, 1)
        with pytest.raises(ResumeError, match="stale moments"):
            mgr.save(STEP + 1)
        assert mgr.steps() == [STEP]
        train_steps(m, o, s, 1)  # training with the handed optimizer again: accepted
        mgr.save(STEP + 2)


# --------------------------------------------------------------------------- world and trainer


def test_changed_world_size_warns_for_dataloader_and_rng(tmp_path):
    save_run(tmp_path, loader=make_loader())
    edit_manifest(tmp_path, world_size=4)  # as if saved by 4 ranks (rank 0's file is there)
    m, o, s = make_training_objects(seed=1)
    with CheckpointManager(tmp_path, model=m, optimizer=o, lr_scheduler=s, dataloader=make_loader()) as mgr:
        mgr.load()
        report = mgr.last_report
    found = {f.component: f for f in report.by_check("world_size")}
    assert set(found) == {"dataloader", "rng"}
    assert all(f.severity is Severity.WARNING for f in found.values())
    assert "saved by 4 rank(s), resumed on 1" in found["dataloader"].message
    assert "cannot continue bit-exactly" in found["dataloader"].message
    assert "per rank" in found["rng"].message


def test_changed_batch_size_and_accumulation_warn(tmp_path):
    save_run(tmp_path, global_batch_size=64, grad_accum_steps=4)
    report, _ = resume(tmp_path, global_batch_size=128, grad_accum_steps=8)
    bs, ga = only(report, "global_batch_size"), only(report, "grad_accum_steps")
    assert bs.component == ga.component == "trainer"
    assert "from 64 (saved) to 128" in bs.message and "from 4 (saved) to 8" in ga.message
    # undeclared now: nothing to compare, nothing reported
    report, _ = resume(tmp_path)
    assert report.findings == []


def test_save_mid_accumulation_is_refused_and_writes_nothing(tmp_path):
    model, opt, sched = make_training_objects()
    train_steps(model, opt, sched, 2)
    with CheckpointManager(tmp_path, model=model, optimizer=opt, lr_scheduler=sched, grad_accum_steps=4) as mgr:
        with pytest.raises(ResumeError, match="micro-step 3 .*grad_accum_steps=4"):
            mgr.save(2, micro_step=3)
        assert mgr.steps() == [] and not list(tmp_path.glob(".step-*"))
        mgr.save(2, micro_step=0)
        mgr.save(3, micro_step=1, allow_mid_accumulation=True)
    m, o, s = make_training_objects(seed=1)
    with CheckpointManager(tmp_path, model=m, optimizer=o, lr_scheduler=s, grad_accum_steps=4) as mgr:
        assert mgr.load() == 3
        f = only(mgr.last_report, "mid_accumulation")
    assert f.severity is Severity.WARNING and "micro-step 1" in f.message


# --------------------------------------------------------------------------- model mode


def test_model_in_eval_mode_at_save_warns(tmp_path):
    save_run(tmp_path, model_mode="eval")
    report, _ = resume(tmp_path)
    f = only(report, "model_mode")
    assert f.component == "model" and f.saved == "eval" and "model.train()" in f.message


def test_model_in_eval_mode_after_load_warns(tmp_path):
    save_run(tmp_path)
    m, o, s = make_training_objects(seed=1)
    m.eval()
    report, _ = resume(tmp_path, model=m, opt=o, sched=s)
    f = only(report, "model_mode")
    assert f.current == "eval" and "after load()" in f.message


# --------------------------------------------------------------------------- keys, shapes, dtypes


def test_shape_mismatch_raises_naming_the_keys(tmp_path):
    save_run(tmp_path)
    wider = TinyLM(hidden=96)
    with pytest.raises(StateMismatchError) as e:
        resume(tmp_path, model=wider, opt=build_optimizer(wider), sched=None)
    msg = str(e.value)
    assert "model.hidden.weight: saved shape (64, 128), live shape (96, 128)" in msg
    assert "optimizer.state.hidden.weight.exp_avg" in msg


def test_missing_and_unexpected_keys_raise_naming_them(tmp_path):
    save_run(tmp_path)

    class Bigger(TinyLM):
        def __init__(self):
            super().__init__()
            self.extra_head = torch.nn.Linear(2, 2)

    big = Bigger()
    with pytest.raises(StateMismatchError) as e:
        resume(tmp_path, model=big, opt=build_optimizer(big), sched=None)
    assert "model key(s) missing from the checkpoint" in str(e.value)
    assert "model.extra_head.weight" in str(e.value) and "strict=False" in str(e.value)

    class Smaller(TinyLM):
        def __init__(self):
            super().__init__()
            del self.head
            self.head = torch.nn.Identity()

    small = Smaller()
    with pytest.raises(StateMismatchError) as e:
        resume(tmp_path, model=small, opt=None, sched=None)
    assert "in the checkpoint but not in the live objects" in str(e.value)
    assert "model.head.weight" in str(e.value)


def test_non_strict_load_keeps_live_values_of_missing_keys_and_warns(tmp_path):
    save_run(tmp_path)

    class Bigger(TinyLM):
        def __init__(self):
            super().__init__()
            self.extra_head = torch.nn.Linear(2, 2)

    torch.manual_seed(5)
    big = Bigger()
    before = big.extra_head.weight.detach().clone()
    with CheckpointManager(tmp_path, model=big) as mgr:
        assert mgr.load(strict=False) == STEP
        f = [x for x in mgr.last_report.by_check("keys") if x.component == "model"]
    assert len(f) == 1 and "model.extra_head.weight" in f[0].message and f[0].severity is Severity.WARNING
    assert torch.equal(big.extra_head.weight, before)


def test_dtype_mismatch_raises_naming_the_keys(tmp_path):
    save_run(tmp_path)
    half = TinyLM().to(torch.bfloat16)
    with pytest.raises(StateMismatchError, match=r"model.embed.weight: saved torch.float32, live torch.bfloat16"):
        resume(tmp_path, model=half, opt=None, sched=None)


# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize(
    "key, value, check, expected",
    [
        ("torch_version", "2.4.1+cu121", "torch_version", "saved with torch 2.4.1+cu121"),
        ("info.device_type", "cuda", "device_type", "saved on cuda, resumed on cpu"),
        ("info.deterministic_algorithms", True, "deterministic_algorithms", "torch.use_deterministic_algorithms(True)"),
    ],
)
def test_environment_drift_warns(tmp_path, key, value, check, expected):
    save_run(tmp_path)
    edit_manifest(tmp_path, **{key: value})
    report, _ = resume(tmp_path)
    f = only(report, check)
    assert (f.component, f.severity) == ("environment", Severity.WARNING)
    assert expected in f.message
    assert [x.check for x in report.findings] == [check]


# --------------------------------------------------------------------------- strict and logging


def test_strict_turns_errors_into_resume_error(tmp_path):
    save_run(tmp_path)
    m, o, _ = make_training_objects(seed=1)
    with pytest.raises(ResumeError) as e:
        with CheckpointManager(tmp_path, model=m, optimizer=o, strict=True) as mgr:
            mgr.load()
    assert "lr_scheduler" in str(e.value) and "strict=False" in str(e.value)


def test_strict_accepts_warnings(tmp_path):
    save_run(tmp_path)
    edit_manifest(tmp_path, torch_version="0.0.1")
    m, o, s = make_training_objects(seed=1)
    with CheckpointManager(tmp_path, model=m, optimizer=o, lr_scheduler=s, strict=True) as mgr:
        assert mgr.load() == STEP
        assert [f.check for f in mgr.last_report.findings] == ["torch_version"]


def test_default_logs_findings(tmp_path, caplog):
    save_run(tmp_path)
    m, o, _ = make_training_objects(seed=1)
    with caplog.at_level(logging.WARNING, logger="ckptguard.guard"):
        with CheckpointManager(tmp_path, model=m, optimizer=o) as mgr:
            mgr.load()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "ckptguard.guard"]
    assert len(errors) == 2 and all("lr_scheduler" in r.getMessage() for r in errors)


# --------------------------------------------------------------------------- verify_roundtrip


def test_verify_roundtrip_is_exact_and_leaves_the_dataloader_alone(tmp_path):
    model, opt, sched = make_training_objects()
    loader = make_loader()
    it = iter(loader)
    train_on_batches(model, opt, sched, [next(it) for _ in range(3)])
    calls = []
    original = loader.state_dict
    loader.state_dict = lambda: calls.append(1) or original()
    with CheckpointManager(tmp_path, model=model, optimizer=opt, lr_scheduler=sched, dataloader=loader) as mgr:
        result = mgr.verify_roundtrip()
        assert mgr.steps() == []
    assert result.exact, result.format()
    assert result.checked == ["model", "optimizer", "lr_scheduler", "rng"]
    assert calls == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckptguard-roundtrip")]


class LossyScaler:
    """A stateful extra whose load_state_dict rounds its value: the kind of bug the round trip
    catches before any training run is wasted."""

    def __init__(self):
        self.scale = 65536.0 / 3

    def state_dict(self):
        return {"scale": self.scale}

    def load_state_dict(self, sd):
        self.scale = float(int(sd["scale"]))


def test_verify_roundtrip_names_the_component_that_changed(tmp_path):
    model, opt, sched = make_training_objects()
    train_steps(model, opt, sched, 2)
    with CheckpointManager(tmp_path, model=model, optimizer=opt, lr_scheduler=sched, extra={"scaler": LossyScaler()}) as mgr:
        result = mgr.verify_roundtrip()
    assert not result.exact
    assert result.changed_components == ["extra.scaler"]
    assert "extra.scaler.scale: 21845.333333333332 became 21845.0" in result.changed["extra.scaler"][0]
    assert "DIFFERS extra.scaler" in result.format()


def test_verify_roundtrip_finds_moments_cast_to_parameter_dtype(tmp_path):
    model = TinyLM(dropout=0.0).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(2, 4, dtype=torch.long)).float().sum().backward()
    opt.step()
    for state in opt.state.values():
        state["exp_avg"] = state["exp_avg"].float()
    with CheckpointManager(tmp_path, model=model, optimizer=opt) as mgr:
        result = mgr.verify_roundtrip()
    assert result.changed_components == ["optimizer"]
    assert all("dtype torch.float32 became torch.bfloat16" in d for d in result.changed["optimizer"])
