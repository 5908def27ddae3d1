"""Saving at an epoch boundary resumes into the batch order of the uninterrupted run (issue 10.4).

``tests/e2e/trainers/epoch_boundary_trainer.py`` (DistributedSampler + ``set_epoch`` +
StatefulDataLoader, resume epoch ``divmod(step, steps_per_epoch)``) saves at one position of its
second epoch, a new process resumes it, and every step's samples and loss and the final
checkpoint (parameters, optimizer, every per-rank state) must equal an uninterrupted run's:

* ``first`` / ``middle``: after the first / a middle batch of the epoch;
* ``last``: after the *last* batch, inside the loop (``step % steps_per_epoch == 0``);
* ``exhausted``: after the inner loop, before the next ``set_epoch``;
* ``next_start``: at the top of the next epoch, after its ``set_epoch``, before its first batch;
* ``middle_set_epoch_at_end``: the loop calls ``set_epoch(epoch + 1)`` after each epoch, so the
  resumed partial epoch iterates with no ``set_epoch`` before it;
* ``last_epoch_in_state``: the epoch lives in trainer state (``extra``), so the resumed loop
  re-enters the epoch whose last batch was the save and must get nothing more from it.

Each leg is a fresh process, as in ``ckptguard.testing``, but forked from one warm driver per
(ranks, workers) configuration (``python -m tests.e2e.test_epoch_boundary``, under ``torchrun``
for 2 ranks), so that the matrix does not pay a torch import per leg. An uninterrupted run is
shared by the cells of one trainer variant.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest

from tests._helpers import launcher_free_env

TRAINER = "tests.e2e.trainers.epoch_boundary_trainer:train"
REPO = Path(__file__).resolve().parents[2]
LEG_TIMEOUT_S = 120

# position -> (trainer options, stop_at as a function of steps_per_epoch): all in epoch 1 (the
# second), so that a sampler epoch that is not restored shows as another order
POSITIONS: dict[str, tuple[dict[str, Any], Any]] = {
    "first": ({"save_at": "in_loop"}, lambda s: s + 1),
    "middle": ({"save_at": "in_loop"}, lambda s: s + (s + 1) // 2),
    "last": ({"save_at": "in_loop"}, lambda s: 2 * s),
    "exhausted": ({"save_at": "after_loop"}, lambda s: 2 * s),
    "next_start": ({"save_at": "epoch_start"}, lambda s: 2 * s),
    "middle_set_epoch_at_end": ({"save_at": "in_loop", "set_epoch": "end"}, lambda s: s + (s + 1) // 2),
    "last_epoch_in_state": ({"save_at": "in_loop", "epoch_from": "state"}, lambda s: 2 * s),
}
EPOCHS, SAMPLES, BATCH_SIZE = 3, 24, 4
EVERY_POSITION = ["first", "middle", "last", "exhausted", "next_start"]
MATRIX = {  # (ranks, workers) -> positions; 2 ranks with workers only for the last-batch save
    (1, 0): EVERY_POSITION + ["last_epoch_in_state"],
    (1, 2): EVERY_POSITION + ["middle_set_epoch_at_end"],
    (2, 0): EVERY_POSITION + ["last_epoch_in_state"],
    (2, 2): ["last"],
}
CELLS = [(n, w, p) for (n, w), ps in MATRIX.items() for p in ps]


def _reference(position: str) -> str:
    """The uninterrupted run a cell is compared with: one per trainer variant (the options
    other than where to save), shared by the cells of that variant."""
    options = {k: v for k, v in POSITIONS[position][0].items() if k != "save_at"}
    return "ref-" + "-".join(f"{k}={v}" for k, v in sorted(options.items())) if options else "ref"


def _steps_per_epoch(nproc: int) -> int:
    return -(-SAMPLES // nproc) // BATCH_SIZE


# ------------------------------------------------------------------ the driver (one per rank)


def _leg_args(ckpt: Path, out: Path, total: int, options: dict[str, Any], stop_at: int | None) -> list[str]:
    args = ["--fn", TRAINER, "--ckpt-dir", str(ckpt), "--out-dir", str(out), "--total-steps", str(total),
            "--options", json.dumps(options)]
    return args + (["--stop-at", str(stop_at)] if stop_at is not None else [])


def _run_forked(args: list[str], log: Path, port: int | None) -> int:
    """One leg in a forked child of this warm process; its exit status (-9: killed, timed out)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:  # the leg: a process of its own, as after a preemption
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if port is not None:  # a fresh store per leg, hosted by rank 0
                os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="False")
            from ckptguard.testing.harness import _main

            _main(args)
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the log and the exit status
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + LEG_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.02)


