"""Kill tests: SIGKILL a training process at every phase of a save; nothing good may be lost.

A trainer (``_kill_trainer.py``: the demo's TinyLM on its learnable data, a save every 2 steps,
``keep_last=2``) is started with ``CKPTGUARD_FAULT`` naming one phase of one save; the fault
hook SIGKILLs the process exactly there (deterministic, no sleeps). Then, for every kill:

1. the newest *complete* checkpoint on disk is the one the phase implies (the previous save if
   the kill came before the atomic rename, the new one after it), and its content equals, value
   for value, the same step of one uninterrupted reference run;
2. a new process's ``load()`` returns that step, and its live state right after ``load()``
   (every parameter and optimizer tensor, every RNG stream) equals the reference's right after
   it saved that step (``torch.equal``);
3. the resumed run's losses equal the reference's, float for float, and so does its final
   checkpoint; no leftover ``.partial``/``.deleting`` directory survives the resume.

The CI matrix covers every phase with one rank (sync and async saves) and the phases where
ranks interact with two ranks under torchrun (FSDP2). ``CKPTGUARD_SOAK=N pytest -m slow
tests/e2e/test_kill.py`` adds every phase on either rank at any save, and kills from outside
at random instants (the whole process group, as a node preemption would), N of each.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ckptguard.core.commit import CheckpointLayout
from ckptguard.core.format import step_dirname
from ckptguard.demo import make_dataset
from ckptguard.testing import faults
from ckptguard.tools.reader import load_checkpoint, values_equal

TRAINER = Path(__file__).with_name("_kill_trainer.py")
TOTAL_STEPS = 8
SAVE_EVERY = 2
KEEP_LAST = 2
SAVE_STEPS = list(range(SAVE_EVERY, TOTAL_STEPS + 1, SAVE_EVERY))  # 2, 4, 6, 8
PROCESS_TIMEOUT_S = 300
SOAK = int(os.environ.get("CKPTGUARD_SOAK", "0") or 0)

# Phases reached after the atomic rename: a kill there leaves the new checkpoint complete.
AFTER_RENAME = {"renamed", "prune_start", "prune_deleting", "prune_removing"}
# Reached only when retention deletes something: first at the save of step 6 (keep_last=2).
PRUNE_POINTS = {"prune_deleting", "prune_removing"}
# Reached in the background deleter thread, while training goes on: by the time it fires, the
# trainer may have committed its next save too.
BACKGROUND_DELETION = {"prune_removing"}
RANK0_ONLY = {
    "dcp_metadata", "commit_start", "manifest_written", "overwrite_replaced", "renamed",
    "prune_start", "prune_deleting", "prune_removing",
}
# Phases on the caller's thread in both modes; async differs only in the background phases.
MAIN_THREAD = {"partial_created", "rank_file_written"}
SYNC_POINTS = [p for p in faults.POINTS if p != "async_commit_start"]
ASYNC_POINTS = [p for p in faults.POINTS if p not in MAIN_THREAD]


@dataclass(frozen=True)
class KillCase:
    nproc: int
    mode: str  # "sync" | "async"
    point: str | None  # None: killed from outside, ``at_fraction`` into the training loop
    save_step: int = 6  # the save (or, for prune points, the save whose retention) it hits
    rank: int | None = None
    at_fraction: float = 0.0

    @property
    def resave_at(self) -> int | None:
        return self.save_step if self.point == "overwrite_replaced" else None

    @property
    def fault(self) -> str | None:
        if self.point is None:
            return None
        if self.point in PRUNE_POINTS:
            hit = SAVE_STEPS.index(self.save_step) - KEEP_LAST + 1
        elif self.point == "overwrite_replaced":
            hit = 1
        else:
            hit = SAVE_STEPS.index(self.save_step) + 1
        spec = f"{self.point}:action=kill:hit={hit}"
        return spec + (f":rank={self.rank}" if self.rank is not None else "")

    def expected_steps(self) -> set[int] | None:
        """Newest complete step(s) after the kill; ``None``: any saved step (random kill)."""
        if self.point is None:
            return None
        before = self.save_step - SAVE_EVERY
        if self.point in BACKGROUND_DELETION:
            return {s for s in (self.save_step, self.save_step + SAVE_EVERY) if s <= TOTAL_STEPS}
        if self.point in AFTER_RENAME or self.point == "overwrite_replaced":
            return {self.save_step}
        if self.nproc > 1 and self.mode == "async" and self.point == "done_record_written" and self.rank != 0:
            # The dead rank's files are durable and recorded: rank 0 may commit them before
            # torchrun stops it. Either outcome is a complete checkpoint; both are checked.
            return {before, self.save_step}
        return {before}

    def id(self) -> str:
        what = self.point or f"external-at-{self.at_fraction:.3f}"
        rank = f"-rank{self.rank}" if self.rank is not None else ""
        return f"{self.nproc}rank-{self.mode}-{what}-step{self.save_step}{rank}"


def ci_cases() -> list[KillCase]:
    cases = [KillCase(1, "sync", p) for p in SYNC_POINTS]
    cases += [KillCase(1, "async", p) for p in ASYNC_POINTS]
    # Two ranks: a non-coordinator dying mid-write, before and after its done record, and the
    # coordinator dying inside the commit and inside retention.
    cases += [
        KillCase(2, "sync", "dcp_write", rank=1),
        KillCase(2, "sync", "manifest_written", rank=0),
        KillCase(2, "async", "dcp_done", rank=1),
        KillCase(2, "async", "prune_deleting", rank=0),
        KillCase(2, "sync", "prune_removing", rank=0),
    ]
    return cases


def soak_cases(n: int) -> list[KillCase]:
    rng = random.Random(os.environ.get("CKPTGUARD_SOAK_SEED", "0"))
    cases = []
    for nproc in (1, 2):
        for mode in ("sync", "async"):
            points = SYNC_POINTS if mode == "sync" else ASYNC_POINTS
            for _ in range(n):
                point = rng.choice(points)
                steps = SAVE_STEPS[KEEP_LAST:] if point in PRUNE_POINTS else SAVE_STEPS
                rank = None
                if nproc > 1:
                    rank = 0 if point in RANK0_ONLY else rng.randrange(nproc)
                cases.append(KillCase(nproc, mode, point, rng.choice(steps), rank))
                cases.append(KillCase(nproc, mode, None, at_fraction=rng.uniform(0.0, 1.0)))
    return cases


# ---------------------------------------------------------------- running the trainer


def _launch(
    nproc: int, ckpt: Path, out: Path, data: Path, *, mode: str = "sync", keep_last: int = KEEP_LAST,
    fault: str | None = None, resave_at: int | None = None, kill_after_s: float | None = None,
) -> tuple[int, str]:
    """``kill_after_s``: SIGKILL the whole run that long after its training loop started."""
    """Run the trainer (under torchrun if ``nproc > 1``); return (exit status, log).
    Whatever happens, no process of that run outlives the call."""
    args = [
        str(TRAINER), "--ckpt-dir", str(ckpt), "--out-dir", str(out), "--data", str(data),
        "--total-steps", str(TOTAL_STEPS), "--save-every", str(SAVE_EVERY), "--mode", mode,
        "--keep-last", str(keep_last), "--snapshots",
    ]
    if resave_at is not None:
        args += ["--resave-at", str(resave_at)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(faults.ENV_VAR, None)
    if fault is not None:
        env[faults.ENV_VAR] = fault
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            if kill_after_s is not None:
                started = out / "loaded-rank0.json"  # written just before the first step
                deadline = time.monotonic() + PROCESS_TIMEOUT_S
                while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                try:
                    proc.wait(timeout=kill_after_s)
                except subprocess.TimeoutExpired:
                    _kill_run(proc.pid, out)  # every rank at once, like a lost node
            proc.wait(timeout=PROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"trainer hung for {PROCESS_TIMEOUT_S}s: {' '.join(cmd)}; log {log_path}")
        finally:
            _kill_run(proc.pid, out)
            proc.wait()
    return proc.returncode, log_path.read_text()


def _kill_run(pgid: int, out: Path) -> None:
    """SIGKILL the launched process group and every process of this run outside it: torchrun
    starts each worker in a session of its own, so killing torchrun's group would leave the
    ranks running (and writing into the root). Workers are found by their command line, which
    holds this run's unique ``--out-dir``."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    marker = f"--out-dir\0{out}\0".encode()
    deadline = time.monotonic() + 30
    while True:
        alive = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "cmdline").read_bytes():  # empty once it is a zombie
                    os.kill(int(entry.name), signal.SIGKILL)
                    alive.append(int(entry.name))
            except OSError:
                pass  # gone meanwhile, or not ours to read
        if not alive:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"processes {alive} of the run writing {out} survived SIGKILL")
        time.sleep(0.05)


