"""Run-control policy over plain data: retention rules and the save decision (no files, no ranks)."""

from __future__ import annotations

import math
import random
import signal

import numpy as np
import pytest
import torch

from ckptguard.core.policy import (
    BEST,
    EVERY,
    LAST,
    NEWEST,
    PROTECTED,
    RetentionPolicy,
    SavePolicy,
    metric_value,
    normalise_metrics,
)

# ---------------------------------------------------------------------- retention


def test_keep_last_alone_keeps_the_newest_n():
    d = RetentionPolicy(keep_last=2).decide([10, 20, 30, 40])
    assert d.kept == [30, 40]
    assert d.doomed == [10, 20]
    assert d.reasons[40] == [NEWEST, LAST]
    assert d.explain(30) == "last 2"
    assert d.explain(10).startswith("not kept")


def test_keep_last_none_keeps_everything():
    d = RetentionPolicy(keep_last=None, keep_every=5).decide(range(1, 12))
    assert d.doomed == []
    assert "keep all" in d.explain(3)


def test_keep_every_keeps_multiples_forever():
    d = RetentionPolicy(keep_last=1, keep_every=100).decide([0, 50, 100, 150, 200, 250])
    assert d.kept == [0, 100, 200, 250]
    assert d.reasons[100] == [EVERY]
    assert d.explain(200) == "every 100"


def test_keep_best_min_and_max():
    metrics = {1: {"loss": 3.0}, 2: {"loss": 1.0}, 3: {"loss": 2.0}, 4: {"loss": 5.0}, 5: {"loss": 4.0}}
    low = RetentionPolicy(keep_last=1, keep_best=2, best_metric="loss").decide(metrics, metrics)
    assert low.kept == [2, 3, 5]
    assert (low.rank[2], low.rank[3]) == (1, 2)
    assert low.explain(2) == "best 2 by loss (min): #1"
    high = RetentionPolicy(keep_last=1, keep_best=2, best_metric="loss", best_mode="max").decide(metrics, metrics)
    assert high.kept == [4, 5]
    assert high.reasons[5] == [NEWEST, LAST, BEST]
    assert high.explain(5) == "newest, last 1, best 2 by loss (max): #2"


def test_checkpoints_without_a_usable_metric_are_not_ranked():
    metrics = {
        1: {"loss": 0.5},
        2: None,                   # saved without metrics
        3: {"acc": 0.1},           # another metric only
        4: {"loss": "nan"},        # a diverged step, as the manifest stores it
        5: {"loss": 9.0},
        6: {"loss": 8.0},
    }
    d = RetentionPolicy(keep_last=1, keep_best=2, best_metric="loss").decide(range(1, 7), metrics)
    assert d.kept == [1, 6]
    assert d.doomed == [2, 3, 4, 5]


def test_ties_go_to_the_newer_checkpoint_whatever_the_listing_order():
    metrics = {1: {"loss": 1.0}, 2: {"loss": 1.0}, 3: {"loss": 1.0}, 9: {"loss": 7.0}}
    policy = RetentionPolicy(keep_last=1, keep_best=1, best_metric="loss")
    assert policy.decide([1, 2, 3, 9], metrics).kept == [3, 9]
    assert policy.decide([9, 3, 1, 2], metrics).kept == [3, 9]


def test_the_newest_and_the_protected_step_always_survive():
    # an overwrite of step 20 while 40 exists: 20 was just committed and must not be deleted
    d = RetentionPolicy(keep_last=1).decide([10, 20, 30, 40], protect=[20])
    assert d.kept == [20, 40]
    assert d.reasons[20] == [PROTECTED]
    assert d.explain(20) == "just saved"


def test_a_checkpoint_kept_by_two_rules_names_both():
    metrics = {s: {"loss": 10.0 - s} for s in range(1, 11)}
    d = RetentionPolicy(keep_last=2, keep_every=5, keep_best=1, best_metric="loss").decide(metrics, metrics)
    assert d.kept == [5, 9, 10]
    assert d.reasons[10] == [NEWEST, LAST, EVERY, BEST]
    assert d.explain(5) == "every 5"


