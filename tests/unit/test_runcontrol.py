"""Run control: signal handlers (installed on request, chained, restored), the preemption state
and the cross-rank agreement of ``should_save`` (2 processes over gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from ckptguard.core.policy import SavePolicy
from ckptguard.errors import CheckpointError, CommitError
from ckptguard.runcontrol import RunControl, SignalCatcher

USR1 = signal.SIGUSR1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def controls():
    """RunControls made by a test, closed (handlers restored) even when it fails."""
    made: list[RunControl] = []
    before = signal.getsignal(USR1)

    def make(policy: SavePolicy | None = None, **kwargs) -> RunControl:
        rc = RunControl(policy or SavePolicy(), **kwargs)
        made.append(rc)
        return rc

    yield make
    for rc in reversed(made):
        rc.close()
    signal.signal(USR1, before)


def test_no_handler_unless_asked(controls):
    before = signal.getsignal(signal.SIGTERM)
    rc = controls(SavePolicy(save_every_steps=2))
    assert signal.getsignal(signal.SIGTERM) is before
    assert [s for s in range(1, 6) if rc.should_save(s)] == [2, 4]
    assert not rc.preempted


def test_a_signal_asks_for_one_save_and_preempted_waits_until_it_is_durable(controls):
    rc = controls(signals=(USR1,))
    assert not rc.should_save(1)
    os.kill(os.getpid(), USR1)
    decision = rc.should_save(2)
    assert decision and decision.signal == USR1 and decision.reasons == ("signal SIGUSR1",)
    assert rc.preemption_requested and not rc.preempted
    rc.note_saved(durable=False)  # an async save in flight is not yet the checkpoint asked for
    assert not rc.preempted
    rc.note_saved(durable=True)
    assert rc.preempted
    assert not rc.should_save(3)  # the signal was acted on once
    assert rc.preempted


def test_a_second_signal_during_the_save_is_recorded_not_lost(controls):
    rc = controls(signals=(USR1,))
    os.kill(os.getpid(), USR1)
    assert rc.should_save(5)
    os.kill(os.getpid(), USR1)  # arrives while the checkpoint is being written
    rc.note_saved(durable=True)
    assert rc.preempted and rc.catcher.received == 2
    assert rc.should_save(6).signal == USR1  # a run that goes on saves again when asked again


def test_previous_python_handler_is_chained_after_ours(controls):
    seen = []
    holder: dict = {}

    def previous(signum, frame):
        seen.append((signum, holder["rc"].catcher.received))

    signal.signal(USR1, previous)
    holder["rc"] = rc = controls(signals=(USR1,))
    os.kill(os.getpid(), USR1)
    assert seen == [(USR1, 1)]  # called once, after ours had recorded the signal
    assert rc.should_save(1)
    rc.close()
    assert signal.getsignal(USR1) is previous  # restored


def test_sigint_default_handler_is_not_chained(controls):
    """Python's SIGINT default raises KeyboardInterrupt, which would abandon the save."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc = controls(signals=(signal.SIGINT,))
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        except KeyboardInterrupt:
            pytest.fail("the default SIGINT handler ran: the checkpoint would never be written")
        assert rc.should_save(1).signal == signal.SIGINT
        rc.close()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)


def test_close_from_another_thread_hands_later_signals_on(controls):
    calls = []
    signal.signal(USR1, lambda signum, frame: calls.append(signum))
    previous = signal.getsignal(USR1)
    rc = controls(signals=(USR1,))
    t = threading.Thread(target=rc.close)
    t.start()
    t.join()
    assert signal.getsignal(USR1) is not previous  # could not be restored from that thread
    os.kill(os.getpid(), USR1)
    assert calls == [USR1]
    assert signal.getsignal(USR1) is previous  # restored by the handler itself
    assert rc.catcher.received == 0  # closed: not recorded


def test_installing_from_another_thread_is_refused_by_name():
    errors = []

    def build() -> None:
        try:
            RunControl(SavePolicy(), signals=(USR1,))
        except CheckpointError as e:
            errors.append(str(e))

    t = threading.Thread(target=build, name="trainer-thread")
    t.start()
    t.join()
    assert len(errors) == 1 and "main thread" in errors[0] and "trainer-thread" in errors[0]


@pytest.mark.parametrize("sig, words", [(signal.SIGKILL, "cannot be caught"), ("SIGNOPE", "unknown signal"),
                                        (99999, "not a signal")])
def test_uncatchable_or_unknown_signals_are_refused(sig, words):
    with pytest.raises(CheckpointError, match=words):
        SignalCatcher([sig])


def test_signal_names_are_accepted(controls):
    rc = controls(signals=("USR1", "SIGUSR2", signal.SIGUSR1))
    assert rc.catcher.signals == (signal.SIGUSR1, signal.SIGUSR2)