def _losses(out: Path, rank: int) -> dict[int, str]:
    path = out / f"losses-rank{rank}.jsonl"
    if not path.exists():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in recs}


def _assert_checkpoints_equal(a: Path, b: Path) -> int:
    """Every value of checkpoint ``a`` equals that of ``b`` (tensors: torch.equal, dtype too)."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert set(ca) == set(cb), f"{a} vs {b}: keys differ: {sorted(set(ca) ^ set(cb))[:10]}"
    bad = [k for k in ca if not values_equal(ca[k], cb[k])]
    assert not bad, f"{a} differs from {b} in {len(bad)} values, e.g. {bad[:5]}"
    return len(ca)


def _assert_live_equal(a: Path, b: Path) -> None:
    sa = torch.load(a, weights_only=False)
    sb = torch.load(b, weights_only=False)
    assert set(sa) == set(sb), f"{a} vs {b}: keys differ: {sorted(set(sa) ^ set(sb))}"
    bad = [
        k for k in sa
        if not (torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k])
    ]
    assert not bad, f"live state after load ({a.name}) differs from the state saved ({b.name}): {bad}"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("kill-data") / "tokens.npy", n_tokens=2048)


@pytest.fixture(scope="module")
def references(tmp_path_factory, data):
    """One uninterrupted run per world size, keeping every checkpoint; run on first use."""
    runs: dict[int, tuple[Path, Path, float]] = {}

    def get(nproc: int) -> tuple[Path, Path, float]:
        """(checkpoint root, output dir, seconds its training loop took) of the reference run."""
        if nproc not in runs:
            base = tmp_path_factory.mktemp(f"kill-ref-{nproc}")
            out = base / "out"
            code, log = _launch(nproc, base / "ckpt", out, data, keep_last=0)
            assert code == 0, f"reference run failed (exit {code}):\n{log[-3000:]}"
            steps = CheckpointLayout(base / "ckpt").complete_steps()
            assert steps == SAVE_STEPS, f"reference run saved {steps}, expected {SAVE_STEPS}"
            train_s = (out / "finished-rank0").stat().st_mtime - (out / "loaded-rank0.json").stat().st_mtime
            runs[nproc] = (base / "ckpt", out, train_s)
        return runs[nproc]

    return get


@pytest.fixture(scope="module")
def summary(request):
    """Collects one row per kill and prints the table docs/reliability.md is built from."""
    rows: list[dict] = []
    yield rows
    if not rows:
        return
    lines = [f"kill tests: {len(rows)} kills recovered and resumed bit-exactly"]
    counts: dict[tuple, list[int]] = {}
    for r in rows:
        key = (r["nproc"], r["mode"], r["point"])
        counts.setdefault(key, []).append(r["loaded"])
    for (nproc, mode, point), loaded in sorted(counts.items(), key=lambda kv: str(kv[0])):
        lines.append(f"  {nproc} rank(s) {mode:5} {point:22} x{len(loaded):<3} loaded steps {sorted(set(loaded))}")
    text = "\n".join(lines)
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n" + text)
    if os.environ.get("CKPTGUARD_KILL_SUMMARY"):
        Path(os.environ["CKPTGUARD_KILL_SUMMARY"]).write_text(json.dumps(rows, indent=1))


# ---------------------------------------------------------------- the check


def check_kill(case: KillCase, tmp_path: Path, data: Path, references, summary) -> None:
    ref_ckpt, ref_out, ref_train_s = references(case.nproc)
    ckpt, out_kill, out_resume = tmp_path / "ckpt", tmp_path / "killed", tmp_path / "resumed"

    code, log = _launch(
        case.nproc, ckpt, out_kill, data, mode=case.mode, fault=case.fault,
        resave_at=case.resave_at,
        kill_after_s=case.at_fraction * ref_train_s if case.point is None else None,
    )
    if case.point is not None:
        # The fault must have fired where planned: a test whose fault never fires proves nothing.
        marker = f"ckptguard-fault: SIGKILL at fault point '{case.point}'"
        assert marker in log, f"{case.id()}: fault did not fire (exit {code}):\n{log[-3000:]}"
        if case.nproc == 1:
            assert code == -signal.SIGKILL, f"{case.id()}: exit {code}, expected SIGKILL"
        else:
            assert code != 0, f"{case.id()}: torchrun exited 0 although a rank was killed"

    # 1. on disk: the newest complete checkpoint, identical to the reference's. Looked at in a
    # copy after the recovery a manager runs when it opens the root (an overwrite killed between
    # its renames is put back there); the resumed process below recovers the original itself.
    inspect = tmp_path / "inspect"
    if ckpt.exists():  # a random kill may come before the trainer created the root
        shutil.copytree(ckpt, inspect)
    CheckpointLayout(inspect).recover()
    steps = CheckpointLayout(inspect).complete_steps()
    newest = steps[-1] if steps else 0
    expected = case.expected_steps()
    if expected is not None:
        assert newest in expected, (
            f"{case.id()}: newest complete checkpoint after the kill is step {newest}, expected "
            f"{sorted(expected)}; on disk: {sorted(p.name for p in ckpt.iterdir())}"
        )
    for step in steps:
        assert step in SAVE_STEPS
        _assert_checkpoints_equal(inspect / step_dirname(step), ref_ckpt / step_dirname(step))
    shutil.rmtree(inspect, ignore_errors=True)

    # 2. a new process loads exactly that, 3. and resumes bit-exactly
    code, log = _launch(case.nproc, ckpt, out_resume, data, mode=case.mode)
    assert code == 0, f"{case.id()}: resumed run failed (exit {code}):\n{log[-3000:]}"
    for rank in range(case.nproc):
        loaded = json.loads((out_resume / f"loaded-rank{rank}.json").read_text())["step"]
        assert loaded == newest, f"{case.id()}: rank {rank} load() returned {loaded}, newest complete is {newest}"
        if newest:
            _assert_live_equal(
                out_resume / f"live-load-step{newest}-rank{rank}.pt",
                ref_out / f"live-save-step{newest}-rank{rank}.pt",
            )
        ref, got = _losses(ref_out, rank), _losses(out_resume, rank)
        want = {s: v for s, v in ref.items() if s > newest}
        assert got == want, (
            f"{case.id()}: rank {rank}: resumed losses differ from the uninterrupted run at steps "
            f"{sorted(s for s in set(got) | set(want) if got.get(s) != want.get(s))}"
        )
    final = step_dirname(TOTAL_STEPS)
    nvalues = _assert_checkpoints_equal(ckpt / final, ref_ckpt / final)
    layout = CheckpointLayout(ckpt)
    assert layout.transient_dirs() == [], f"{case.id()}: leftovers {layout.transient_dirs()}"
    assert layout.complete_steps() == SAVE_STEPS[-KEEP_LAST:]
    summary.append({
        "nproc": case.nproc, "mode": case.mode, "point": case.point or "external SIGKILL",
        "rank": case.rank, "save_step": case.save_step, "loaded": newest,
        "resumed_losses": sum(len([s for s in _losses(ref_out, r) if s > newest]) for r in range(case.nproc)),
        "final_values_equal": nvalues,
    })


@pytest.mark.parametrize("case", ci_cases(), ids=KillCase.id)
def test_kill_during_save(case, tmp_path, data, references, summary):
    check_kill(case, tmp_path, data, references, summary)


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak mode: set CKPTGUARD_SOAK=N (kills per world size and mode)")
@pytest.mark.parametrize("case", soak_cases(SOAK) if SOAK else [], ids=KillCase.id)
def test_kill_soak(case, tmp_path, data, references, summary):
    check_kill(case, tmp_path, data, references, summary)


def test_case_matrix_covers_every_phase():
    """The CI matrix kills at every fault point in each mode it applies to (a new point added
    to ``faults.POINTS`` without a kill test fails here)."""
    cases = ci_cases()
    assert {c.point for c in cases if c.nproc == 1 and c.mode == "sync"} == set(SYNC_POINTS)
    assert {c.point for c in cases if c.nproc == 1 and c.mode == "async"} == set(ASYNC_POINTS)
    assert {c.nproc for c in cases} == {1, 2}


def test_fault_spec_is_validated():
    """A misspelt fault point is an error, not a fault that silently never fires."""
    with pytest.raises(ValueError, match="unknown fault point 'dcp_wirte'"):
        faults.FaultSpec.parse("dcp_wirte:hit=3")
    with pytest.raises(ValueError, match="action must be one of"):
        faults.FaultSpec.parse("dcp_write:action=explode")
    spec = faults.FaultSpec.parse("renamed:rank=1:hit=2:action=raise")
    assert (spec.point, spec.rank, spec.hit, spec.action) == ("renamed", 1, 2, "raise")


def test_naive_save_loses_the_checkpoint_on_kill(tmp_path):
    """Fail-on-bug: what ckptguard's protocol prevents. A trainer that writes with torch.save
    straight into its one checkpoint file and is killed mid-write is left with a torn file:
    the last good state is gone, not merely the new one."""
    script = (
        "import os, signal, sys, torch\n"
        "path = sys.argv[1]\n"
        "torch.save({'w': torch.zeros(1000)}, path)\n"  # the last good checkpoint
        "f = open(path, 'wb')\n"  # the naive overwrite of the same file ...
        "f.write(b'PK'); f.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"  # ... preempted after its first bytes
    )
    path = tmp_path / "ckpt.pt"
    proc = subprocess.run([sys.executable, "-c", script, str(path)], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(Exception):  # noqa: B017 - any failure: the old state is unreadable
        torch.load(path, weights_only=True)
