"""Two optimizers: SGD with momentum for the embedding, AdamW (with its LR schedule) for the
rest. The manager takes one ``optimizer``; the second goes in ``extra`` like any other object
with ``state_dict()``/``load_state_dict()``. On 2 ranks the model is sharded with FSDP2, so the
second optimizer's momentum buffers are DTensor shards."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler
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
    dataset = progression_windows()
    distributed = ctx.world_size > 1
    sampler = DistributedSampler(dataset, seed=0, drop_last=True) if distributed else None
    loader = StatefulDataLoader(
        dataset, batch_size=16, shuffle=not distributed, sampler=sampler, drop_last=True
    )
    model = Net()
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (ctx.world_size,)))
    embed_params = list(model.embed.parameters())
    dense_params = [p for n, p in model.named_parameters() if not n.startswith("embed.")]
    optimizer = torch.optim.AdamW(dense_params, lr=1e-2, weight_decay=0.1)
    embed_optimizer = torch.optim.SGD(embed_params, lr=0.5, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 4))
    mgr = CheckpointManager(
        ctx.ckpt_dir, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader,
        extra={"embed_optimizer": embed_optimizer}, strict=True,
    )

    step = mgr.load()
    model.train()
    while step < ctx.total_steps:
        for x, y in loader:
            step += 1
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            embed_optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            embed_optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            ctx.record(step, loss)
            if ctx.should_stop(step):
                mgr.save(step)
                mgr.close()
                return
            if step >= ctx.total_steps:
                break
    ctx.finish(mgr, step)
