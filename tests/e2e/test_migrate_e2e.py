"""End to end: an old trainer's index-keyed checkpoint, migrated, resumes bit-exactly.

The story a user lives through:

1. an "old trainer" (plain PyTorch, no ckptguard) trains K steps and saves
   ``{"model", "optimizer": optimizer.state_dict(), "lr_scheduler", "step"}`` with ``dcp.save``
   or ``torch.save``. Its optimizer has decay / no-decay groups in an order unlike
   ``named_parameters()`` and a tied embedding/output matrix (listed once);
2. the new trainer (CheckpointManager) pointed at that directory refuses to start fresh and
   prints the ``ckptguard migrate`` command; the user runs it (the console script, with
   ``--factory``) and starts the new trainer again;
3. the resumed run must equal a run that never stopped: identical loss floats for every
   step after K, ``torch.equal`` final parameters, moments and scheduler state.

What the old format cannot carry, and how this test keeps the comparison meaningful: it holds
no RNG streams and no dataloader position (migrate reports both as not recovered). So the
trainers here draw no random numbers while training (no dropout, no augmentation) and take
the batch of step ``s`` from the learnable token stream of ``ckptguard.demo`` with a generator
seeded by ``s``: the data order is a function of the step, which the checkpoint does hold.
A control run that resumes the weights with a fresh optimizer diverges, so the comparison can
fail.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ckptguard import CheckpointManager
from ckptguard.demo import CONTEXT, make_dataset, warmup_cosine
from ckptguard.errors import CheckpointFormatError
from tests._helpers import (
    TiedLM,
    assert_tensors_equal,
    build_tied_optimizer,
    launcher_free_env,
    optimizer_tensors,
    save_legacy_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
TOTAL, K, BATCH = 30, 12, 16
FACTORY = "tests.e2e.test_migrate_e2e:factory"


def factory():
    """What ``--factory`` calls: the model and optimizer exactly as both trainers build them."""
    model = TiedLM()
    return model, build_tied_optimizer(model, lr=3e-3)


class StepData:
    """Batch of step ``s`` = 16 windows of the token stream chosen by a generator seeded ``s``."""

    def __init__(self, path: Path) -> None:
        self.tokens = torch.from_numpy(np.load(path))
        n = len(self.tokens) - CONTEXT
        self.starts = torch.tensor([i for i in range(n) if (i % 64) + CONTEXT < 64])

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 + step)
        starts = self.starts[torch.randperm(len(self.starts), generator=g)[:BATCH]]
        idx = starts[:, None] + torch.arange(CONTEXT + 1)
        windows = self.tokens[idx]
        return windows[:, :CONTEXT], windows[:, CONTEXT]


def build(seed: int = 0):
    torch.manual_seed(seed)
    model, optimizer = factory()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(TOTAL))
    return model, optimizer, scheduler


def train(model, optimizer, scheduler, data: StepData, first: int, last: int) -> dict[int, float]:
    losses = {}
    model.train()
    for step in range(first, last + 1):
        x, y = data.batch(step)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses[step] = loss.item()
    return losses


def new_trainer(root: Path, data: StepData):
    """The ckptguard trainer: build (another seed: the checkpoint must supply everything), load,
    train to TOTAL."""
    model, optimizer, scheduler = build(seed=999)
    with CheckpointManager(root, model=model, optimizer=optimizer, lr_scheduler=scheduler) as mgr:
        start = mgr.load()
        losses = train(model, optimizer, scheduler, data, start + 1, TOTAL)
    return start, losses, (model, optimizer, scheduler)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return StepData(make_dataset(tmp_path_factory.mktemp("data") / "tokens.npy"))


@pytest.fixture(scope="module")
def reference(data):
    """The run that never stopped."""
    model, optimizer, scheduler = build()
    losses = train(model, optimizer, scheduler, data, 1, TOTAL)
    return losses, (model, optimizer, scheduler)


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("ckptguard")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "ckptguard"]
    env = dict(launcher_free_env(), CKPTGUARD_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(cmd + args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.mark.parametrize("fmt", ["dcp", "torch"])
def test_old_checkpoint_migrated_resumes_bit_exactly(tmp_path, data, reference, fmt):
    ref_losses, (ref_model, ref_opt, ref_sched) = reference

    # 1. the old trainer: K steps, then the old format
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model, optimizer, scheduler = build()
    old_losses = train(model, optimizer, scheduler, data, 1, K)
    assert old_losses == {s: ref_losses[s] for s in range(1, K + 1)}
    old = run_dir / ("checkpoint" if fmt == "dcp" else "checkpoint.pt")
    save_legacy_checkpoint(old, model, optimizer, scheduler, step=K, fmt=fmt)
    del model, optimizer, scheduler

    # 2. the new trainer refuses to start fresh and says what to run
    with pytest.raises(CheckpointFormatError) as err:
        new_trainer(run_dir, data)
    command = re.search(r"^\s*(ckptguard migrate .*)$", str(err.value), re.M).group(1)
    argv = shlex.split(command.replace("YOUR_MODULE:YOUR_FN", FACTORY))[1:]
    assert argv[:3] == ["migrate", str(old), str(run_dir)]
    proc = _run_cli(argv)
    assert proc.returncode == 0, proc.stderr
    assert "NOT recovered (the old format does not hold them): rng, dataloader" in proc.stdout
    assert (run_dir / f"step-{K:08d}" / "ckptguard.json").is_file()
    assert old.exists(), "migrate never touches the old checkpoint"

    # 3. resume and compare with the run that never stopped
    start, losses, (model, optimizer, scheduler) = new_trainer(run_dir, data)
    assert start == K
    expected = {s: ref_losses[s] for s in range(K + 1, TOTAL + 1)}
    assert [v.hex() for v in losses.values()] == [v.hex() for v in expected.values()], (
        f"first differing step: {next(s for s in losses if losses[s] != expected[s])}"
    )
    assert_tensors_equal(dict(ref_model.state_dict()), dict(model.state_dict()), "parameters")
    assert model.head.weight is model.embed.weight
    assert_tensors_equal(optimizer_tensors(ref_opt), optimizer_tensors(optimizer), "optimizer moments")
    assert scheduler.state_dict() == ref_sched.state_dict()


def test_control_fresh_optimizer_diverges(tmp_path, data, reference):
    """The comparison above can fail: resuming the weights alone (moments dropped, as a
    trainer that cannot read the old optimizer state would) changes the losses."""
    ref_losses, _ = reference
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, data, 1, K)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    sched_state = scheduler.state_dict()

    model, optimizer, scheduler = build(seed=999)
    model.load_state_dict(weights)
    scheduler.load_state_dict(sched_state)
    for group, lr in zip(optimizer.param_groups, sched_state["_last_lr"], strict=True):
        group["lr"] = lr  # everything as saved except the moments
    losses = train(model, optimizer, scheduler, data, K + 1, TOTAL)
    assert losses[K + 1] == ref_losses[K + 1], "same weights, same batch: same first loss"
    assert any(losses[s] != ref_losses[s] for s in range(K + 2, TOTAL + 1))


def test_wrong_factory_is_refused_and_writes_nothing(tmp_path, data):
    """An optimizer built in named_parameters() order (one group) does not fit: refused."""
    model, optimizer, scheduler = build()
    train(model, optimizer, scheduler, data, 1, 3)
    old = tmp_path / "old.pt"
    save_legacy_checkpoint(old, model, optimizer, scheduler, step=3, fmt="torch")
    factory_file = tmp_path / "wrong.py"
    factory_file.write_text(
        "import torch\n"
        "from tests._helpers import TiedLM\n"
        "def build():\n"
        "    m = TiedLM()\n"
        "    return m, torch.optim.AdamW(m.parameters())\n"
    )
    proc = _run_cli(["migrate", str(old), str(tmp_path / "new"), "--factory", f"{factory_file}:build"])
    assert proc.returncode == 2
    assert "sizes [2, 2]" in proc.stderr and "sizes [4]" in proc.stderr
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").glob("step-*"))
