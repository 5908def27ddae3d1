"""Preemption, the clock and retention across restarts, end to end: torchrun, 2 ranks, a real
trainer file (``trainers/preemptible.py``) written as docs/run-control.md tells users to.

One run is preempted three times, each time as a scheduler would do it, and resumed each time:

1. SIGTERM to ONE worker (a kill of one PID): both ranks save the same step, exit 0, torchrun 0;
2. SIGTERM to the torchrun agent (Kubernetes): forwarded; both ranks save and exit 0, and
   torchrun exits 1, as torch's agent does after any forwarded signal;
3. SIGUSR1 to the agent started with ``--signals-to-handle=...,SIGUSR1`` (SLURM's
   ``--signal=B:USR1@120``): the same;
4. a last leg runs to the end.

Its losses and final model and optimizer tensors must equal an uninterrupted run's bit for bit.
Saves are async, so a preemption arrives with a save in flight. The uninterrupted run saves on a
short clock with one rank slower than the other: both ranks must save the same steps. Retention
(keep_last, keep_every, keep_best by loss) must leave exactly what the rules say of every
checkpoint the four processes wrote. A last run loses a peer: the survivor, SIGTERMed by
torchrun, must fail fast with our error instead of waiting for the SIGKILL.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests._helpers import launcher_free_env

REPO = Path(__file__).resolve().parents[2]
TRAINER = REPO / "tests" / "e2e" / "trainers" / "preemptible.py"
TOTAL = 36
# keep_last=2, keep_every=12 and keep_best=1 by loss; async saves every 6 steps
LEG_ARGS = ["--total-steps", str(TOTAL), "--save-every-steps", "6", "--keep-last", "2",
            "--keep-every", "12", "--keep-best", "1", "--async-save", "--step-seconds", "0.02"]
ALL_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
_LAUNCHED: list[subprocess.Popen] = []  # killed at the end of the module if still running


def _launch(ckpt: Path, out: Path, args: list[str], signals_to_handle: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    if signals_to_handle:
        cmd.append(f"--signals-to-handle={signals_to_handle}")
    cmd += [str(TRAINER), "--ckpt-dir", str(ckpt), "--out-dir", str(out), *args]
    env = dict(launcher_free_env(), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    log = open(out.parent / f"{out.name}-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=REPO)
    proc.log_path = log.name  # type: ignore[attr-defined]
    _LAUNCHED.append(proc)
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"torchrun did not exit in {timeout}s:\n{Path(proc.log_path).read_text()[-4000:]}")
    return rc, Path(proc.log_path).read_text()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 60) -> None:
    """Until every rank has logged ``step`` (the workers are past load() and in the loop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(any(r["step"] >= step for r in _lines(out / f"steps-rank{k}.jsonl")) for k in (0, 1)):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}:\n{Path(proc.log_path).read_text()[-4000:]}")
        time.sleep(0.05)
    pytest.fail(f"no step {step} within {timeout}s")


def _complete_steps(ckpt: Path) -> set[int]:
    return {int(p.name[5:]) for p in ckpt.glob("step-*") if (p / "ckptguard.json").is_file()}


def _exits(out: Path) -> list[dict]:
    records = []
    for rank in (0, 1):
        path = out / f"exit-rank{rank}.json"
        assert path.exists(), f"rank {rank} did not exit cleanly (no {path.name})"
        records.append(json.loads(path.read_text()))
        path.unlink()  # the next leg writes its own
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict]:
    try:
        yield _run_everything(tmp_path_factory.mktemp("preemption"))
    finally:  # a failed wait leaves no torchrun behind
        for proc in _LAUNCHED:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _run_everything(base: Path) -> dict:
    # the uninterrupted reference, saving on a short clock with rank 1 twice as slow
    ref_ckpt, ref_out = base / "ref-ckpt", base / "ref-out"
    ref_out.mkdir()
    ref = _launch(ref_ckpt, ref_out, ["--total-steps", str(TOTAL), "--save-every-seconds", "0.3",
                                      "--step-seconds", "0.02", "--slow-rank", "1", "--keep-last", "1"])
    # and, beside it, a run whose rank 1 dies at step 6
    dead_out = base / "dead-out"
    dead_out.mkdir()
    dead_started = time.monotonic()
    dead = _launch(base / "dead-ckpt", dead_out, ["--total-steps", "40", "--save-every-steps", "4",
                                                  "--step-seconds", "0.02", "--crash-rank", "1",
                                                  "--crash-at-step", "6"])
    dead_exit: dict[str, float] = {}
    threading.Thread(target=lambda: dead_exit.setdefault("at", (dead.wait(), time.monotonic())[1]),
                     daemon=True).start()

    ckpt, out = base / "ckpt", base / "out"
    out.mkdir()
    legs = []
    # 1. SIGTERM to one worker
    proc = _launch(ckpt, out, LEG_ARGS)
    _wait_for_step(proc, out, 7)
    os.kill(int((out / "pid-rank1").read_text()), signal.SIGTERM)
    legs.append((*_finish(proc), _exits(out), _complete_steps(ckpt)))
    # 2. SIGTERM to the torchrun agent
    proc = _launch(ckpt, out, LEG_ARGS)
    _wait_for_step(proc, out, legs[-1][2][0]["step"] + 5)
    os.kill(proc.pid, signal.SIGTERM)
    legs.append((*_finish(proc), _exits(out), _complete_steps(ckpt)))
    # 3. SIGUSR1 to an agent told to forward it
    proc = _launch(ckpt, out, LEG_ARGS, signals_to_handle=ALL_SIGNALS)
    _wait_for_step(proc, out, legs[-1][2][0]["step"] + 5)
    os.kill(proc.pid, signal.SIGUSR1)
    legs.append((*_finish(proc), _exits(out), _complete_steps(ckpt)))
    # 4. to the end
    proc = _launch(ckpt, out, LEG_ARGS)
    legs.append((*_finish(proc), _exits(out), _complete_steps(ckpt)))

    dead_rc, dead_log = _finish(dead)
    ref_rc, ref_log = _finish(ref)
    return {"ckpt": ckpt, "out": out, "legs": legs, "ref_out": ref_out, "ref": (ref_rc, ref_log, _exits(ref_out)),
            "dead": (dead_rc, dead_log, dead_out, dead_exit["at"] - dead_started)}


