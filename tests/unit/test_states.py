"""State adapters: what each accepts, refuses (with a message that says what to do), and keeps."""

from __future__ import annotations

import pytest
import torch

from ckptguard import CheckpointManager, UnsupportedStateError
from ckptguard.core.states import (
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    RNG,
    DataLoaderState,
    ModelOptimizerState,
    ObjectState,
    build_rank_states,
)
from tests._helpers import (
    Counter,
    assert_tensors_equal,
    make_loader,
    make_training_objects,
    token_dataset,
    train_steps,
)

pytestmark = pytest.mark.timeout(60)


def test_model_optimizer_state_is_keyed_by_fqn_and_holds_moments():
    model, optimizer, scheduler = make_training_objects()
    train_steps(model, optimizer, scheduler, 2)
    sd = ModelOptimizerState(model, optimizer).state_dict()
    assert set(sd) == {MODEL, OPTIMIZER}
    names = {n for n, _ in model.named_parameters()}
    assert set(sd[MODEL]) == names
    assert set(sd[OPTIMIZER]["state"]) == names  # FQNs, not integer positions
    for state in sd[OPTIMIZER]["state"].values():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}


def test_model_optimizer_capture_of_a_fresh_optimizer_is_empty_and_changes_nothing():
    """A save before the first step records the optimizer as it is: no state, and no step taken
    (DCP's get_optimizer_state_dict would run a zero-LR step and start AdamW's count at 1)."""
    model, optimizer, _ = make_training_objects()
    sd = ModelOptimizerState(model, optimizer).state_dict()
    assert sd[OPTIMIZER]["state"] == {}
    assert len(optimizer.state) == 0


def test_model_optimizer_load_template_of_a_fresh_optimizer_asks_for_the_moments():
    """The load template of a never-stepped optimizer must list every moment the checkpoint
    holds: a template from a fresh optimizer's own state_dict() asks for nothing."""
    model, optimizer, _ = make_training_objects()
    saved = [f"optimizer.state.{n}.{k}" for n, _ in model.named_parameters() for k in ("exp_avg", "exp_avg_sq", "step")]
    sd = ModelOptimizerState(model, optimizer).load_template(saved)
    assert set(sd[OPTIMIZER]["state"]) == {n for n, _ in model.named_parameters()}
    exp_avg = sd[OPTIMIZER]["state"]["hidden.weight"]["exp_avg"]
    assert exp_avg.shape == model.hidden.weight.shape


def test_model_optimizer_round_trip_in_memory():
    model, optimizer, scheduler = make_training_objects()
    train_steps(model, optimizer, scheduler, 2)
    sd = ModelOptimizerState(model, optimizer).state_dict()
    m2, o2, _ = make_training_objects(seed=3)
    ModelOptimizerState(m2, o2).load_state_dict(sd)
    assert_tensors_equal(dict(model.state_dict()), dict(m2.state_dict()))
    ref = ModelOptimizerState(model, optimizer).state_dict()[OPTIMIZER]["state"]
    got = ModelOptimizerState(m2, o2).state_dict()[OPTIMIZER]["state"]
    for fqn in ref:
        assert_tensors_equal(ref[fqn], got[fqn], fqn)


def test_model_only_state_has_no_optimizer():
    model, _, _ = make_training_objects()
    assert set(ModelOptimizerState(model, None).state_dict()) == {MODEL}


@pytest.mark.parametrize(
    "model, optimizer, match",
    [
        ("not a module", None, "model must be a torch.nn.Module, got str"),
        (torch.nn.Linear(2, 2), {"lr": 1}, "optimizer must be a torch.optim.Optimizer, got dict"),
    ],
)
def test_model_optimizer_state_refuses_wrong_types(model, optimizer, match):
    with pytest.raises(UnsupportedStateError, match=match):
        ModelOptimizerState(model, optimizer)


def test_plain_dataloader_is_refused_with_what_to_use_instead():
    plain = torch.utils.data.DataLoader(token_dataset(), batch_size=4)
    with pytest.raises(UnsupportedStateError) as err:
        DataLoaderState(plain)
    msg = str(err.value)
    assert "StatefulDataLoader" in msg and "torchdata" in msg
    assert "first batch" in msg  # says why: a silent restart of the epoch