def test_request_preemption_from_a_watchdog_thread(controls):
    rc = controls(signals=(USR1,))
    t = threading.Thread(target=rc.request_preemption)
    t.start()
    t.join()
    assert rc.should_save(7).signal == signal.SIGTERM


def test_clock_in_one_process(controls):
    clock = FakeClock()
    rc = controls(SavePolicy(save_every_seconds=10, clock=clock))
    clock.now = 9
    assert not rc.should_save(1)
    clock.now = 10
    assert rc.should_save(2)
    assert rc.should_save(3)  # still due: no save was made
    rc.note_saved(durable=True)
    assert not rc.should_save(4)
    assert not rc.preempted  # a clock save is no preemption


def test_agree_every_k_calls(controls):
    rc = controls(signals=(USR1,), agree_every=3)
    answers = []
    for step in range(1, 8):
        if step == 2:
            os.kill(os.getpid(), USR1)
        answers.append(bool(rc.should_save(step)))
    assert answers == [False, False, False, True, False, False, False]


# ---------------------------------------------------------------------- SIG_DFL, in a child

_CHILD = textwrap.dedent("""
    import os, signal, sys, threading
    from ckptguard.core.policy import SavePolicy
    from ckptguard.runcontrol import RunControl
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rc = RunControl(SavePolicy(), signals=(signal.SIGTERM,))
    os.kill(os.getpid(), signal.SIGTERM)
    print("survived", int(rc.should_save(1).signal), flush=True)
    if sys.argv[1] == "main":
        rc.close()
    else:
        t = threading.Thread(target=rc.close); t.start(); t.join()
    os.kill(os.getpid(), signal.SIGTERM)
    print("still alive after close", flush=True)
""")