def _drive(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--ports", default="")
    a = p.parse_args(argv)
    import torch

    import tests.e2e.trainers.epoch_boundary_trainer  # noqa: F401 - warm: the legs fork from here

    # the first optimizer built in a process imports torch._dynamo (seconds): once here, not per leg
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])

    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    ports = [int(x) for x in a.ports.split(",") if x] or None
    total = EPOCHS * _steps_per_epoch(nproc)
    legs = []  # (name, checkpoint root, output dir, trainer options, stop_at)
    for workers in sorted(w for n, w in MATRIX if n == nproc):
        root = a.workdir / f"w{workers}"
        for pos in MATRIX[(nproc, workers)]:
            options, stop = POSITIONS[pos]
            options = {"num_workers": workers, **options}
            ref = _reference(pos)
            if not any(leg[0] == f"w{workers}/{ref}/uninterrupted" for leg in legs):
                ref_options = {k: v for k, v in options.items() if k != "save_at"}
                legs.append((f"w{workers}/{ref}/uninterrupted", root / ref / "ckpt-a", root / ref / "uninterrupted", ref_options, None))
            cell = root / pos
            legs.append((f"w{workers}/{pos}/interrupted", cell / "ckpt-b", cell / "interrupted", options, stop(_steps_per_epoch(nproc))))
            legs.append((f"w{workers}/{pos}/resumed", cell / "ckpt-b", cell / "resumed", options, None))
    status: dict[str, Any] = {}
    for i, (name, ckpt, out, opts, stop_at) in enumerate(legs):
        if status.get(name) == "skipped":
            continue
        started = time.monotonic()
        rc = _run_forked(_leg_args(ckpt, out, total, opts, stop_at), out / f"log-rank{os.environ.get('RANK', '0')}.txt",
                         ports[i] if ports else None)
        status[name] = rc
        status[name + ":s"] = round(time.monotonic() - started, 1)
        if name.endswith("/interrupted") and rc != 0:  # no checkpoint to resume from
            status[name.replace("/interrupted", "/resumed")] = "skipped"
    if os.environ.get("RANK", "0") == "0":
        (a.workdir / "status.json").write_text(json.dumps(status))


# ------------------------------------------------------------------ the test


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Any:
    """Runs the legs of every cell with ``nproc`` ranks once (one driver), on first use."""
    done: dict[int, tuple[Path, dict[str, Any]]] = {}

    def get(nproc: int) -> tuple[Path, dict[str, Any]]:
        if nproc not in done:
            workdir = tmp_path_factory.mktemp(f"epoch-boundary-{nproc}r")
            nlegs = sum(3 * len(ps) for (n, _), ps in MATRIX.items() if n == nproc)
            args = ["-m", "tests.e2e.test_epoch_boundary", "--workdir", str(workdir)]
            env = dict(launcher_free_env(), OMP_NUM_THREADS="1")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
            if nproc > 1:
                ports = _free_ports(nlegs)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={nproc}", *args, "--ports", ",".join(map(str, ports))]
            else:
                cmd = [sys.executable, *args]
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            done[nproc] = (workdir, json.loads((workdir / "status.json").read_text()))
        return done[nproc]

    return get


