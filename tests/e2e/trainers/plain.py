"""The textbook loop: one process, a plain module, AdamW with decay groups, warmup LR, dropout,
a shuffling ``StatefulDataLoader``; save when told to stop."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptguard import CheckpointManager
from ckptguard.testing import ResumeContext
from tests._helpers import progression_windows


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
    loader = StatefulDataLoader(progression_windows(), batch_size=16, shuffle=True, drop_last=True)
    model = Net()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    mgr = CheckpointManager(
        ctx.ckpt_dir, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader,
        strict=True,
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
            ctx.record(step, loss)
            if ctx.should_stop(step):
                mgr.save(step)
                mgr.close()
                return
            if step >= ctx.total_steps:
                break
    ctx.finish(mgr, step)
