"""End to end: deliberately broken resumes are attributed to the right component by the trace.

The trainer is the demo's (TinyLM with dropout on the learnable on-disk token stream, shuffling
``StatefulDataLoader`` with in-dataset augmentation, AdamW, warmup-cosine LR) plus
``mgr.record(step, loss=loss, batch=(x, y))``. Each leg runs in a fresh process
(``ckptguard.testing``), so nothing survives a "preemption" but the files. Broken variants:

* ``restart_loader``: the loader is not handed to the manager, so after a resume it starts a
  new epoch from its beginning -> the trace must blame the dataloader;
* ``reseed``: ``torch.manual_seed(seed)`` after ``load()`` ("set the seed" code run on every
  start) -> dropout masks change, the batch does not -> the trace must blame the RNG.

And the production flow: a run saves at step 12 and is killed (``os._exit``) at step 16 without
any cleanup; the next process resumes from 12 and ``ckptguard audit`` compares 13..16.
The train functions live here, importable as ``tests.e2e.test_guard_e2e:<name>``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ckptguard.demo import TinyLM, TokenWindows, build_optimizer, make_dataset, warmup_cosine
from ckptguard.guard.audit import audit
from ckptguard.manager import CheckpointManager
from ckptguard.testing import ResumeContext, run_resume_check
from tests._helpers import launcher_free_env

REPO_ROOT = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 16
STOP_AT = 6
PROCESS_TIMEOUT_S = 300


def _train(ctx: ResumeContext, *, restart_loader: bool = False, reseed: bool = False) -> None:
    opts = ctx.options
    seed = 0
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset = TokenWindows(opts["data"], ctx.rank, ctx.world_size)
    loader = StatefulDataLoader(dataset, batch_size=16, shuffle=True, drop_last=True)
    model = TinyLM()
    if ctx.world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (ctx.world_size,))
        fully_shard(model.hidden, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = build_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(ctx.total_steps))
    mgr = CheckpointManager(
        ctx.ckpt_dir, model=model, optimizer=optimizer, lr_scheduler=scheduler,
        dataloader=None if restart_loader else loader, keep_last=2,
    )
    step = mgr.load()
    if reseed and step:
        torch.manual_seed(seed)  # the bug: "seed everything" also after a resume
    model.train()
    die_at = opts.get("die_at")
    while step < ctx.total_steps:
        for x, y in loader:
            step += 1
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ctx.record(step, loss)
            mgr.record(step, loss=loss, batch=(x, y))
            if ctx.should_stop(step) or step == opts.get("save_at"):
                mgr.save(step)
                if ctx.should_stop(step):
                    mgr.close()
                    return
            if step == die_at:
                os._exit(0)  # preempted: no close(), no final save, no flush beyond record()'s
            if step >= ctx.total_steps:
                break
    ctx.finish(mgr, step)


def train_clean(ctx: ResumeContext) -> None:
    _train(ctx)


def train_restarting_loader(ctx: ResumeContext) -> None:
    _train(ctx, restart_loader=True)


def train_reseeding(ctx: ResumeContext) -> None:
    _train(ctx, reseed=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(make_dataset(tmp_path_factory.mktemp("data") / "tokens.npy"))


def _check(fn: str, workdir: Path, data: str, nproc: int = 1):
    return run_resume_check(
        f"tests.e2e.test_guard_e2e:{fn}", workdir, total_steps=TOTAL_STEPS, stop_at=STOP_AT,
        options={"data": data}, timeout_s=PROCESS_TIMEOUT_S, nproc=nproc,
    )


def test_clean_resume_has_no_divergence(tmp_path, data):
    report = _check("train_clean", tmp_path, data)
    assert report.exact, report.format()
    assert report.divergence is None and report.nondeterministic is None


def test_restarted_dataloader_is_blamed_on_the_dataloader(tmp_path, data):
    report = _check("train_restarting_loader", tmp_path, data)
    assert not report.exact
    assert report.nondeterministic is None, report.format()
    d = report.divergence
    assert d is not None, report.format()
    assert (d.step, d.cause, d.fields[0]) == (STOP_AT + 1, "dataloader", "batch"), report.format()
    assert "likely cause dataloader" in report.format()


def test_reseeded_rng_is_blamed_on_the_rng(tmp_path, data):
    report = _check("train_reseeding", tmp_path, data)
    assert not report.exact
    d = report.divergence
    assert d is not None, report.format()
    assert (d.step, d.cause) == (STOP_AT + 1, "rng"), report.format()
    assert d.fields == ["rng", "loss"] and "torch" in d.message


def _leg(fn: str, ckpt: Path, out: Path, options: dict, nproc: int = 1) -> None:
    out.mkdir(parents=True, exist_ok=True)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [
        sys.executable, *launcher, "-m", "ckptguard.testing", "--fn", f"tests.e2e.test_guard_e2e:{fn}",
        "--ckpt-dir", str(ckpt), "--out-dir", str(out), "--total-steps", str(TOTAL_STEPS),
        "--options", json.dumps(options),
    ]
    env = launcher_free_env()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("fn, cause", [("train_clean", None), ("train_reseeding", "rng")])
def test_preempted_run_then_audit(tmp_path, data, fn, cause):
    """Killed 4 steps after its last checkpoint; the resumed process's own trace comparison and
    ``ckptguard audit`` (a separate process, from the files alone) agree."""
    ckpt = tmp_path / "ckpt"
    _leg(fn, ckpt, tmp_path / "first", {"data": data, "save_at": 12, "die_at": 16})
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000012"]
    _leg(fn, ckpt, tmp_path / "second", {"data": data})

    result = audit(ckpt)
    (resume,) = result.resumes
    assert resume.resumed_from == 12 and resume.findings == []
    proc = subprocess.run(
        [sys.executable, "-m", "ckptguard", "audit", str(ckpt), "--json"],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S,
    )
    cli = json.loads(proc.stdout)
    if cause is None:
        assert proc.returncode == 0 and resume.divergence is None
        assert resume.compared_steps == 4 and cli["resumes"][0]["compared_steps"] == 4
    else:
        assert proc.returncode == 1
        assert (resume.divergence.step, resume.divergence.cause) == (13, cause)
        assert cli["resumes"][0]["divergence"]["cause"] == cause


@pytest.mark.timeout(900)
def test_two_ranks_fsdp2_clean_and_reseeded(tmp_path, data):
    """Per-rank traces under FSDP2: a clean resume compares every step of both ranks; a
    reseed is blamed on the RNG (every rank reseeds, the earliest step is reported)."""
    clean = _check("train_clean", tmp_path / "clean", data, nproc=2)
    assert clean.exact and clean.divergence is None, clean.format()
    assert sorted(p.name for p in (tmp_path / "clean" / "ckpt-b").glob("trace*.jsonl")) == [
        "trace-rank-00001.jsonl", "trace.jsonl",
    ]
    broken = _check("train_reseeding", tmp_path / "broken", data, nproc=2)
    assert (broken.divergence.step, broken.divergence.cause) == (STOP_AT + 1, "rng"), broken.format()


@pytest.mark.timeout(900)
def test_world_size_change_is_reported_at_load_and_in_the_audit(tmp_path, data):
    """Saved by 2 ranks (FSDP2), resumed by 1 process: the state reshards, the findings say the
    data positions and RNG streams cannot be exact, and the trace is not compared."""
    ckpt = tmp_path / "ckpt"
    _leg("train_clean", ckpt, tmp_path / "first", {"data": data, "save_at": 6, "die_at": 8}, nproc=2)
    _leg("train_clean", ckpt, tmp_path / "second", {"data": data})
    (resume,) = audit(ckpt).resumes
    found = {(f.check, f.component) for f in resume.findings}
    assert found == {("world_size", "dataloader"), ("world_size", "rng")}
    assert "saved by 2 rank(s), resumed on 1" in resume.findings[0].message
    assert resume.divergence is None and "world size changed from 2 to 1" in resume.skipped


def test_the_documented_example_test_passes(tmp_path):
    """examples/test_my_trainer_resumes.py is what users copy: keep it working."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'base'}",
         str(REPO_ROOT / "examples" / "test_my_trainer_resumes.py")],
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, cwd=tmp_path, env=launcher_free_env(),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "1 passed" in proc.stdout
