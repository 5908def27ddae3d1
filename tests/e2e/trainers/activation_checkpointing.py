"""Activation checkpointing: the blocks (with dropout inside, so the recomputation must replay
the RNG) are wrapped by ``apply_activation_checkpointing``; a ``torch.utils.checkpoint`` call in
the forward covers the functional form."""

from __future__ import annotations

import functools
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import checkpoint
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptguard import CheckpointManager
from ckptguard.testing import ResumeContext
from tests._helpers import progression_windows


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.drop(F.gelu(self.fc(h)))


class Net(nn.Module):
    def __init__(self, vocab: int = 33, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(4 * dim, 32)
        self.blocks = nn.ModuleList([Block(32), Block(32)])
        self.head = nn.Linear(32, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.proj, self.embed(x).flatten(1), use_reentrant=False)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def train(ctx: ResumeContext) -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loader = StatefulDataLoader(progression_windows(), batch_size=16, shuffle=True, drop_last=True)
    model = Net()
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, Block),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
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