def _closed_form(saved: dict[int, float | None], policy: RetentionPolicy) -> set[int]:
    """What the rules keep of everything ever saved, written from the issue's wording."""
    steps = sorted(saved)
    keep = set(steps[-policy.keep_last:]) | {steps[-1]}
    if policy.keep_every:
        keep |= {s for s in steps if s % policy.keep_every == 0}
    ranked = sorted((v, -s) for s, v in saved.items() if v is not None and math.isfinite(v))
    keep |= {-neg for _, neg in ranked[: policy.keep_best or 0]}
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_a_long_run_of_saves_keeps_exactly_what_the_rules_say(seed):
    """500 saves with noisy, mostly falling losses (some missing, some NaN), retention applied
    after each one as the manager does: what survives equals the rules applied to every save
    ever made, so a checkpoint among the best is never deleted early and never resurrected."""
    rng = random.Random(seed)
    policy = RetentionPolicy(keep_last=3, keep_every=50, keep_best=4, best_metric="loss")
    on_disk: dict[int, dict] = {}
    saved: dict[int, float | None] = {}
    for step in range(5, 2505, 5):
        loss = 10.0 / math.sqrt(step) + rng.uniform(0, 0.5)
        roll = rng.random()
        metrics = {} if roll < 0.05 else normalise_metrics({"loss": float("nan") if roll < 0.08 else loss})
        on_disk[step] = metrics
        saved[step] = metric_value(metrics, "loss")
        decision = policy.decide(on_disk, on_disk, protect=[step])
        assert step in decision.kept
        for gone in decision.doomed:
            del on_disk[gone]
        assert len(on_disk) <= 3 + 4 + 1 + step // 50
    assert set(on_disk) == _closed_form(saved, policy)


@pytest.mark.parametrize("kwargs, words", [
    ({"keep_last": 0}, "keep_last"),
    ({"keep_every": 0}, "keep_every"),
    ({"keep_best": 2}, "best_metric"),
    ({"best_metric": "loss"}, "keep_best"),
    ({"keep_best": 1, "best_metric": "loss", "best_mode": "lowest"}, "best_mode"),
])
def test_bad_settings_are_refused_by_name(kwargs, words):
    with pytest.raises(ValueError, match=words):
        RetentionPolicy(**kwargs)


# ---------------------------------------------------------------------- metrics


def test_metrics_are_stored_as_plain_json_numbers():
    out = normalise_metrics({
        "loss": torch.tensor(0.25), "acc": np.float32(0.5), "tokens": 1024, "bad": float("inf"),
        "worse": float("nan"),
    })
    assert out == {"loss": 0.25, "acc": 0.5, "tokens": 1024, "bad": "inf", "worse": "nan"}
    assert metric_value(out, "bad") is None and metric_value(out, "loss") == 0.25


@pytest.mark.parametrize("metrics, words", [
    ({"loss": torch.ones(3)}, "3 elements"),
    ({"loss": "low"}, "not a number"),
    ({"ok": True}, "not a number"),
    ({1: 0.5}, "not a string"),
    ([("loss", 1.0)], "dict"),
])
def test_bad_metrics_are_refused_naming_the_key(metrics, words):
    with pytest.raises(ValueError, match=words):
        normalise_metrics(metrics)


# ---------------------------------------------------------------------- when to save


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_step_interval():
    policy = SavePolicy(save_every_steps=3)
    assert [s for s in range(1, 11) if policy.decide(s, clock_due=False, signal=0)] == [3, 6, 9]
    assert policy.decide(6, clock_due=False, signal=0).reasons == ("every 3 steps",)


def test_the_clock_counts_from_the_last_save():
    clock = FakeClock()
    policy = SavePolicy(save_every_seconds=60, clock=clock)
    clock.now += 59.9
    assert not policy.clock_vote()
    clock.now += 0.1
    assert policy.clock_vote()
    policy.note_saved()  # any save, not only one the clock asked for
    assert not policy.clock_vote()
    clock.now += 60
    assert policy.clock_vote()


def test_no_clock_never_votes():
    clock = FakeClock()
    policy = SavePolicy(save_every_steps=10, clock=clock)
    clock.now += 10**9
    assert not policy.clock_vote()


