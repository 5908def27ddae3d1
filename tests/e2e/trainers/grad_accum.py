"""Gradient accumulation: 4 micro-batches per optimizer step, the loss divided by 4; on 2 ranks
under DDP with ``no_sync()`` on all but the last micro-batch. Steps count optimizer steps and
saves happen only at an optimizer-step boundary (declared to the manager)."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptguard import CheckpointManager
from ckptguard.testing import ResumeContext
from tests._helpers import progression_windows

ACCUM = 4


class Net(nn.Module):
    def __init__(self, vocab: int = 33, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(4 * dim, 64)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(64, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.gelu(self.hidden(self.embed(x).flatten(1)))))


def train(ctx: ResumeContext) -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dataset = progression_windows(1024)
    distributed = ctx.world_size > 1
    sampler = DistributedSampler(dataset, seed=0, drop_last=True) if distributed else None
    loader = StatefulDataLoader(
        dataset, batch_size=8, shuffle=not distributed, sampler=sampler, drop_last=True
    )
    model = Net()
    if distributed:
        model = DDP(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    mgr = CheckpointManager(
        ctx.ckpt_dir, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader,
        grad_accum_steps=ACCUM, global_batch_size=8 * ACCUM * ctx.world_size, strict=True,
    )

    step = mgr.load()
    model.train()
    micro = 0
    step_loss = 0.0
    while step < ctx.total_steps:
        for x, y in loader:
            micro += 1
            sync = micro % ACCUM == 0
            no_sync = model.no_sync() if distributed and not sync else contextlib.nullcontext()
            with no_sync:
                loss = F.cross_entropy(model(x), y) / ACCUM
                loss.backward()
            step_loss += loss.item()
            if not sync:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            ctx.record(step, step_loss)
            step_loss = 0.0
            if ctx.should_stop(step):
                mgr.save(step)
                mgr.close()
                return
            if step >= ctx.total_steps:
                break
    ctx.finish(mgr, step)
