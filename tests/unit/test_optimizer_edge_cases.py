"""Optimizer state at the edges of a run (issue 10, points 2 and 3), one process.

* Gradients exist when ``load()`` runs (a warm-up or sanity forward/backward, a compile
  dry-run): DCP then skips its optimizer-state initialisation (pytorch#140898), and a load
  template built from it asks for no moments. ``load()`` must restore them all, and leave the
  user's ``.grad`` exactly as they were (the trainer zeroes them before its next step anyway).
* A checkpoint before the first ``optimizer.step()`` (``save(0)``): the capture must not
  initialise the optimizer (AdamW's step count would start at 1), and loading it must give an
  optimizer without state, as it was saved; likewise per parameter for one that never had a
  gradient.

Each test is a trainer: "uninterrupted" runs straight through, "resumed" is a restarted process
that builds its objects afresh (another seed, so anything not restored shows) and calls
``load()``. Bit-exact: ``torch.equal`` on every parameter and optimizer tensor, identical losses.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

from ckptguard import CheckpointManager, StateMismatchError
from ckptguard.core.states import OPTIMIZER, ModelOptimizerState
from tests._helpers import (
    assert_model_equal,
    assert_tensors_equal,
    make_training_objects,
    optimizer_tensors,
    progression_windows,
    train_on_batches,
)

pytestmark = pytest.mark.timeout(120)

BATCH = 8


def batches(first: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``first .. first+count-1`` of a learnable token task, the same in every run."""
    x, y = progression_windows(n=256).tensors
    return [(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]) for i in range(first, first + count)]


def train_zero_first(model, opt, sched, steps) -> list[float]:
    """The tutorial loop: ``zero_grad()`` first, so gradients left from before do not matter."""
    losses = []
    model.train()
    for x, y in steps:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def assert_same_run(model_a, opt_a, losses_a, model_b, opt_b, losses_b) -> None:
    assert losses_a == losses_b, f"losses differ:\n{losses_a}\n{losses_b}"
    assert_model_equal(model_a, model_b)
    assert_tensors_equal(optimizer_tensors(opt_a), optimizer_tensors(opt_b), "optimizer")


