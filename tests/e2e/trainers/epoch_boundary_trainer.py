"""An epoch-based trainer: ``DistributedSampler`` + ``set_epoch`` + ``StatefulDataLoader``, the
resume epoch computed from the loaded step, DDP on gloo when run under ``torchrun``.

Where it saves is the point under test (``ctx.options``):

* ``save_at="in_loop"``: inside the inner loop after a batch, as ``if step % every == 0:
  mgr.save(step)`` does, which at ``step % steps_per_epoch == 0`` is *after the last batch* of
  an epoch, before the loop has seen the end of the loader;
* ``save_at="after_loop"``: after the inner loop is exhausted, before the next ``set_epoch``;
* ``save_at="epoch_start"``: at the top of the next epoch, after its ``set_epoch``, before its
  first batch.

``set_epoch="top"`` is the usual loop; ``set_epoch="end"`` calls ``set_epoch(epoch + 1)`` after
each epoch instead, so a resumed partial epoch iterates without a ``set_epoch`` before it.
``epoch_from="state"`` keeps the epoch in a small trainer state passed in ``extra`` (updated at
the top of each epoch) instead of computing it from the step, so a save after the last batch of
an epoch resumes *into* that epoch.
Every step appends the rank's sample indices and exact loss to ``batches-rank<r>.jsonl``.
"""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptguard import CheckpointManager
from ckptguard.testing import ResumeContext
from tests._helpers import progression_windows

EPOCHS = 3
SAMPLES = 24
BATCH_SIZE = 4


class Windows(Dataset):
    """Learnable windows of arithmetic progressions; yields the sample index for the log."""

    def __init__(self) -> None:
        self.x, self.y = progression_windows(SAMPLES).tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.x[i], self.y[i]


class Net(nn.Module):
    def __init__(self, vocab: int = 33, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(4 * dim, 32)
        self.head = nn.Linear(32, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.hidden(self.embed(x).flatten(1))))


class TrainState:
    def __init__(self) -> None:
        self.epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch = sd["epoch"]


def train(ctx: ResumeContext) -> None:
    save_at = ctx.options.get("save_at", "in_loop")
    set_epoch_at = ctx.options.get("set_epoch", "top")
    epoch_from = ctx.options.get("epoch_from", "step")
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dataset = Windows()
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=0)
    loader = StatefulDataLoader(
        dataset, batch_size=BATCH_SIZE, sampler=sampler, num_workers=ctx.options.get("num_workers", 0)
    )
    steps_per_epoch = len(loader)
    model = Net()
    if ctx.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = TrainState()
    mgr = CheckpointManager(
        ctx.ckpt_dir, model=model, optimizer=optimizer, dataloader=loader, extra={"train": state}
    )
    log = open(ctx.out_dir / f"batches-rank{ctx.rank}.jsonl", "a")

    def stop(step: int) -> bool:
        if ctx.should_stop(step):
            mgr.save(step)
            mgr.close()
            log.close()
            return True
        return False

    start = mgr.load()  # returns the saved step
    start_epoch, _ = divmod(start, steps_per_epoch)
    if epoch_from == "state":
        start_epoch = state.epoch
    step = start
    for epoch in range(start_epoch, EPOCHS):
        state.epoch = epoch
        if set_epoch_at == "top":
            sampler.set_epoch(epoch)
        if save_at == "epoch_start" and epoch > 0 and stop(step):
            return
        for idx, x, y in loader:
            step += 1
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ctx.record(step, loss)
            mgr.record(step, loss=loss, batch=idx)
            log.write(json.dumps({"step": step, "epoch": epoch, "samples": idx.tolist(),
                                  "loss": loss.item().hex()}) + "\n")
            if save_at == "in_loop" and stop(step):
                return
        if set_epoch_at == "end":
            sampler.set_epoch(epoch + 1)
        if save_at == "after_loop" and stop(step):
            return
    log.close()
    ctx.finish(mgr, step)
