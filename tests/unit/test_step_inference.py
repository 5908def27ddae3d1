"""``infer_step``: the step of an old checkpoint from what it holds, for migrate without --step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ckptguard.errors import CheckpointFormatError
from ckptguard.tools.step_inference import infer_step, step_sources
from tests._helpers import (
    batch,
    build_tied_training,
    make_training_objects,
    save_legacy_checkpoint,
    train_steps,
)


@pytest.fixture(scope="module")
def trained():
    """TinyLM + AdamW + per-step LambdaLR after 7 steps, as an old trainer left them."""
    model, optimizer, scheduler = make_training_objects()
    train_steps(model, optimizer, scheduler, 7)
    return model, optimizer, scheduler


def test_optimizer_and_scheduler_agree(trained):
    model, optimizer, scheduler = trained
    step, source = infer_step({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "lr_scheduler": scheduler.state_dict()})
    assert step == 7
    assert "optimizer per-parameter 'step' in 'optimizer' = 7" in source
    assert "agrees with the LR scheduler's last_epoch in 'lr_scheduler'" in source


@pytest.mark.parametrize("fmt", ["torch.save", "dcp"])
def test_index_keyed_checkpoint_without_a_step_key(tmp_path, fmt):
    """What migrate reads back from an old checkpoint that never recorded its step."""
    model, optimizer, _ = build_tied_training()
    model.train()
    for i in range(5):
        x, y = batch(i)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    path = tmp_path / ("old.pt" if fmt == "torch.save" else "old")
    save_legacy_checkpoint(path, model, optimizer, fmt=fmt)
    if fmt == "dcp":
        from ckptguard.tools.reader import load_tensor_state

        old = load_tensor_state(path)
    else:
        old = torch.load(path, weights_only=True)
    assert "step" not in old
    step, source = infer_step(old)
    assert step == 5 and "optimizer per-parameter 'step'" in source


@pytest.mark.parametrize("key", ["step", "global_step", "iteration", "iter"])
def test_a_step_key(key):
    assert infer_step({"model": {"w": torch.zeros(2)}, key: 42}) == (42, f"the key '{key}' = 42")


def test_a_step_key_nested_beside_the_states(trained):
    model, optimizer, _ = trained
    step, source = infer_step({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "train_state": {"global_step": torch.tensor(7), "epoch": 0}})
    assert step == 7 and "the key 'train_state.global_step'" in source


def test_sources_that_disagree_are_all_named(trained):
    model, optimizer, scheduler = trained
    old = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
           "lr_scheduler": dict(scheduler.state_dict(), last_epoch=1), "step": 6}
    with pytest.raises(CheckpointFormatError) as e:
        infer_step(old)
    text = str(e.value)
    for words in ("disagree", "'step' in 'optimizer' = 7", "last_epoch in 'lr_scheduler' = 1",
                  "the key 'step' = 6", "--step N"):
        assert words in text


def test_two_optimizers_stepped_at_different_rates_disagree():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt_a, opt_b = torch.optim.Adam(a.parameters()), torch.optim.Adam(b.parameters())
    for i in range(6):
        for m, opt in ((a, opt_a), (b, opt_b)):
            if m is a or i % 3 == 0:
                m(torch.ones(1, 2)).sum().backward()
                opt.step()
    with pytest.raises(CheckpointFormatError, match=r"'opt_d' = 6.*'opt_g' = 2"):
        infer_step({"opt_d": opt_a.state_dict(), "opt_g": opt_b.state_dict()})


def test_no_source_at_all_asks_for_step():
    model = torch.nn.Linear(2, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    sgd.step()
    with pytest.raises(CheckpointFormatError, match="SGD keeps none.*--step N"):
        infer_step({"model": model.state_dict(), "optimizer": sgd.state_dict()})


def test_sgd_with_a_scheduler():
    model = torch.nn.Linear(2, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(sgd, step_size=2)
    for _ in range(3):
        model(torch.ones(1, 2)).sum().backward()
        sgd.step()
        sched.step()
    step, source = infer_step({"model": model.state_dict(), "optimizer": sgd.state_dict(),
                               "scheduler": sched.state_dict()})
    assert step == 3 and source == "the LR scheduler's last_epoch in 'scheduler' = 3"


def test_parameters_with_fewer_updates_count_as_the_highest():
    """A parameter without a gradient on some steps (frozen for a while) counts fewer updates."""
    head, body = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([*head.parameters(), *body.parameters()])
    for i in range(4):
        out = head(torch.ones(1, 2)) + (body(torch.ones(1, 2)) if i >= 2 else 0)
        out.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step, source = infer_step({"optimizer": opt.state_dict()})
    assert step == 4 and "highest over 4 parameters; 2 have fewer" in source


def test_a_buffer_named_step_in_a_model_is_no_step_count():
    model_sd = {"weight": torch.zeros(2), "step": torch.tensor(99)}
    assert step_sources({"model": model_sd}) == []
    assert step_sources(model_sd) == []


def test_an_optimizer_state_dict_saved_alone(trained):
    _, optimizer, _ = trained
    assert infer_step(optimizer.state_dict())[0] == 7


def test_float32_counters_past_2_pow_24_are_not_trusted():
    opt = {"state": {0: {"step": torch.tensor(2.0**24 + 8)}}, "param_groups": [{"params": [0]}]}
    with pytest.raises(CheckpointFormatError, match="not exact"):
        infer_step({"optimizer": opt})
    step, source = infer_step({"optimizer": opt, "global_step": 16_777_225})
    assert step == 16_777_225 and "ignored (inexact)" in source


@pytest.mark.parametrize("value", [True, -3, 2.5, "100", torch.ones(2)])
def test_values_that_are_not_step_counts_are_ignored(value):
    assert step_sources({"step": value}) == []


# ---------------------------------------------------------------------- migrate without --step


def _old_tied_checkpoint(tmp_path, fmt: str, steps: int = 5, **extra):
    model, optimizer, scheduler = build_tied_training()
    train_steps(model, optimizer, scheduler, steps)
    path = tmp_path / ("old.pt" if fmt == "torch" else "old")
    save_legacy_checkpoint(path, model, optimizer, fmt=fmt, **extra)  # no step key
    return path, model, optimizer


@pytest.mark.parametrize("fmt", ["dcp", "torch"])
def test_migrate_infers_the_step_of_an_index_keyed_checkpoint_from_the_optimizer(tmp_path, fmt):
    from ckptguard import CheckpointManager
    from ckptguard.tools.migrate import migrate
    from tests._helpers import assert_tensors_equal, optimizer_tensors, tied_factory

    path, _, optimizer = _old_tied_checkpoint(tmp_path, fmt)
    model_new, opt_new = tied_factory()
    report = migrate(path, tmp_path / "new", model=model_new, optimizer=opt_new)
    assert report.step == 5 and report.destination.endswith("step-00000005")
    assert "optimizer per-parameter 'step' in 'optimizer' = 5" in report.step_source
    assert "step 5 (from the optimizer per-parameter 'step'" in report.format()
    fresh_model, fresh_opt = tied_factory()
    with CheckpointManager(tmp_path / "new", model=fresh_model, optimizer=fresh_opt) as mgr:
        assert mgr.load() == 5
    assert_tensors_equal(optimizer_tensors(optimizer), optimizer_tensors(fresh_opt), "optimizer")


def test_migrate_cli_says_where_the_step_came_from_and_needs_step_when_sources_disagree(tmp_path, capsys):
    from ckptguard.cli import main

    path, _, _ = _old_tied_checkpoint(tmp_path, "torch", iteration=4)  # a 0-based loop index
    factory = "tests._helpers:tied_factory"
    assert main(["migrate", str(path), str(tmp_path / "new"), "--factory", factory]) == 2
    err = capsys.readouterr().err
    assert "disagree" in err and "'iteration' = 4" in err and "= 5" in err and "--step N" in err
    assert not (tmp_path / "new").exists()
    assert main(["migrate", str(path), str(tmp_path / "new"), "--factory", factory, "--step", "5"]) == 0
    out = capsys.readouterr().out
    assert "as step 5 (from --step)" in out