def count_steps(optimizer: torch.optim.Optimizer) -> list[int]:
    """A step pre-hook counting every ``optimizer.step()``, including hidden ones."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    optimizer.register_step_pre_hook(hook)
    return calls


# --------------------------------------------------------------- gradients before load()


def test_warmup_backward_before_load_restores_moments_exactly(tmp_path):
    model, opt, sched = make_training_objects(seed=0)
    with CheckpointManager(tmp_path, model=model, optimizer=opt, lr_scheduler=sched) as mgr:
        losses = train_zero_first(model, opt, sched, batches(0, 4))
        mgr.save(4)
        losses += train_zero_first(model, opt, sched, batches(4, 4))

    # the restarted trainer: build, a sanity forward/backward, then resume
    model2, opt2, sched2 = make_training_objects(seed=3)
    x, y = batches(0, 1)[0]
    F.cross_entropy(model2(x), y).backward()
    with CheckpointManager(tmp_path, model=model2, optimizer=opt2, lr_scheduler=sched2, strict=True) as mgr:
        assert mgr.load() == 4
        moments = optimizer_tensors(opt2)
        assert {k.split(".")[1] for k in moments} == {"step", "exp_avg", "exp_avg_sq"}
        assert all(float(v) == 4.0 for k, v in moments.items() if k.endswith(".step"))
        resumed = train_zero_first(model2, opt2, sched2, batches(4, 4))
    assert_same_run(model, opt, losses[4:], model2, opt2, resumed)


def test_grads_present_at_load_are_left_exactly_as_they_were(tmp_path):
    model, opt, sched = make_training_objects(seed=0)
    with CheckpointManager(tmp_path, model=model, optimizer=opt, lr_scheduler=sched) as mgr:
        train_on_batches(model, opt, sched, batches(0, 3))
        mgr.save(3)

    model2, opt2, sched2 = make_training_objects(seed=3)
    x, y = batches(7, 1)[0]
    F.cross_entropy(model2(x), y).backward()
    before = {n: (p.grad, p.grad.clone()) for n, p in model2.named_parameters()}
    steps = count_steps(opt2)
    with CheckpointManager(tmp_path, model=model2, optimizer=opt2, lr_scheduler=sched2) as mgr:
        mgr.load()
    for n, p in model2.named_parameters():
        grad, values = before[n]
        assert p.grad is grad, f"{n}: .grad was replaced"
        assert torch.equal(p.grad, values), f"{n}: .grad values changed"
    assert_model_equal(model, model2)  # the weights are the checkpoint's, grads or not
    assert_tensors_equal(optimizer_tensors(opt), optimizer_tensors(opt2), "optimizer")
    assert steps[0] <= 1  # at most the template's zero-LR initialisation, never a real step


def test_partly_trained_optimizer_with_grads_loads_the_checkpoint_state(tmp_path):
    """A trainer that stepped a little (a smoke run), then loads: the checkpoint wins entirely."""
    model, opt, sched = make_training_objects(seed=0)
    with CheckpointManager(tmp_path, model=model, optimizer=opt, lr_scheduler=sched) as mgr:
        train_on_batches(model, opt, sched, batches(0, 5))
        mgr.save(5)
        losses = train_on_batches(model, opt, sched, batches(5, 3))

    model2, opt2, sched2 = make_training_objects(seed=3)
    train_on_batches(model2, opt2, sched2, batches(20, 2))
    x, y = batches(0, 1)[0]
    F.cross_entropy(model2(x), y).backward()
    with CheckpointManager(tmp_path, model=model2, optimizer=opt2, lr_scheduler=sched2, strict=True) as mgr:
        mgr.load()
        opt2.zero_grad(set_to_none=True)
        resumed = train_on_batches(model2, opt2, sched2, batches(5, 3))
    assert_same_run(model, opt, losses, model2, opt2, resumed)


# --------------------------------------------------------------- a checkpoint before the first step


def test_capture_of_a_fresh_optimizer_neither_steps_nor_initialises_it():
    model, opt, _ = make_training_objects(seed=0)
    steps = count_steps(opt)
    versions = [p._version for p in model.parameters()]
    sd = ModelOptimizerState(model, opt).state_dict()
    assert sd[OPTIMIZER]["state"] == {}
    assert len(sd[OPTIMIZER]["param_groups"]) == 2
    assert len(opt.state) == 0 and steps[0] == 0
    assert all(p.grad is None for p in model.parameters())
    assert [p._version for p in model.parameters()] == versions


def test_load_template_asks_for_exactly_the_moments_the_checkpoint_holds():
    """What ``load()`` reads into: every moment of the saved state, none the checkpoint lacks,
    built for a never-stepped optimizer whose parameters hold gradients."""
    model, opt = build_late_head(0)
    train_late_head(model, opt, 0, 1)  # aux and unused get no state
    saved_keys, _ = flatten_state_dict(ModelOptimizerState(model, opt).state_dict())

    model2, opt2 = build_late_head(3)
    x, y = batches(0, 1)[0]
    F.cross_entropy(model2(x, use_aux=True), y).backward()
    template = ModelOptimizerState(model2, opt2).load_template(saved_keys)
    state = template[OPTIMIZER]["state"]
    assert set(state) == {"embed.weight", "body.weight", "body.bias", "head.weight", "head.bias"}
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in state.values())
    assert state["body.weight"]["exp_avg"].shape == model2.body.weight.shape
    assert all(p.grad is not None for n, p in model2.named_parameters() if n != "unused")


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
def test_save_before_the_first_step_does_not_change_the_run(tmp_path, blocking):
    model, opt, sched = make_training_objects(seed=0)
    losses = train_on_batches(model, opt, sched, batches(0, 6))

    model2, opt2, sched2 = make_training_objects(seed=0)
    steps = count_steps(opt2)
    with CheckpointManager(tmp_path, model=model2, optimizer=opt2, lr_scheduler=sched2) as mgr:
        mgr.save(0, blocking=blocking)  # the "initial checkpoint" before a long run
        assert len(opt2.state) == 0 and steps[0] == 0
        with_save = train_on_batches(model2, opt2, sched2, batches(0, 6))
        mgr.wait()
    assert steps[0] == 6
    assert_same_run(model, opt, losses, model2, opt2, with_save)


@pytest.mark.parametrize("warmup_backward", [False, True], ids=["plain", "grads-present"])
def test_loading_a_step0_checkpoint_gives_an_optimizer_without_state(tmp_path, warmup_backward):
    model, opt, sched = make_training_objects(seed=0)
    with CheckpointManager(tmp_path, model=model, optimizer=opt, lr_scheduler=sched) as mgr:
        mgr.save(0)
        losses = train_on_batches(model, opt, sched, batches(0, 5))

    model2, opt2, sched2 = make_training_objects(seed=3)
    if warmup_backward:
        x, y = batches(9, 1)[0]
        F.cross_entropy(model2(x), y).backward()
    # strict=True: the resume guard must not call the absent moments "lost"
    with CheckpointManager(tmp_path, model=model2, optimizer=opt2, lr_scheduler=sched2, strict=True,
                           keep_last=None) as mgr:
        assert mgr.load(step=0) == 0
        assert len(opt2.state) == 0
        assert not mgr.last_report.errors, [f.format() for f in mgr.last_report.errors]
        opt2.zero_grad(set_to_none=True)
        resumed = train_on_batches(model2, opt2, sched2, batches(0, 5))
    assert_same_run(model, opt, losses, model2, opt2, resumed)


def test_rolling_back_to_a_step0_checkpoint_clears_a_trained_optimizer(tmp_path):
    model, opt, sched = make_training_objects(seed=0)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path, model=model, optimizer=opt, lr_scheduler=sched, strict=True) as mgr:
        mgr.save(0)
        train_on_batches(model, opt, sched, batches(0, 3))
        assert len(opt.state) > 0
        mgr.load(step=0)
        assert len(opt.state) == 0
        assert_tensors_equal(initial, dict(model.state_dict()), "model")


# --------------------------------------------------------------- partly initialised state


class LateHeadLM(nn.Module):
    """A model whose auxiliary head joins the loss only after a few steps (a curriculum), and
    a parameter that never gets a gradient: part of the optimizer state exists, part not."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(33, 16)
        self.body = nn.Linear(64, 32)
        self.head = nn.Linear(32, 33)
        self.aux = nn.Linear(32, 33)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor, use_aux: bool) -> torch.Tensor:
        h = F.gelu(self.body(self.embed(x).flatten(1)))
        return self.head(h) + (self.aux(h) if use_aux else 0)


