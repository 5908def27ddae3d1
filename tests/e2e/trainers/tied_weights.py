"""Tied weights: the output layer shares the embedding matrix (``head.weight = embed.weight``),
as in GPT-2; the optimizer lists the shared parameter once."""

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


class TiedNet(nn.Module):
    def __init__(self, vocab: int = 33, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.gelu(self.hidden(self.embed(x).flatten(1)))))


def train(ctx: ResumeContext) -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loader = StatefulDataLoader(progression_windows(), batch_size=16, shuffle=True, drop_last=True)
    model = TiedNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    mgr = CheckpointManager(
        ctx.ckpt_dir, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader,
        strict=True,
    )

    step = mgr.load()
    assert model.head.weight is model.embed.weight, "load() untied the weights"
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