@pytest.mark.parametrize("leg, torchrun_rc", [(0, 0), (1, 1), (2, 1)],
                         ids=["sigterm-one-worker", "sigterm-agent", "sigusr1-agent"])
def test_every_rank_saves_the_same_step_and_exits_0(runs, leg, torchrun_rc):
    rc, log, exits, on_disk = runs["legs"][leg]
    assert rc == torchrun_rc, log[-4000:]
    assert exits[0] == exits[1], exits
    assert exits[0]["preempted"], exits
    assert exits[0]["step"] in on_disk  # durable when the trainer left (the save was async)
    assert "exitcode" not in log, log[-4000:]  # torchrun names any worker that did not exit 0


def test_the_preempted_steps_were_saved_and_the_run_resumed_from_them(runs):
    steps = [leg[2][0]["step"] for leg in runs["legs"]]
    assert steps[:3] == sorted(steps[:3]) and len(set(steps[:3])) == 3, steps
    assert steps[3] == TOTAL
    saves = _lines(runs["out"] / "saves-rank0.jsonl")
    for preempted in steps[:3]:
        reasons = [s["reasons"] for s in saves if s["step"] == preempted]
        assert reasons and any("signal" in r for r in reasons[-1]), (preempted, saves)
    assert _lines(runs["out"] / "saves-rank0.jsonl") == _lines(runs["out"] / "saves-rank1.jsonl")


def test_resumed_run_is_bit_exact(runs):
    ref = {r["step"]: r["loss"] for r in _lines(runs["ref_out"] / "steps-rank0.jsonl")}
    got = _lines(runs["out"] / "steps-rank0.jsonl")
    assert [r["step"] for r in got] == list(range(1, TOTAL + 1)), "a step ran twice or never"
    assert {r["step"]: r["loss"] for r in got} == ref
    assert float.fromhex(ref[TOTAL]) < 0.5 * float.fromhex(ref[1]), "the model did not learn"
    for rank in (0, 1):
        a = torch.load(runs["ref_out"] / f"final-rank{rank}.pt", weights_only=True)
        b = torch.load(runs["out"] / f"final-rank{rank}.pt", weights_only=True)
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), key
        for pid, state in a["optimizer"]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)


def test_clock_saves_the_same_steps_on_every_rank(runs):
    rc, log, exits = runs["ref"]
    assert rc == 0, log[-4000:]
    saves = [_lines(runs["ref_out"] / f"saves-rank{k}.jsonl") for k in (0, 1)]
    assert saves[0] == saves[1]
    clock_saves = [s for s in saves[0] if any("clock" in r for r in s["reasons"])]
    assert len(clock_saves) >= 2, saves[0]


def test_retention_applies_to_checkpoints_of_earlier_processes(runs):
    """What survives four processes equals the rules applied to every save any of them made."""
    losses = {r["step"]: float.fromhex(r["loss"]) for r in _lines(runs["out"] / "steps-rank0.jsonl")}
    saved = sorted({s["step"] for s in _lines(runs["out"] / "saves-rank0.jsonl")})
    expected = set(saved[-2:]) | {s for s in saved if s % 12 == 0}
    expected.add(min(saved, key=lambda s: (losses[s], -s)))
    on_disk = _complete_steps(runs["ckpt"])
    assert on_disk == expected, (saved, on_disk)
    assert not math.isnan(losses[TOTAL])


def test_a_dead_peer_fails_the_survivor_fast(runs):
    """Rank 1 dies; torchrun SIGTERMs rank 0, whose next should_save cannot agree: our error at
    once, not a wait for the SIGKILL 30 s later."""
    rc, log, out, took = runs["dead"]
    assert rc != 0
    assert "the ranks could not agree whether to save" in log, log[-4000:]
    assert "SIGKILL" not in log and "exitcode  : -9" not in log, log[-4000:]
    assert took < 25, (took, log[-4000:])
    assert not (out / "exit-rank0.json").exists()