def build_late_head(seed: int):
    torch.manual_seed(seed)
    model = LateHeadLM()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_late_head(model, opt, first: int, count: int) -> list[float]:
    losses = []
    for step, (x, y) in enumerate(batches(first, count), start=first):
        loss = F.cross_entropy(model(x, use_aux=step >= 3), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _torch_loads_params_without_state() -> bool:
    """Whether torch's ``set_optimizer_state_dict`` accepts a checkpoint in which a trainable
    parameter has no state. torch 2.13 skips it; older ones (seen on 2.9.1, ckptguard's floor)
    index the saved state with every parameter and raise ``KeyError``."""
    import inspect

    from torch.distributed.checkpoint import state_dict

    return "Missing optimizer state" in inspect.getsource(state_dict._split_optim_state_dict)


@pytest.mark.parametrize("warmup_backward", [False, True], ids=["plain", "grads-present"])
def test_parameters_without_state_resume_without_state(tmp_path, warmup_backward):
    model, opt = build_late_head(0)
    with CheckpointManager(tmp_path, model=model, optimizer=opt) as mgr:
        losses = train_late_head(model, opt, 0, 2)
        mgr.save(2)  # aux and unused have no state yet
        losses += train_late_head(model, opt, 2, 4)
    assert model.unused not in opt.state and model.aux.weight in opt.state

    model2, opt2 = build_late_head(3)
    if warmup_backward:
        x, y = batches(9, 1)[0]
        F.cross_entropy(model2(x, use_aux=True), y).backward()
    with CheckpointManager(tmp_path, model=model2, optimizer=opt2, strict=True) as mgr:
        if not _torch_loads_params_without_state():
            # an older torch cannot restore this checkpoint: the load must say so, naming the
            # parameter, never resume with made-up state
            with pytest.raises(StateMismatchError, match="unused"):
                mgr.load()
            return
        assert mgr.load() == 2
        assert not mgr.last_report.errors, [f.format() for f in mgr.last_report.errors]
        stateful = {n for n, p in model2.named_parameters() if opt2.state.get(p)}
        assert stateful == {"embed.weight", "body.weight", "body.bias", "head.weight", "head.bias"}
        opt2.zero_grad(set_to_none=True)
        resumed = train_late_head(model2, opt2, 2, 4)
    assert_same_run(model, opt, losses[2:], model2, opt2, resumed)


def test_a_live_parameter_the_saved_optimizer_never_had_is_refused(tmp_path):
    model, _ = build_late_head(0)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if n != "unused"], lr=1e-2)
    with CheckpointManager(tmp_path, model=model, optimizer=opt) as mgr:
        train_late_head(model, opt, 0, 1)
        mgr.save(1)

    model2, opt2 = build_late_head(3)  # now the optimizer covers `unused` too
    with CheckpointManager(tmp_path, model=model2, optimizer=opt2) as mgr:
        with pytest.raises(StateMismatchError, match="unused"):
            mgr.load()
