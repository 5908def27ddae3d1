"""The built-in example behind ``ckptguard demo``: a small language model on a learnable task.

The data is a token stream of arithmetic progressions modulo the vocabulary (each 64-token segment
has its own random start and stride 1-4), stored on disk; the model sees 4 tokens and predicts the
next. The loss falls from ln(33) ~ 3.5 to well under 1 within a hundred steps, so a lost optimizer
moment or a repeated batch shows up as a different loss, not as noise.
The trainer uses every state ckptguard restores: AdamW with decay/no-decay groups, a warmup-cosine
LR schedule, dropout (torch RNG), augmentation drawn from python's and numpy's RNGs, and a
shuffling ``StatefulDataLoader`` (optionally with worker processes). With 2+ ranks the model is
sharded with FSDP2 over a CPU mesh; the vocabulary (33) makes the embedding shard unevenly.
"""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ckptguard.core.states.rng import WorkerRNGState
from ckptguard.manager import CheckpointManager
from ckptguard.testing import ResumeContext, ResumeReport, run_resume_check

VOCAB = 33
CONTEXT = 4


def make_dataset(path: str | Path, n_tokens: int = 4096, seed: int = 0) -> Path:
    """Write the token stream (int64 .npy): a new progression (start, stride) every 64 tokens."""
    rng = np.random.default_rng(seed)
    tokens = np.empty(n_tokens, dtype=np.int64)
    stride = 1
    for i in range(n_tokens):
        if i % 64 == 0:
            stride = int(rng.integers(1, 5))
            tokens[i] = rng.integers(VOCAB)
        else:
            tokens[i] = (tokens[i - 1] + stride) % VOCAB
    path = Path(path)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, tokens)
    tmp.replace(path)
    return path


class TokenWindows(WorkerRNGState, torch.utils.data.Dataset):
    """(4 context tokens, next token) pairs read from the on-disk stream, with augmentation:
    a context token is replaced by a random one 5% of the time (python + numpy RNG).

    ``WorkerRNGState`` saves those draws' RNG per loader worker (``num_workers > 0``); without
    it a resumed run's workers would restart their RNG from the seed and augment differently.
    """

    def __init__(self, path: str | Path, rank: int = 0, world_size: int = 1) -> None:
        self.path = str(path)
        n = len(np.load(self.path, mmap_mode="r")) - CONTEXT
        self.starts = [i for i in range(n) if (i % 64) + CONTEXT < 64][rank::world_size]
        self._tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens = np.load(self.path, mmap_mode="r")
        s = self.starts[idx]
        x = np.array(self._tokens[s : s + CONTEXT])
        if random.random() < 0.05:
            x[np.random.randint(CONTEXT)] = np.random.randint(VOCAB)
        return torch.from_numpy(x), torch.tensor(int(self._tokens[s + CONTEXT]))


class TinyLM(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.hidden = nn.Linear(CONTEXT * dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(1)
        return self.head(self.drop(F.gelu(self.hidden(h))))


def warmup_cosine(total_steps: int, warmup: int = 5):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: nn.Module, lr: float = 1e-2) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def train(ctx: ResumeContext) -> None:
    """A trainer written the way users write them; see ``ckptguard.testing`` for ``ctx``."""
    opts: dict[str, Any] = ctx.options
    seed = int(opts.get("seed", 0))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device(opts.get("device", "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    from torchdata.stateful_dataloader import StatefulDataLoader

    dataset = TokenWindows(opts["data"], ctx.rank, ctx.world_size)
    loader = StatefulDataLoader(
        dataset,
        batch_size=int(opts.get("batch_size", 16)),
        shuffle=True,
        drop_last=True,
        num_workers=int(opts.get("num_workers", 0)),
    )
    model = TinyLM().to(device)
    if ctx.world_size > 1:
        mesh = init_device_mesh(device.type, (ctx.world_size,))
        fully_shard(model.hidden, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = build_optimizer(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(ctx.total_steps))
    mgr = CheckpointManager(
        ctx.ckpt_dir, model=model, optimizer=optimizer, lr_scheduler=scheduler, dataloader=loader,
        keep_last=2,
    )

    step = mgr.load()
    model.train()
    while step < ctx.total_steps:
        for x, y in loader:
            step += 1
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            mgr.record(step, loss=loss, batch=(x, y))  # run trace: names a divergence's cause
            if ctx.should_stop(step):
                mgr.save(step)
                mgr.close()
                return
            if step >= ctx.total_steps:
                break
    ctx.finish(mgr, step)


def run_demo(
    *,
    nproc: int = 1,
    total_steps: int = 60,
    stop_at: int = 23,
    num_workers: int = 0,
    device: str = "cpu",
    workdir: str | Path | None = None,
) -> ResumeReport:
    """Uninterrupted vs interrupted-and-resumed runs of ``train``; returns the report."""
    with tempfile.TemporaryDirectory(prefix="ckptguard-demo-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_dataset(work / "tokens.npy")
        options = {"data": str(data), "num_workers": num_workers, "device": device}
        return run_resume_check(
            "ckptguard.demo:train", work, total_steps=total_steps, stop_at=stop_at,
            nproc=nproc, options=options,
        )