def test_object_without_state_methods_is_refused_naming_the_setting():
    class NoState:
        def state_dict(self):
            return {}

    with pytest.raises(UnsupportedStateError, match=r"extra\['ema'\]=NoState has no load_state_dict"):
        build_rank_states(None, None, {"ema": NoState()})
    with pytest.raises(UnsupportedStateError, match="lr_scheduler=object has no state_dict"):
        build_rank_states(object(), None, None)


@pytest.mark.parametrize("key", ["", 3])
def test_extra_keys_must_be_non_empty_strings(key):
    with pytest.raises(UnsupportedStateError, match="extra keys"):
        build_rank_states(None, None, {key: Counter()})


def test_manager_refuses_bad_objects_before_touching_the_root(tmp_path):
    model, optimizer, _ = make_training_objects()
    plain = torch.utils.data.DataLoader(token_dataset(), batch_size=4)
    with pytest.raises(UnsupportedStateError, match="StatefulDataLoader"):
        CheckpointManager(tmp_path / "root", model=model, optimizer=optimizer, dataloader=plain)
    assert not (tmp_path / "root").exists()


def test_rank_states_restore_rng_last():
    """The dataloader's resumed iterator draws from the torch RNG; the RNG must be restored after."""
    model, optimizer, scheduler = make_training_objects()
    states = build_rank_states(scheduler, make_loader(), {"counter": Counter()})
    assert list(states) == [LR_SCHEDULER, "extra.counter", DATALOADER, RNG]
    assert states[DATALOADER].per_rank and states[RNG].per_rank
    assert not states[LR_SCHEDULER].per_rank
    assert list(build_rank_states(None, None, None)) == [RNG]


def test_object_state_round_trips_a_user_stateful():
    c = Counter()
    c.add(5)
    c.add(7)
    saved = ObjectState(c, "extra['c']").state_dict()
    fresh = Counter()
    ObjectState(fresh, "extra['c']").load_state_dict(saved)
    assert fresh.tokens_seen == 12 and fresh.history == [5, 7]


def test_dataloader_state_resumes_mid_epoch():
    torch.manual_seed(0)
    loader = make_loader()
    it = iter(loader)
    for _ in range(3):
        next(it)
    saved = DataLoaderState(loader).state_dict()
    expected = [next(it) for _ in range(2)]
    fresh = make_loader()
    DataLoaderState(fresh).load_state_dict(saved)
    it2 = iter(fresh)
    for (x, y), (ex, ey) in zip([next(it2) for _ in range(2)], expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_wrapped_model_resumes_without_a_false_missing_after_load(tmp_path):
    """DCP's set_model_state_dict renames the keys of the dict it is handed in place
    (``_orig_mod.x`` under torch.compile, ``module.x`` under DDP); the guard's read-back compares
    that dict with the live model afterwards, so a shared dict read 'missing after load'."""
    from ckptguard import CheckpointManager

    model = torch.compile(torch.nn.Linear(2, 2))
    opt = torch.optim.AdamW(model.parameters())
    with CheckpointManager(tmp_path, model=model, optimizer=opt) as mgr:
        mgr.save(1)
    with CheckpointManager(tmp_path, model=model, optimizer=opt, strict=True) as mgr:
        assert mgr.load() == 1
        assert not mgr.last_report.errors


def test_values_equal_compares_dtensor_shards_outside_a_process_group(tmp_path):
    """The resume harness compares rank files in a process without a process group; a DTensor
    there (an FSDP2-sharded optimizer in ``extra``) must compare by its local shard, not by a
    collective."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from ckptguard.tools.reader import values_equal

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        dt = distribute_tensor(torch.arange(6.0), mesh, [Shard(0)])
        torch.save({"t": dt}, tmp_path / "a.pt")
    finally:
        dist.destroy_process_group()
    a = torch.load(tmp_path / "a.pt", weights_only=True)["t"]
    b = torch.load(tmp_path / "a.pt", weights_only=True)["t"]
    assert values_equal(a, b)
