""""Our trainer resumes exactly": the ckptguard test to put in your own CI.

    pytest examples/test_my_trainer_resumes.py

``assert_resumes_exactly`` runs ``train`` three times in fresh processes: uninterrupted to
``total_steps``; stopped (saved) at ``stop_at``; resumed from that checkpoint to the end. It
fails unless every loss and every tensor of the final state (model, optimizer, scheduler,
dataloader position, RNG streams) is bit-identical, and the failure names the first divergent
step and its likely cause, e.g.::

    first divergence at step 8 (rank 0): likely cause rng: same batch and LR, but the torch RNG
    state after step 8 differs: the RNG was reseeded after load() ...

Replace the body of ``train`` with your trainer (here: ckptguard's demo model and data). The
legs import it by name (``"test_my_trainer_resumes:train"``) from the directory this test
imported it from. ``nproc=2`` runs every leg under torchrun.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptguard import CheckpointManager
from ckptguard.demo import TinyLM, TokenWindows, build_optimizer, make_dataset, warmup_cosine
from ckptguard.testing import ResumeContext, assert_resumes_exactly


def train(ctx: ResumeContext) -> None:
    """The trainer under test, written as usual; ``ctx`` says where to keep checkpoints, how
    far to go and when the harness wants it to stop."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loader = StatefulDataLoader(
        TokenWindows(ctx.options["data"], ctx.rank, ctx.world_size), batch_size=16, shuffle=True, drop_last=True
    )
    model = TinyLM()
    optimizer = build_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(ctx.total_steps))
    mgr = CheckpointManager(
        ctx.ckpt_dir, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader,
        strict=True,  # a resume check that finds an error raises instead of logging
    )
    step = mgr.load()
    model.train()
    while step < ctx.total_steps:
        for x, y in loader:
            step += 1
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            mgr.record(step, loss=loss, batch=(x, y))  # the run trace the report is built from
            if ctx.should_stop(step):  # the harness's simulated preemption
                mgr.save(step)
                mgr.close()
                return
            if step >= ctx.total_steps:
                break
    ctx.finish(mgr, step)  # saves the final state for the comparison


def test_my_trainer_resumes_exactly(tmp_path):
    data = make_dataset(tmp_path / "tokens.npy")
    assert_resumes_exactly(
        "test_my_trainer_resumes:train", tmp_path, total_steps=20, stop_at=7,
        options={"data": str(data)},
    )