@pytest.mark.parametrize("closer", ["main", "thread"])
def test_sigterm_default_does_not_kill_before_the_save_and_does_after_close(closer):
    out = subprocess.run([sys.executable, "-c", _CHILD, closer], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == [f"survived {int(signal.SIGTERM)}"], out.stderr
    assert out.returncode == -signal.SIGTERM


# ---------------------------------------------------------------------- two ranks


def _rank(rank: int, init: str, out: str) -> None:
    """Every two-rank scenario in one process group (spawning costs more than the checks)."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    group = dist.new_group(backend="gloo")
    result: dict = {}

    def record() -> None:
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))

    # a signal delivered to rank 1 only
    rc = RunControl(SavePolicy(), signals=(USR1,), group=group)
    answers = []
    for step in range(1, 6):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), USR1)
        answers.append([step, rc.should_save(step).signal])
    result["signal"] = answers
    rc.close()

    # rank 0's clock decides; rank 1's runs three times as fast and is ignored
    clock = FakeClock()
    rc = RunControl(SavePolicy(save_every_seconds=5, clock=clock), group=group)
    saved = []
    for step in range(1, 30):
        clock.now += 1.0 if rank == 0 else 3.0
        if rc.should_save(step):
            saved.append(step)
            rc.note_saved(durable=True)
    result["clock"] = saved

    # ranks asking about different steps
    rc = RunControl(SavePolicy(), signals=(USR1,), group=group)
    try:
        rc.should_save(10 + rank)
    except CheckpointError as e:
        result["steps"] = str(e)

    # the peer dies between two steps
    rc.should_save(1)
    rc.close()
    if rank == 1:
        record()
        os._exit(0)
    started = time.monotonic()
    try:
        rc.should_save(2)
    except CommitError as e:
        result["dead"] = str(e)
    result["dead_seconds"] = time.monotonic() - started
    record()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    tmp_path = tmp_path_factory.mktemp("runcontrol")
    init = f"file://{tmp_path / 'store'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, init, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_ranks_agree_on_a_signal_one_rank_received(two_ranks):
    r0, r1 = two_ranks
    assert r0["signal"] == r1["signal"] == [[1, 0], [2, 0], [3, USR1], [4, 0], [5, 0]]


def test_two_ranks_save_the_steps_rank0s_clock_says(two_ranks):
    r0, r1 = two_ranks
    assert r0["clock"] == r1["clock"] == [5, 10, 15, 20, 25]


def test_ranks_asking_about_different_steps_are_told(two_ranks):
    r0, r1 = two_ranks
    assert "different steps (from 10 to 11" in r0["steps"] and "this rank: 10" in r0["steps"]
    assert "this rank: 11" in r1["steps"]


def test_a_dead_peer_fails_should_save_fast(two_ranks):
    r0, _ = two_ranks
    assert "should_save(2): the ranks could not agree" in r0["dead"]
    assert r0["dead_seconds"] < 30


# ---------------------------------------------------------------------- through the manager


def _trainer(seed: int = 0):
    from tests._helpers import make_loader, make_training_objects

    model, optimizer, scheduler = make_training_objects(seed)
    return model, optimizer, scheduler, make_loader()


def _tensors(model, optimizer) -> dict:
    from tests._helpers import clone_tensors, optimizer_tensors

    return {**clone_tensors(dict(model.state_dict())),
            **{f"opt.{k}": v.clone() for k, v in optimizer_tensors(optimizer).items()}}


def _resumed_tensors(root) -> tuple[int, dict]:
    from ckptguard import CheckpointManager

    model, optimizer, scheduler, loader = _trainer(seed=99)  # another init: all must load
    with CheckpointManager(root, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           dataloader=loader) as mgr:
        step = mgr.load()
    return step, _tensors(model, optimizer)


def test_manager_preemption_waits_for_the_async_save_in_flight(tmp_path):
    """The user's loop: async saves every 2 steps; SIGUSR1 arrives at step 3, while the save of
    step 2 is in flight. should_save(3) says save; after save(3, blocking=False) returns,
    preempted is true and step 3 is durable (loadable by a new process), not merely started."""
    import torch.nn.functional as F

    from ckptguard import CheckpointManager
    from tests._helpers import assert_tensors_equal

    model, optimizer, scheduler, loader = _trainer()
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(root, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                            dataloader=loader, save_every_steps=2, save_on_signals=(USR1,))
    step = mgr.load()
    saved = []
    for x, y in loader:
        step += 1
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step == 3:
            os.kill(os.getpid(), USR1)
        if mgr.should_save(step):
            mgr.save(step, metrics={"loss": loss.item()}, blocking=False)
            saved.append(step)
            if step == 2:
                assert not mgr.preempted
        if mgr.preempted:
            break
    assert step == 3 and saved == [2, 3]
    assert mgr.steps() == [2, 3]  # both committed when preempted turned true
    expected = _tensors(model, optimizer)
    mgr.close()
    assert signal.getsignal(USR1) is not mgr.run_control.catcher._handle  # restored by close
    resumed_step, resumed = _resumed_tensors(root)
    assert resumed_step == 3
    assert_tensors_equal(expected, resumed, "state at the preemption")


def test_manager_a_second_signal_during_the_save_corrupts_nothing(tmp_path):
    from ckptguard import CheckpointManager
    from tests._helpers import assert_tensors_equal, train_steps

    class SignalsWhileSaved:
        """An extra whose state_dict() runs in the middle of the save: a signal arrives then."""

        def state_dict(self):
            os.kill(os.getpid(), USR1)
            return {"n": 1}

        def load_state_dict(self, state):
            pass

    model, optimizer, scheduler, loader = _trainer()
    root = tmp_path / "ckpt"
    with CheckpointManager(root, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                           extra={"probe": SignalsWhileSaved()}, save_on_signals=(USR1,)) as mgr:
        train_steps(model, optimizer, scheduler, 2)
        os.kill(os.getpid(), USR1)
        assert mgr.should_save(2).signal == USR1
        mgr.save(2)
        assert mgr.preempted
        expected = _tensors(model, optimizer)
        assert mgr.run_control.catcher.received == 2
    model2, optimizer2, scheduler2, _ = _trainer(seed=5)
    with CheckpointManager(root, model=model2, optimizer=optimizer2, lr_scheduler=scheduler2,
                           extra={"probe": SignalsWhileSaved()}) as mgr2:
        assert mgr2.load() == 2
    assert_tensors_equal(expected, _tensors(model2, optimizer2), "state saved during a signal")


def test_manager_signal_handlers_only_when_asked(tmp_path):
    from ckptguard import CheckpointManager

    before = signal.getsignal(signal.SIGTERM)
    model, optimizer, scheduler, _ = _trainer()
    with CheckpointManager(tmp_path / "ckpt", model=model, optimizer=optimizer,
                           save_every_steps=5) as mgr:
        assert signal.getsignal(signal.SIGTERM) is before
        assert [s for s in range(1, 11) if mgr.should_save(s)] == [5, 10]
        assert not mgr.preempted


def test_manager_clock(tmp_path):
    from ckptguard import CheckpointManager

    clock = FakeClock()
    model, optimizer, _, _ = _trainer()
    with CheckpointManager(tmp_path / "ckpt", model=model, optimizer=optimizer,
                           save_every_seconds=60) as mgr:
        mgr.run_control.policy.clock = clock
        mgr.run_control.policy.note_saved()  # the clock starts now
        clock.now = 59
        assert not mgr.should_save(1)
        clock.now = 61
        assert mgr.should_save(2)
        mgr.save(2)
        assert not mgr.should_save(3)  # the save restarted the clock
        clock.now = 122
        assert mgr.should_save(4)