def _batches(*out_dirs: Path) -> dict[int, list[dict[str, Any]]]:
    """{rank: per-step records (step, epoch, samples, exact loss)} of the given legs, in order."""
    out: dict[int, list[dict[str, Any]]] = {}
    for d in out_dirs:
        for path in sorted(d.glob("batches-rank*.jsonl")):
            rank = int(path.stem.removeprefix("batches-rank"))
            out.setdefault(rank, []).extend(json.loads(line) for line in path.read_text().splitlines())
    return out


def _leg_log(d: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(d.glob("log-rank*.txt")))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("nproc,workers,position", CELLS, ids=[f"{n}rank-{w}workers-{p}" for n, w, p in CELLS])
def test_save_at_epoch_position_resumes_exactly(runs, nproc, workers, position):
    from ckptguard.testing import compare_runs

    root, status = runs(nproc)
    workdir = root / f"w{workers}"
    cell = workdir / position
    reference = workdir / _reference(position)
    for leg in (f"{reference.name}/uninterrupted", f"{position}/interrupted", f"{position}/resumed"):
        leg = f"w{workers}/{leg}"
        assert status[leg] == 0, f"{leg} leg failed ({status[leg]}):\n{_leg_log(root / leg)}"

    spe = _steps_per_epoch(nproc)
    ref = _batches(reference / "uninterrupted")
    got = _batches(cell / "interrupted", cell / "resumed")
    assert sorted(ref) == list(range(nproc))
    for rank in ref:
        assert [r["step"] for r in ref[rank]] == list(range(1, EPOCHS * spe + 1))
        # learnable: a repeated or skipped batch changes the losses instead of hiding in noise
        losses = [float.fromhex(r["loss"]) for r in ref[rank]]
        assert sum(losses[-spe:]) < sum(losses[:spe]) - 0.5 * spe, losses
        want = [(r["step"], r["epoch"], r["samples"], r["loss"]) for r in ref[rank]]
        have = [(r["step"], r["epoch"], r["samples"], r["loss"]) for r in got.get(rank, [])]
        first_bad = next((i for i, (w, h) in enumerate(zip(want, have, strict=False)) if w != h), min(len(want), len(have)))
        assert have == want, (
            f"rank {rank}, saved at {position} (step {POSITIONS[position][1](spe)}): resumed order "
            f"differs from step {first_bad + 1}:\n  uninterrupted {want[first_bad:first_bad + 4]}\n"
            f"  resumed       {have[first_bad:first_bad + 4]}"
        )

    for name in ("uninterrupted", "ckpt-a"):  # compare_runs reads them from the cell's directory
        if not (cell / name).exists():
            (cell / name).symlink_to(reference / name)
    report = compare_runs(cell, total_steps=EPOCHS * spe, stop_at=POSITIONS[position][1](spe), nproc=nproc)
    assert report.exact, "\n" + report.format()
    assert {"losses", "model", "optimizer", "dataloader", "rng"} <= {c.name for c in report.components}


def test_last_batch_save_without_sampler_epoch_warns_once(caplog):
    """A shuffling loader without ``set_epoch``: after its last batch ckptguard cannot tell a loop
    that resumes at the next epoch from one that re-enters the ended one, so the save says what
    the resume will do (a new epoch) and how to write the loop."""
    from ckptguard.core.states import DataLoaderState
    from tests._helpers import make_loader

    loader = make_loader(n=8, batch_size=4)
    state = DataLoaderState(loader)
    it = iter(loader)
    next(it)
    with caplog.at_level("WARNING", logger="ckptguard.core.states"):
        state.state_dict()  # mid-epoch: unambiguous
        next(it)
        state.state_dict()
        state.state_dict()
    warnings = [r.getMessage() for r in caplog.records if "last batch" in r.getMessage()]
    assert len(warnings) == 1 and "starts a NEW epoch" in warnings[0], warnings


if __name__ == "__main__":
    _drive(sys.argv[1:])