def test_decision_names_every_reason():
    policy = SavePolicy(save_every_steps=5, save_every_seconds=30)
    d = policy.decide(10, clock_due=True, signal=int(signal.SIGTERM))
    assert d.save and d.signal == signal.SIGTERM
    assert d.reasons == ("every 5 steps", "30 s since the last save (rank 0's clock)", "signal SIGTERM")
    assert not policy.decide(11, clock_due=False, signal=0)


@pytest.mark.parametrize("kwargs", [{"save_every_steps": 0}, {"save_every_seconds": 0},
                                    {"save_every_seconds": -5}, {"save_every_steps": 2.5}])
def test_bad_intervals_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SavePolicy(**kwargs)


# ---------------------------------------------------------------------- through the manager


def _save_run(root, steps_and_losses, **rules):
    """A trainer that saves each (step, loss) with that loss as its metric; returns what stays."""
    from ckptguard import CheckpointManager
    from tests._helpers import make_training_objects, train_steps

    model, optimizer, scheduler = make_training_objects()
    with CheckpointManager(root, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           **rules) as mgr:
        start = mgr.load()
        for step, loss in steps_and_losses:
            train_steps(model, optimizer, scheduler, step - start)
            start = step
            mgr.save(step, metrics={"loss": loss, "tokens": step * 32})
        mgr.close()  # waits for the background deletions
        return mgr.steps()


RULES = {"keep_last": 2, "keep_every": 4, "keep_best": 1, "best_metric": "loss"}
LOSSES = {1: 3.0, 2: 2.0, 3: 0.5, 4: 1.9, 5: 1.8, 6: 1.7, 7: 1.6}


def test_manager_applies_every_rule_and_stores_metrics(tmp_path):
    from ckptguard.core.format import read_manifest

    kept = _save_run(tmp_path / "ckpt", LOSSES.items(), **RULES)
    assert kept == [3, 4, 6, 7]  # best, every 4, last 2
    manifest = read_manifest(tmp_path / "ckpt" / "step-00000003")
    assert manifest["metrics"] == {"loss": 0.5, "tokens": 96}
    assert manifest["retention"] == {"keep_last": 2, "keep_every": 4, "keep_best": 1,
                                     "best_metric": "loss", "best_mode": "min"}


def test_manager_rules_apply_to_checkpoints_of_an_earlier_process(tmp_path):
    """A restarted run keeps the earlier run's best checkpoint and its multiples of 4."""
    root = tmp_path / "ckpt"
    assert _save_run(root, [(s, LOSSES[s]) for s in (1, 2, 3, 4)], **RULES) == [3, 4]
    assert _save_run(root, [(s, LOSSES[s]) for s in (5, 6, 7)], **RULES) == [3, 4, 6, 7]
    assert _save_run(root, [(8, 0.1), (9, 0.2), (10, 0.3)], **RULES) == [4, 8, 9, 10]


def test_manager_refuses_bad_rules_and_metrics_before_writing(tmp_path):
    from ckptguard import CheckpointManager
    from tests._helpers import make_training_objects

    model, optimizer, _ = make_training_objects()
    with pytest.raises(ValueError, match="best_metric"):
        CheckpointManager(tmp_path / "ckpt", model=model, optimizer=optimizer, keep_best=2)
    with CheckpointManager(tmp_path / "ckpt", model=model, optimizer=optimizer) as mgr:
        with pytest.raises(ValueError, match="'loss' = 'low' is not a number"):
            mgr.save(1, metrics={"loss": "low"})
        assert not list((tmp_path / "ckpt").glob("*step-*"))


def test_inspect_shows_which_rule_keeps_each_checkpoint(tmp_path, capsys):
    from ckptguard.cli import main
    from ckptguard.tools.inspect import inspect_path

    root = tmp_path / "ckpt"
    _save_run(root, LOSSES.items(), **RULES)
    info = inspect_path(root)
    kept_by = {s.step: s.kept_by for s in info.steps if s.complete}
    assert kept_by == {3: "best 1 by loss (min): #1", 4: "every 4", 6: "last 2", 7: "newest, last 2"}
    assert {s.step: s.metrics.get("loss") for s in info.steps if s.complete} == {3: 0.5, 4: 1.9, 6: 1.7, 7: 1.6}
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "kept by" in out and "best 1 by loss (min): #1" in out and "loss=0.5" in out
